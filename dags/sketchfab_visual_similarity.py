"""
### Sketchfab visual similarity

Crawls new Sketchfab models, downloads their thumbnails, extracts truncated-VGG16
features, loads them into Postgres/pgvector and refreshes the materialised
top-N table `model_similarity`. Ask for recommendations with
`SELECT * FROM similar_models('<uid>', 10);`.

This file only wires tasks; the work lives in `plugins/sketchfab_similarity/`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from sketchfab_similarity import tasks

DAG_ID = "sketchfab_visual_similarity"


@dag(
    dag_id=DAG_ID,
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["sketchfab", "recommendations", "pgvector"],
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
    },
    params={
        "max_models": Param(
            None, type=["null", "integer"], minimum=1, description="Stop the crawl after this many models."
        ),
        "categories": Param(
            None, type=["null", "string"], description="Only crawl models in this category (slug)."
        ),
        "tags": Param(
            [], type="array", items={"type": "string"}, description="Only models with all these tags."
        ),
        "min_likes": Param(0, type="integer", minimum=0, description="Skip models with fewer likes."),
        "top_n": Param(
            None, type=["null", "integer"], minimum=1, maximum=1000, description="Neighbours kept per model."
        ),
        "force_reextract": Param(False, type="boolean", description="Recompute every vector."),
        "full_refresh": Param(False, type="boolean", description="Rebuild the whole top-N table."),
    },
)
def sketchfab_visual_similarity():
    @task
    def crawl_models() -> dict:
        """Page the Sketchfab API newest-first and upsert models into `sketchfab_models`."""
        return tasks.crawl_models(get_current_context())

    @task
    def download_thumbnails() -> dict:
        """Fetch, validate and store one thumbnail per model; record `ok` or `failed` with the reason."""
        return tasks.download_thumbnails(get_current_context())

    @task
    def extract_features() -> dict:
        """Truncated VGG16 (block5_pool, global average pooling, L2-normalised) for new thumbnails."""
        return tasks.extract_features(get_current_context())

    @task
    def load_vectors(extracted: dict) -> dict:
        """Bulk-load the feature files into `model_embeddings` (pgvector)."""
        return tasks.load_vectors(get_current_context(), extracted)

    # --- refresh_similarity: one mapped task per part (AIRFLOW_VAR_SIMILARITY_REFRESH_PARTS,
    # default 1); the last part to finish publishes model_similarity atomically.
    @task
    def refresh_similarity(part: dict) -> dict:
        """Bring the exact top-N table `model_similarity` up to date (incremental or full), publish atomically."""
        return tasks.refresh_similarity(get_current_context(), part)

    extracted = extract_features()
    crawl_models() >> download_thumbnails() >> extracted
    load_vectors(extracted) >> refresh_similarity.expand(part=tasks.refresh_parts())
    # --- end refresh_similarity


sketchfab_visual_similarity()
