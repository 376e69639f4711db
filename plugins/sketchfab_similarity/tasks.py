"""The Airflow-facing edge: turn a task's context and params into stage calls.

Each function takes the Airflow context, runs one stage and returns a small
JSON-able summary (it becomes the task's XCom). The stages themselves know
nothing about Airflow.

Why this module is long: it holds one short function for every task of both DAGs (and the
DAG-level pieces they share: timetable, default args, the Asset, the conf check), so the
whole Airflow edge reads in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import timedelta
from typing import Any

import psycopg2.errors

from . import crawl, evaluation, features, similarity, thumbnails, vectors
from .core import db, runs
from .core.featurespec import FeatureSpec
from .core.settings import DB_CONN_ID, Settings, describe, settings_from_airflow
from .core.sharding import WHOLE, Shard
from .thumbnails import gc

log = logging.getLogger(__name__)


def settings_for(context: dict[str, Any]) -> Settings:
    params = context.get("params") or {}
    settings = settings_from_airflow(top_n=params.get("top_n"))
    return settings


def leased_settings(context: dict[str, Any]) -> Settings:
    """Settings for a stage task, after confirming this run still holds the run lease."""
    from airflow.sdk.exceptions import AirflowFailException

    settings = settings_for(context)
    dag_run = context["dag_run"]
    problem = runs.lease_problem(settings.db_url, dag_run.dag_id, dag_run.run_id)
    if problem:
        raise AirflowFailException(f"Not running this task: {problem}")
    return settings


def timetable(settings: Settings) -> Any:
    """Cron data intervals, so each scheduled or backfill run owns [start, end) with no gaps."""
    from airflow.sdk import CronDataIntervalTimetable
    from airflow.sdk.exceptions import AirflowTimetableInvalid

    schedule = settings.schedule.strip()
    if schedule.lower() in ("", "none"):
        return None
    timetable = CronDataIntervalTimetable(schedule, timezone="UTC")
    try:
        timetable.validate()
    except AirflowTimetableInvalid as exc:  # the cron parser's message does not name the Variable
        raise ValueError(
            f"Variable similarity_schedule {schedule!r} is not a cron expression or preset "
            f"(@hourly, @daily, '0 */6 * * *', or none): {exc}"
        ) from None
    return timetable


def similarity_asset() -> Any:
    """The Asset `sketchfab_model_similarity`: updated by each publish, scheduling the evaluation DAG."""
    from airflow.sdk import Asset

    return Asset(
        name="sketchfab_model_similarity",
        group="sketchfab",
        extra={"connection": DB_CONN_ID, "table": "model_similarity"},
    )


def default_args(settings: Settings) -> dict[str, Any]:
    """Every task of both DAGs: retries with exponential backoff, and a time limit."""
    return {
        "retries": settings.task_retries,
        "retry_delay": timedelta(seconds=settings.retry_delay_s),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(seconds=settings.max_retry_delay_s),
        "execution_timeout": timedelta(minutes=settings.task_timeout_minutes),
    }


def check_conf(context: dict[str, Any]) -> None:
    """Refuse conf keys that are not the DAG's Params (a typo would otherwise be silently ignored)."""
    from airflow.sdk.exceptions import AirflowFailException

    declared = set(context["dag"].params)
    conf = getattr(context["dag_run"], "conf", None) or {}
    unknown = sorted(set(conf) - declared)
    if unknown:
        raise AirflowFailException(
            f"Unknown parameter(s) {', '.join(map(repr, unknown))} in the run's conf; "
            f"valid parameters are {', '.join(sorted(declared))}"
        )


def _dag_run_state(context: dict[str, Any], dag_id: str, run_id: str) -> str | None:
    """Another run's state through the Task SDK; None if Airflow no longer knows the run."""
    from airflow.sdk.exceptions import AirflowRuntimeError

    try:
        state = context["ti"].get_dagrun_state(dag_id, run_id)
    except AirflowRuntimeError as exc:
        if isinstance(exc.error.detail, dict) and exc.error.detail.get("status_code") == 404:
            return None
        raise
    return str(getattr(state, "value", state))


def start_run(context: dict[str, Any]) -> bool:
    """Check the run's conf, wait for the run lease (one run at a time), then apply the schema."""
    check_conf(context)
    settings = settings_for(context)
    dag_id, run_id = context["dag_run"].dag_id, context["dag_run"].run_id

    def acquire() -> runs.LeaseDecision:
        return runs.try_acquire_run_lease(
            settings.db_url, dag_id, run_id, lambda d, r: _dag_run_state(context, d, r)
        )

    try:
        decision = acquire()
    except psycopg2.errors.UndefinedTable:  # a fresh database: create the schema, then take the lease
        db.apply_schema(settings.db_url, lock_timeout_s=settings.migration_lock_timeout_s)
        decision = acquire()
    log.info("run lease: %s", decision.reason)
    if decision.acquired:
        log.info(
            "schema applied: %s",
            ", ".join(db.apply_schema(settings.db_url, lock_timeout_s=settings.migration_lock_timeout_s)),
        )
    return decision.acquired


