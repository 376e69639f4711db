"""
### Sketchfab visual similarity

Keeps the table `model_similarity` ("models that look like this one") up to date:
crawls new Sketchfab models, downloads their thumbnails, extracts truncated-VGG16
features, loads them into Postgres/pgvector and refreshes the exact top-N.
Ask for recommendations with `SELECT * FROM similar_models('<uid>', 10);` or open
the **Similarity gallery** from the navigation bar.

**Runs.** Scheduled runs (Variable `similarity_schedule`, default daily, no catchup)
and manual runs take every model published since the last crawl. Backfill runs
(`airflow backfill create --dag-id sketchfab_visual_similarity --from-date ...
--to-date ...`, or the UI's backfill dialog) take exactly the models published in
their data interval. One run works at a time: `max_active_runs=1` covers scheduled
and manual runs, and `start_run` makes backfill runs wait their turn too.

**Scale-out.** Downloads and extraction are mapped over uid shards sized by the
Variables `similarity_download_shard_size` and `similarity_extract_shard_size`;
extraction runs in the `gpu` pool on the `gpu` queue (`similarity_gpu_pool`,
`similarity_gpu_queue`). Each publish of a changed table updates the Asset
`sketchfab_model_similarity`.

This file only wires tasks; the work lives in `plugins/sketchfab_similarity/`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import AssetAlias, Param, dag, get_current_context, task
from sketchfab_similarity import tasks
from sketchfab_similarity.core.runs import STAGES
from sketchfab_similarity.core.settings import dag_settings

DAG_ID = "sketchfab_visual_similarity"
SETTINGS = dag_settings()

SIMILARITY_TABLE = tasks.similarity_asset()
# refresh_similarity's outlet: through an alias, an event is emitted only by the part that
# actually published (never by parts that only computed, nor by runs where nothing changed).
SIMILARITY_PUBLISH = AssetAlias(name="sketchfab_model_similarity_publish", group="sketchfab")

# Sketchfab slugs: lowercase letters and digits, words joined by hyphens (tags also allow underscores).
CATEGORY_SLUG = r"^[a-z0-9]+(-[a-z0-9]+)*$"
TAG_SLUG = r"^[a-z0-9][a-z0-9_-]*$"

PARAMS = {
    "max_models": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=10_000_000,
        title="Max models",
        description="Stop the crawl after this many models (1 to 10,000,000). Empty: no limit.",
    ),
    "categories": Param(
        None,
        type=["null", "string"],
        pattern=CATEGORY_SLUG,
        maxLength=100,
        title="Category",
        description="Only crawl models in this Sketchfab category, by slug, e.g. cars-vehicles. Empty: all.",
    ),
    "tags": Param(
        [],
        type="array",
        items={"type": "string", "pattern": TAG_SLUG, "maxLength": 100},
        maxItems=20,
        uniqueItems=True,
        title="Tags",
        description="Only crawl models that have all of these tags, by slug, e.g. lowpoly (at most 20).",
    ),
    "min_likes": Param(
        0,
        type="integer",
        minimum=0,
        maximum=2_147_483_647,
        title="Minimum likes",
        description="Skip models with fewer likes than this (0: keep all).",
    ),
    "top_n": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=1000,
        title="Top N",
        description="Neighbours kept per model (1 to 1000). Empty: the Variable similarity_top_n (default 20).",
    ),
    "force_reextract": Param(
        False,
        type="boolean",
        title="Force re-extraction",
        description="Recompute every vector, not only new or changed thumbnails.",
    ),
    "full_recrawl": Param(
        False,
        type="boolean",
        title="Full re-crawl",
        description="Page the whole catalogue again, slice by slice: models gone from Sketchfab leave "
        "every list, changed names and thumbnails are updated.",
    ),
    "full_refresh": Param(
        False,
        type="boolean",
        title="Full refresh",
        description="Rebuild the whole top-N table instead of updating it incrementally.",
    ),
}


@dag(
    dag_id=DAG_ID,
    schedule=tasks.timetable(SETTINGS),
    start_date=pendulum.datetime(2012, 1, 1, tz="UTC"),
    catchup=SETTINGS.catchup,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["sketchfab", "recommendations", "pgvector"],
    default_args=tasks.default_args(SETTINGS),
    params=PARAMS,
)
def sketchfab_visual_similarity():
    @task.sensor(
        mode="reschedule",
        poke_interval=SETTINGS.run_wait_poke_s,
        timeout=timedelta(hours=SETTINGS.run_wait_timeout_hours),
    )
    def start_run() -> bool:
        """Fails at once on unknown conf keys. Then waits, without holding a worker slot, until
        no other run of this pipeline is active (backfill runs included), takes the run
        lease and applies the SQL schema."""
        return tasks.start_run(get_current_context())

    @task
    def crawl_models() -> dict:
        """Pages the Sketchfab API newest-first and upserts models into `sketchfab_models`;
        records that cannot be accepted go to `crawl_rejects` with the reason. A backfill
        run takes exactly its data interval, other runs everything since the watermark; past the
        API's listing cap the crawl goes on through slices (see crawl/sliced.py)."""
        return tasks.crawl_models(get_current_context())

    @task
    def plan_downloads() -> list[dict]:
        """Counts pending thumbnails and splits them into uid shards for `download_thumbnails`."""
        return tasks.plan_downloads(get_current_context())

    @task(
        map_index_template="{{ shard_label }}",
        doc_md="One uid shard: fetches, validates and stores each pending thumbnail and records "
        "`ok` or `failed` with the reason in `model_thumbnails`. A bad image never fails the task.",
    )
    def download_thumbnails(shard: dict) -> dict:
        context = get_current_context()
        context["shard_label"] = f"shard {shard['index'] + 1} of {shard['count']}"
        return tasks.download_thumbnails(context, shard)

    @task
    def plan_extraction() -> list[dict]:
        """Counts thumbnails without a current vector and splits them into uid shards."""
        return tasks.plan_extraction(get_current_context())

    @task(
        pool=SETTINGS.gpu_pool,
        queue=SETTINGS.gpu_queue,
        map_index_template="{{ shard_label }}",
        doc_md="One uid shard: truncated VGG16 (block5_pool, global average pooling, L2-normalised) "
        "for thumbnails without a current vector; writes feature files for `load_vectors`. Runs in "
        "the GPU pool on the GPU queue (on the CPU where there is no GPU).",
    )
    def extract_features(shard: dict) -> dict:
        context = get_current_context()
        context["shard_label"] = f"shard {shard['index'] + 1} of {shard['count']}"
        return tasks.extract_features(context, shard)

    @task
    def load_vectors(extracted: list[dict]) -> dict:
        """Bulk-loads the feature files of every extraction shard into `model_embeddings`."""
        return tasks.load_vectors(get_current_context(), tasks.merge_extracted(extracted))

    @task
    def summarize_run(
        crawled: dict, downloaded: list[dict], extracted: list[dict], loaded: dict, refreshed: list[dict]
    ) -> dict:
        """Logs and returns the run's counts, records them in `pipeline_runs`, releases the run lease."""
        results = (crawled, downloaded, extracted, loaded, refreshed)
        return tasks.summarize_run(get_current_context(), dict(zip(STAGES, results, strict=True)))

    crawled = crawl_models()
    start_run() >> crawled
    download_plan = plan_downloads()
    crawled >> download_plan
    downloaded = download_thumbnails.expand(shard=download_plan)
    extract_plan = plan_extraction()
    downloaded >> extract_plan
    extracted = extract_features.expand(shard=extract_plan)
    loaded = load_vectors(extracted)

    # --- refresh_similarity: the step that writes model_similarity -------------------------
    # One mapped task per part (AIRFLOW_VAR_SIMILARITY_REFRESH_PARTS, default 1); each computes a
    # share of the top-N lists and the last part to finish publishes model_similarity atomically.
    @task(
        outlets=[SIMILARITY_PUBLISH],
        map_index_template="{{ part_label }}",
        doc_md="One part of the exact top-N table `model_similarity` (incremental, or full after a "
        "feature-version change or `full_refresh`); the last part to finish publishes it atomically "
        "and, when it published, updates the Asset `sketchfab_model_similarity` with what changed.",
    )
    def refresh_similarity(part: dict) -> dict:
        """Brings the exact top-N table `model_similarity` up to date (incremental or full) and
        publishes it atomically; a publish updates the Asset `sketchfab_model_similarity`."""
        context = get_current_context()
        context["part_label"] = f"part {part['index'] + 1} of {part['count']}"
        result = tasks.refresh_similarity(context, part)
        change = tasks.published_change(result)
        if change is not None:
            context["outlet_events"][SIMILARITY_PUBLISH].add(SIMILARITY_TABLE, extra=change)
        return result

    refreshed = refresh_similarity.expand(part=tasks.refresh_parts(SETTINGS))
    loaded >> refreshed
    # --- end of refresh_similarity -----------------------------------------------------------

    summary = summarize_run(crawled, downloaded, extracted, loaded, refreshed)

    @task
    def collect_garbage() -> dict:
        """Removes (or, in `dry-run`, lists) store files nothing needs, older than
        `similarity_storage_gc_min_age_hours`; skipped unless `similarity_storage_gc` turns it on."""
        return tasks.collect_garbage(get_current_context())

    summary >> collect_garbage()


sketchfab_visual_similarity()
