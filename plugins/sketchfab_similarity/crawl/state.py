"""What a crawl remembers between pages and runs: its window and filters, its counts, the
checkpoint it resumes from (`crawl_runs`) and the watermark incremental runs start from.

The checkpoint is written in the same transaction as each page's models (see `crawler.py`),
so a crawl killed at any point resumes after the last committed page.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from psycopg2.extras import Json

from ..core.db import connect

log = logging.getLogger(__name__)

WATERMARK_KEY = "watermark"


@dataclass(frozen=True)
class CrawlWindow:
    """Publication times [since, until); None means unbounded on that side."""

    since: datetime | None = None
    until: datetime | None = None
    incremental: bool = True
    """Incremental windows advance the stored watermark when the crawl succeeds."""


@dataclass(frozen=True)
class CrawlFilters:
    categories: str | None = None
    tags: tuple[str, ...] = ()
    min_likes: int = 0
    max_models: int | None = None

    def selection(self) -> dict[str, Any]:
        """The filters that decide which models belong to the crawled set (max_models only truncates)."""
        return {"categories": self.categories, "tags": sorted(self.tags), "min_likes": self.min_likes}

    def as_json(self) -> dict[str, Any]:
        return {**self.selection(), "max_models": self.max_models}


NO_FILTERS = CrawlFilters()


@dataclass
class CrawlStats:
    run_key: str = ""
    crawl_id: int = 0
    resumed: bool = False
    complete: bool = False
    """True when the crawl reached the start of its window or the end of the listing."""
    stopped_by: str | None = None
    """'window' (reached `since`), 'end of listing' or 'max_models'; None while running."""
    pages: int = 0
    seen: int = 0
    upserted: int = 0
    rejected: int = 0
    skipped_outside_window: int = 0
    skipped_min_likes: int = 0
    duplicates: int = 0
    cleaned: int = 0
    """Models kept after cleaning a field (see sketchfab_models.cleaned)."""
    reject_reasons: dict[str, int] = field(default_factory=dict)
    window_since: str | None = None
    window_until: str | None = None
    watermark: str | None = None
    requests: int = 0
    slices_crawled: int = 0
    """Slices paged after the listing met the API's cap, or re-crawled (see crawl/sliced.py)."""
    slices_split: int = 0
    slices_capped: int = 0
    """Slices that reached the cap with nothing left to split them by (their oldest models may be missing)."""
    deleted: int = 0
    """Stored models a fully paged slice lacked and the API answered 404 for: marked deleted."""
    missing_kept: int = 0
    """Stored models a fully paged slice lacked but the API still serves (moved to another slice)."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CrawlStats:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def watermark_name(filters: CrawlFilters = NO_FILTERS) -> str:
    """Unfiltered crawls share one watermark; a filtered crawl covers only its subset, so it keeps its own."""
    selection = filters.selection()
    if selection == NO_FILTERS.selection():
        return WATERMARK_KEY
    return f"{WATERMARK_KEY}:{json.dumps(selection, sort_keys=True)}"


def read_watermark(db_url: str, filters: CrawlFilters = NO_FILTERS) -> datetime | None:
    with connect(db_url) as conn, conn.cursor() as cur:
        return read_watermark_in(cur, watermark_name(filters))


def read_watermark_in(cur: Any, name: str) -> datetime | None:
    cur.execute("SELECT value->>'published_at' FROM pipeline_state WHERE name = %s", (name,))
    row = cur.fetchone()
    return datetime.fromisoformat(row[0]) if row and row[0] else None


def incremental_window(db_url: str, overlap: timedelta, filters: CrawlFilters = NO_FILTERS) -> CrawlWindow:
    watermark = read_watermark(db_url, filters)
    return CrawlWindow(since=None if watermark is None else watermark - overlap, incremental=True)


def advance_watermark(cur: Any, name: str, newest: datetime) -> None:
    """Move the watermark forward only (a smaller run never moves it back)."""
    cur.execute(
        """
        INSERT INTO pipeline_state (name, value) VALUES (%s, jsonb_build_object('published_at', %s::text))
        ON CONFLICT (name) DO UPDATE SET
            value = CASE WHEN (pipeline_state.value->>'published_at')::timestamptz >= %s::timestamptz
                         THEN pipeline_state.value ELSE EXCLUDED.value END,
            updated_at = now()
        """,
        (name, newest.isoformat(), newest.isoformat()),
    )


def default_run_key(window: CrawlWindow, filters: CrawlFilters) -> str:
    """Outside Airflow: the same window and filters give the same key, so calling crawl() again resumes."""
    spec = {
        "since": window.since.isoformat() if window.since else None,
        "until": window.until.isoformat() if window.until else None,
        "incremental": window.incremental,
        **filters.as_json(),
    }
    return "adhoc:" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    """Where a crawl stands; written with every page, in the page's own transaction."""

    id: int
    run_key: str
    window: CrawlWindow
    next_url: str | None
    stats: CrawlStats
    newest: datetime | None

    @property
    def started(self) -> bool:
        return self.stats.pages > 0