def crawl_window(
    context: dict[str, Any], settings: Settings, filters: crawl.CrawlFilters = crawl.NO_FILTERS
) -> crawl.CrawlWindow:
    """Backfills take exactly their data interval; `full_recrawl` runs take everything; other runs
    continue from the watermark."""
    run_type = getattr(context["dag_run"], "run_type", None)
    if getattr(run_type, "value", run_type) == "backfill":
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        if start is None or end is None:
            raise ValueError("A backfill run needs a data interval (give the DAG a schedule)")
        return crawl.CrawlWindow(since=start, until=end, incremental=False)
    if (context.get("params") or {}).get("full_recrawl"):
        return crawl.CrawlWindow(since=None, incremental=True)
    overlap = timedelta(minutes=settings.crawl_overlap_minutes)
    return crawl.incremental_window(settings.db_url, overlap, filters)


def crawl_filters(params: dict[str, Any]) -> crawl.CrawlFilters:
    tags = params.get("tags") or ()
    if isinstance(tags, str):
        tags = [t for t in tags.split(",") if t.strip()]
    max_models = params.get("max_models")
    return crawl.CrawlFilters(
        categories=params.get("categories") or None,
        tags=tuple(t.strip() for t in tags),
        min_likes=int(params.get("min_likes") or 0),
        max_models=int(max_models) if max_models is not None else None,
    )


def checkpoint_key(context: dict[str, Any]) -> str:
    """One crawl per DAG run: a retry of the task (same run) resumes where the last try stopped."""
    dag_run = context["dag_run"]
    return f"{dag_run.dag_id}/{dag_run.run_id}"


def crawl_models(context: dict[str, Any]) -> dict[str, Any]:
    settings = leased_settings(context)
    log.info("settings: %s", describe(settings))
    applied = db.apply_schema(settings.db_url, lock_timeout_s=settings.migration_lock_timeout_s)
    log.info("schema applied: %s", ", ".join(applied))
    filters = crawl_filters(context.get("params") or {})
    window = crawl_window(context, settings, filters)
    key = checkpoint_key(context)
    full_recrawl = bool((context.get("params") or {}).get("full_recrawl"))
    log.info(
        "crawl %s: window since=%s until=%s, %s, full_recrawl=%s",
        key,
        window.since,
        window.until,
        filters,
        full_recrawl,
    )
    return asdict(crawl.crawl(settings, window, filters, checkpoint_key=key, full_recrawl=full_recrawl))


def _shard_plan(stage: str, pending: int, shard_size: int, max_shards: int) -> list[dict[str, int]]:
    shards = runs.plan_shards(pending, shard_size, max_shards)
    log.info("%s: %d pending, %d shard(s) of up to %d", stage, pending, len(shards), shard_size)
    return [asdict(s) for s in shards]


def plan_downloads(context: dict[str, Any]) -> list[dict[str, int]]:
    """Shard descriptors for the mapped download tasks, sized by `download_shard_size`."""
    settings = leased_settings(context)
    pending = len(thumbnails.pending_downloads(settings))
    return _shard_plan("download", pending, settings.download_shard_size, settings.max_shards)


def download_thumbnails(context: dict[str, Any], shard: Mapping[str, int]) -> dict[str, Any]:
    return asdict(thumbnails.download_thumbnails(leased_settings(context), shard=Shard(**shard)))


def plan_extraction(context: dict[str, Any]) -> list[dict[str, int]]:
    """Shard descriptors for the mapped extraction tasks, sized by `extract_shard_size`."""
    settings = leased_settings(context)
    force = bool((context.get("params") or {}).get("force_reextract"))
    version = FeatureSpec.from_settings(settings).version
    pending = len(features.pending_extractions(settings.db_url, version, force))
    return _shard_plan("extract", pending, settings.extract_shard_size, settings.max_shards)


def extract_features(context: dict[str, Any], shard: Mapping[str, int]) -> dict[str, Any]:
    params = context.get("params") or {}
    result = features.extract_features(
        leased_settings(context), force=bool(params.get("force_reextract")), shard=Shard(**shard)
    )
    return asdict(result)


