"""The Airflow-facing edge: turn a task's context and params into stage calls.

Each function takes the Airflow context, runs one stage and returns a small
JSON-able summary (it becomes the task's XCom). The stages themselves know
nothing about Airflow.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from . import crawl, db, features, similarity, thumbnails, vectors
from .settings import Settings, describe, settings_from_airflow
from .sharding import WHOLE, Shard

log = logging.getLogger(__name__)


def settings_for(context: dict[str, Any]) -> Settings:
    params = context.get("params") or {}
    settings = settings_from_airflow(top_n=params.get("top_n"))
    return settings


def crawl_window(
    context: dict[str, Any], settings: Settings, filters: crawl.CrawlFilters = crawl.NO_FILTERS
) -> crawl.CrawlWindow:
    """Backfills take exactly their data interval; other runs continue from the watermark."""
    run_type = getattr(context["dag_run"], "run_type", None)
    if getattr(run_type, "value", run_type) == "backfill":
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        if start is None or end is None:
            raise ValueError("A backfill run needs a data interval (give the DAG a schedule)")
        return crawl.CrawlWindow(since=start, until=end, incremental=False)
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
    settings = settings_for(context)
    log.info("settings: %s", describe(settings))
    applied = db.apply_schema(settings.db_url)
    log.info("schema applied: %s", ", ".join(applied))
    filters = crawl_filters(context.get("params") or {})
    window = crawl_window(context, settings, filters)
    key = checkpoint_key(context)
    log.info("crawl %s: window since=%s until=%s, %s", key, window.since, window.until, filters)
    return asdict(crawl.crawl(settings, window, filters, checkpoint_key=key))


def download_thumbnails(
    context: dict[str, Any], shard: Shard | dict[str, int] | None = None
) -> dict[str, Any]:
    """Download this shard's pending thumbnails (all of them when `shard` is None)."""
    if isinstance(shard, dict):
        shard = Shard(**shard)
    return asdict(thumbnails.download_thumbnails(settings_for(context), shard=shard or WHOLE))


def extract_features(context: dict[str, Any]) -> dict[str, Any]:
    params = context.get("params") or {}
    result = features.extract_features(settings_for(context), force=bool(params.get("force_reextract")))
    return asdict(result)


def load_vectors(context: dict[str, Any], extracted: dict[str, Any]) -> dict[str, Any]:
    return asdict(vectors.load_vectors(settings_for(context), list(extracted.get("files") or [])))


def refresh_similarity(context: dict[str, Any]) -> dict[str, Any]:
    params = context.get("params") or {}
    settings = settings_for(context)
    return asdict(similarity.refresh_similarity(settings, full=bool(params.get("full_refresh"))))
