"""The Airflow-facing edge: turn a task's context and params into stage calls.

Each function takes the Airflow context, runs one stage and returns a small
JSON-able summary (it becomes the task's XCom). The stages themselves know
nothing about Airflow.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from . import crawl, db, features, similarity, thumbnails, vectors
from .settings import Settings, describe, settings_from_airflow
from .sharding import WHOLE, Shard

log = logging.getLogger(__name__)

REFRESH_PARTS_ENV = "AIRFLOW_VAR_SIMILARITY_REFRESH_PARTS"


def settings_for(context: dict[str, Any]) -> Settings:
    params = context.get("params") or {}
    settings = settings_from_airflow(top_n=params.get("top_n"))
    return settings


def crawl_window(context: dict[str, Any], settings: Settings) -> crawl.CrawlWindow:
    """Backfills take exactly their data interval; other runs continue from the watermark."""
    run_type = getattr(context["dag_run"], "run_type", None)
    if getattr(run_type, "value", run_type) == "backfill":
        start, end = context.get("data_interval_start"), context.get("data_interval_end")
        if start is None or end is None:
            raise ValueError("A backfill run needs a data interval (give the DAG a schedule)")
        return crawl.CrawlWindow(since=start, until=end, incremental=False)
    return crawl.incremental_window(settings.db_url, timedelta(minutes=settings.crawl_overlap_minutes))


def crawl_models(context: dict[str, Any]) -> dict[str, Any]:
    settings = settings_for(context)
    log.info("settings: %s", describe(settings))
    applied = db.apply_schema(settings.db_url)
    log.info("schema applied: %s", ", ".join(applied))
    params = context.get("params") or {}
    filters = crawl.CrawlFilters(
        categories=params.get("categories") or None,
        tags=tuple(params.get("tags") or ()),
        min_likes=int(params.get("min_likes") or 0),
        max_models=params.get("max_models"),
    )
    window = crawl_window(context, settings)
    log.info("crawl window: since=%s until=%s filters=%s", window.since, window.until, filters)
    return asdict(crawl.crawl(settings, window, filters))


def download_thumbnails(context: dict[str, Any]) -> dict[str, Any]:
    return asdict(thumbnails.download_thumbnails(settings_for(context)))


def extract_features(context: dict[str, Any]) -> dict[str, Any]:
    params = context.get("params") or {}
    result = features.extract_features(settings_for(context), force=bool(params.get("force_reextract")))
    return asdict(result)


def load_vectors(context: dict[str, Any], extracted: dict[str, Any]) -> dict[str, Any]:
    return asdict(vectors.load_vectors(settings_for(context), list(extracted.get("files") or [])))


def refresh_parts(environ: Mapping[str, str] = os.environ) -> list[dict[str, int]]:
    """The shards the DAG maps refresh_similarity over, one per parallel task.

    The number of mapped tasks is part of the DAG's shape, so it is read when the DAG file
    is parsed, from the environment (AIRFLOW_VAR_SIMILARITY_REFRESH_PARTS), not from the
    metadata database.
    """
    raw = environ.get(REFRESH_PARTS_ENV, "").strip()
    count = int(raw) if raw.isdigit() else Settings().refresh_parts
    if raw and (not raw.isdigit() or count < 1):
        raise ValueError(f"{REFRESH_PARTS_ENV} must be a positive integer, got {raw!r}")
    return [{"index": s.index, "count": s.count} for s in Shard.all(count)]


def refresh_similarity(context: dict[str, Any], part: dict[str, int] | None = None) -> dict[str, Any]:
    """One part of the refresh; the last part of the run to finish publishes (see similarity.py)."""
    params = context.get("params") or {}
    stats = similarity.refresh_similarity(
        settings_for(context),
        full=bool(params.get("full_refresh")),
        shard=Shard(**part) if part else WHOLE,
        run_key=str(context["run_id"]),
    )
    return asdict(stats)