def merge_extracted(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One extraction result from the mapped shards' results (load_vectors takes the union)."""
    return runs.combine(runs.mapped_results(parts))


def load_vectors(context: dict[str, Any], extracted: dict[str, Any]) -> dict[str, Any]:
    files = list(extracted.get("files") or [])
    return asdict(vectors.load_vectors(leased_settings(context), files, remove_loaded=True))


def refresh_parts(settings: Settings) -> list[dict[str, int]]:
    """The shards the DAG maps refresh_similarity over, one per parallel task (`refresh_parts`,
    an ENV setting: the number of mapped tasks is part of the DAG's shape)."""
    return [{"index": s.index, "count": s.count} for s in Shard.all(settings.refresh_parts)]


def refresh_similarity(context: dict[str, Any], part: dict[str, int] | None = None) -> dict[str, Any]:
    """One part of the refresh; the last part of the run to finish publishes (see similarity.py)."""
    params = context.get("params") or {}
    stats = similarity.refresh_similarity(
        leased_settings(context),
        full=bool(params.get("full_refresh")),
        shard=Shard(**part) if part else WHOLE,
        run_key=str(context["run_id"]),
    )
    return asdict(stats)


# What an Asset event says about a publish: the refresh's mode and what changed in the table.
PUBLISH_EVENT_FIELDS = (
    "mode",
    "reason",
    "feature_version",
    "models",
    "rows",
    "rows_written",
    "new",
    "changed",
    "removed",
)


def published_change(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Asset event's extra for a refresh part that published; None when it published nothing
    (a part that only computed its share, a retry of a published plan, or nothing changed)."""
    if not result.get("published"):
        return None
    return {k: result[k] for k in PUBLISH_EVENT_FIELDS if k in result}


def summarize_run(context: dict[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    """Combine every stage's counts, record them in `pipeline_runs`, release the run lease.

    `results` maps a stage's task id to its XCom, or to the list of XComs of its mapped tasks.
    """
    feature_version, counts = runs.run_counts(results)
    settings = settings_for(context)
    failed = runs.failed_stages(counts, settings.failure_max_share, settings.failure_min_items)
    if failed:
        counts["failed_stages"] = failed
    dag_run = context["dag_run"]
    run_type = getattr(dag_run.run_type, "value", dag_run.run_type)
    runs.record_run(
        settings.db_url,
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
        run_type=str(run_type),
        data_interval=(context.get("data_interval_start"), context.get("data_interval_end")),
        feature_version=feature_version,
        counts=counts,
    )
    runs.release_run_lease(settings.db_url, dag_run.dag_id, dag_run.run_id)
    log.info(
        "run summary: %s",
        "; ".join(f"{stage} " + ", ".join(f"{k}={v}" for k, v in c.items()) for stage, c in counts.items()),
    )
    if failed:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            "The run achieved too little: "
            + "; ".join(f"{stage}: {why}" for stage, why in failed.items())
            + f" (limits: all items, or more than {settings.failure_max_share:.0%} of at least "
            f"{settings.failure_min_items}; Variables similarity_failure_max_share/_min_items)"
        )
    return {"run_id": dag_run.run_id, "feature_version": feature_version, **counts}


def collect_garbage(context: dict[str, Any]) -> dict[str, Any]:
    """Storage garbage collection after a run, as the Variable `similarity_storage_gc` says:
    skipped (`off`, the default), listed in the log (`dry-run`) or removed (`delete`)."""
    from airflow.sdk.exceptions import AirflowSkipException

    settings = settings_for(context)
    if settings.storage_gc == "off":
        raise AirflowSkipException("storage garbage collection is off (Variable similarity_storage_gc)")
    report = gc.collect_garbage(
        settings, dry_run=settings.storage_gc == "dry-run", min_age_s=settings.storage_gc_min_age_hours * 3600
    )
    for line in report.listing():
        log.info(line)
    return report.counts()


def evaluate_similarity(context: dict[str, Any]) -> dict[str, Any]:
    """Measure the published lists (DAG sketchfab_similarity_evaluation); one `similarity_quality` row per run.

    Returns the headline figures as XCom; the full metrics are in the row. Applies the schema
    first, so an evaluation deployed before the pipeline's next run finds its table. With no
    published lists the task is skipped with the reason.
    """
    from airflow.sdk.exceptions import AirflowSkipException

    settings = settings_from_airflow()
    db.apply_schema(settings.db_url)
    try:
        quality = evaluation.evaluate(settings, run_id=str(context["dag_run"].run_id))
    except evaluation.NothingToEvaluate as exc:  # a publish of zero lists: skipped (not green), no retries
        raise AirflowSkipException(str(exc)) from None
    methods = quality["methods"]
    return {
        "feature_version": quality["feature_version"],
        "models": quality["models"],
        "sample_size": quality["sample_size"],
        "precision_at_10": {name: m["precision"].get("10") for name, m in methods.items()},
        "coverage": quality["hubness"]["coverage"],
        "hubness_skewness": quality["hubness"]["skewness"],
        "hubness_gini": quality["hubness"]["gini"],
        "near_duplicate_pairs": quality["near_duplicates"]["count"],
    }