def open_checkpoint(db_url: str, run_key: str, window: CrawlWindow, filters: CrawlFilters) -> Checkpoint:
    """Resume the unfinished crawl under `run_key` (same filters), or start a new one."""
    wanted = filters.as_json()
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('crawl_runs'), hashtext(%s))", (run_key,))
        cur.execute(
            """
            SELECT id, window_since, window_until, incremental, filters, next_url, newest_published_at, stats
            FROM crawl_runs WHERE run_key = %s AND status IN ('running', 'failed')
            """,
            (run_key,),
        )
        row = cur.fetchone()
        if row is not None and row[4] == wanted:
            crawl_id, since, until, incremental, _, next_url, newest, stats = row
            cur.execute(
                "UPDATE crawl_runs SET status = 'running', attempts = attempts + 1, updated_at = now() "
                "WHERE id = %s",
                (crawl_id,),
            )
            resumed = CrawlStats.from_json(stats)
            resumed.resumed = True
            return Checkpoint(
                crawl_id, run_key, CrawlWindow(since, until, incremental), next_url, resumed, newest
            )
        if row is not None:
            log.warning("Crawl %s was started with other filters %s; starting over", run_key, row[4])
            cur.execute("UPDATE crawl_runs SET status = 'superseded' WHERE id = %s", (row[0],))
        stats = CrawlStats(
            run_key=run_key,
            window_since=window.since.isoformat() if window.since else None,
            window_until=window.until.isoformat() if window.until else None,
        )
        cur.execute(
            """
            INSERT INTO crawl_runs (run_key, status, window_since, window_until, incremental, filters)
            VALUES (%s, 'running', %s, %s, %s, %s) RETURNING id
            """,
            (run_key, window.since, window.until, window.incremental, Json(wanted)),
        )
        stats.crawl_id = cur.fetchone()[0]
        return Checkpoint(stats.crawl_id, run_key, window, None, stats, None)


def save_checkpoint(cur: Any, cp: Checkpoint) -> None:
    cur.execute(
        """
        UPDATE crawl_runs SET next_url = %s, pages = %s, newest_published_at = %s, stats = %s,
                              updated_at = now()
        WHERE id = %s
        """,
        (cp.next_url, cp.stats.pages, cp.newest, Json(asdict(cp.stats)), cp.id),
    )


def mark_failed(db_url: str, crawl_id: int, error: BaseException) -> None:
    """Best effort: the error is logged by the caller anyway, and the checkpoint is already saved."""
    try:
        with connect(db_url) as conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE crawl_runs SET status = 'failed', error = %s, updated_at = now() WHERE id = %s",
                (f"{type(error).__name__}: {error}"[:2000], crawl_id),
            )
    except Exception:
        log.exception("Could not record the crawl failure (the checkpoint itself is intact)")
