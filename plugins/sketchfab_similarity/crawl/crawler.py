"""Stage 1, crawl_models: page the API newest-first and upsert models.

A run covers a window of publication times. Incremental runs take everything
newer than the stored watermark minus an overlap (late-indexed models) and
advance the watermark when they finish; a backfill takes exactly its data
interval and leaves the watermark alone.

Every page is written in one transaction together with the crawl's checkpoint
(`crawl_runs`: next page URL, counts, newest model seen), so a crawl killed at
any point resumes after the last committed page: no gaps, no duplicates, no
starting over. Records that cannot be accepted go to `crawl_rejects` with their
reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg2.extras import Json, execute_values

from ..core.db import connect
from ..core.progress import Progress
from ..core.settings import Settings
from .records import ModelRow, RejectedRecord, validate_model
from .sketchfab import SketchfabAPIError, SketchfabClient

log = logging.getLogger(__name__)

MAX_REJECT_BYTES = 1_000_000
WATERMARK_KEY = "watermark"
EXPIRED_CURSOR_STATUSES = (400, 404, 410)


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


UPSERT_MODELS = """
INSERT INTO sketchfab_models
    (uid, name, author, published_at, like_count, view_count, tags, categories, viewer_url, thumbnails, raw,
     last_crawl_id)
VALUES %s
ON CONFLICT (uid) DO UPDATE SET
    name = EXCLUDED.name,
    author = EXCLUDED.author,
    published_at = EXCLUDED.published_at,
    like_count = EXCLUDED.like_count,
    view_count = EXCLUDED.view_count,
    tags = EXCLUDED.tags,
    categories = EXCLUDED.categories,
    viewer_url = EXCLUDED.viewer_url,
    thumbnails = EXCLUDED.thumbnails,
    raw = EXCLUDED.raw,
    last_crawl_id = EXCLUDED.last_crawl_id,
    last_seen_at = now(),
    deleted_at = NULL
"""


def upsert_models(cur: Any, rows: list[ModelRow], crawl_id: int | None = None) -> None:
    values = [
        (
            r.uid, r.name, r.author, r.published_at, r.like_count, r.view_count,
            r.tags, r.categories, r.viewer_url, Json(r.thumbnails), Json(r.raw), crawl_id,
        )
        for r in rows
    ]  # fmt: skip
    execute_values(cur, UPSERT_MODELS, values)


def record_rejects(cur: Any, rejects: list[tuple[Any, str]], crawl_id: int | None = None) -> None:
    # The same record twice in one statement would make ON CONFLICT touch a row twice: dedupe first.
    unique: dict[tuple[str, str], tuple[Any, str, int | None]] = {}
    for raw, reason in rejects:
        value = _storable(raw)
        unique[json.dumps(value, sort_keys=True), reason] = (Json(value), reason, crawl_id)
    execute_values(
        cur,
        """
        INSERT INTO crawl_rejects (raw, reason, crawl_id) VALUES %s
        ON CONFLICT (md5(raw::text), reason) DO UPDATE SET crawl_id = EXCLUDED.crawl_id, last_seen_at = now()
        """,
        list(unique.values()),
    )


def _storable(raw: Any) -> Any:
    """The raw record as JSON Postgres accepts: NULs replaced, absurdly large records cut to a prefix."""
    text = json.dumps(raw, ensure_ascii=False, default=str).replace("\\u0000", "\\ufffd")
    if len(text.encode()) > MAX_REJECT_BYTES:
        return {"truncated_json": text[: MAX_REJECT_BYTES // 4], "original_chars": len(text)}
    return json.loads(text)


def watermark_name(filters: CrawlFilters = NO_FILTERS) -> str:
    """Unfiltered crawls share one watermark; a filtered crawl covers only its subset, so it keeps its own."""
    selection = filters.selection()
    if selection == NO_FILTERS.selection():
        return WATERMARK_KEY
    return f"{WATERMARK_KEY}:{json.dumps(selection, sort_keys=True)}"


def read_watermark(db_url: str, filters: CrawlFilters = NO_FILTERS) -> datetime | None:
    with connect(db_url) as conn, conn.cursor() as cur:
        return _read_watermark(cur, watermark_name(filters))


def _read_watermark(cur: Any, name: str) -> datetime | None:
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


@dataclass
class PageOutcome:
    rows: list[ModelRow] = field(default_factory=list)
    rejects: list[tuple[Any, str]] = field(default_factory=list)
    stop: str | None = None
    """Why the crawl ends on this page: 'window' (older than `since`) or 'max_models'; None to go on."""


def classify_page(
    records: list[tuple[Any, ModelRow | str]], already_seen: set[str], filters: CrawlFilters, cp: Checkpoint
) -> PageOutcome:
    """Decide for each record of a page (newest first) what happens to it, updating the counts."""
    out = PageOutcome()
    stats, window = cp.stats, cp.window
    page_uids: set[str] = set()

    def quota_reached() -> bool:
        return filters.max_models is not None and stats.upserted + len(out.rows) >= filters.max_models

    for raw, verdict in records:
        if quota_reached():
            out.stop = "max_models"
            break
        stats.seen += 1
        if isinstance(verdict, str):
            out.rejects.append((raw, verdict))
            kind = verdict.split(":")[0]
            stats.reject_reasons[kind] = stats.reject_reasons.get(kind, 0) + 1
            stats.rejected += 1
            continue
        row = verdict
        if row.uid in already_seen or row.uid in page_uids:
            stats.duplicates += 1  # pages shifted under us: this model was already taken by this crawl
            continue
        if window.until is not None and row.published_at >= window.until:
            stats.skipped_outside_window += 1
            continue
        if window.since is not None and row.published_at < window.since:
            out.stop = "window"  # newest-first: everything after this is older still
            break
        page_uids.add(row.uid)
        cp.newest = row.published_at if cp.newest is None else max(cp.newest, row.published_at)
        if row.like_count < filters.min_likes:
            stats.skipped_min_likes += 1
            continue
        out.rows.append(row)
    if out.stop is None and quota_reached():
        out.stop = "max_models"
    return out


def crawl(
    settings: Settings,
    window: CrawlWindow,
    filters: CrawlFilters = NO_FILTERS,
    client: SketchfabClient | None = None,
    checkpoint_key: str | None = None,
    full_recrawl: bool = False,
) -> CrawlStats:
    """Upsert every model published inside `window` (newest first), page by page, resumably.

    `checkpoint_key` names the crawl (Airflow passes its run); a crawl under the same
    key that did not finish is resumed after its last committed page, with the window
    it started with. Raises SketchfabAPIError with a clear message when the API keeps
    failing after retries; the checkpoint is kept, so the next call resumes.

    When the listing meets the API's cap (`settings.api_listing_cap`) before the window's start,
    the rest of the window is crawled through slices; incremental runs also re-crawl a share of
    the slices (all with `full_recrawl`) and mark models the API no longer serves as deleted.
    """
    client = client or SketchfabClient.from_settings(settings)
    run_key = checkpoint_key or default_run_key(window, filters)
    cp = open_checkpoint(settings.db_url, run_key, window, filters)
    if cp.stats.resumed:
        log.info(
            "Resuming crawl %s after %d pages (%d models so far)", run_key, cp.stats.pages, cp.stats.upserted
        )
    try:
        _crawl_pages(settings, cp, filters, client, full_recrawl)
    except BaseException as exc:
        mark_failed(settings.db_url, cp.id, exc)
        raise
    return cp.stats


def _crawl_pages(
    settings: Settings,
    cp: Checkpoint,
    filters: CrawlFilters,
    client: SketchfabClient,
    full_recrawl: bool = False,
) -> None:
    stats = cp.stats
    first_url = client.models_url(
        count=settings.page_size,
        categories=filters.categories,
        tags=",".join(filters.tags) or None,
    )
    progress = Progress("crawl", total=filters.max_models, unit="models", log=log)
    requests_before = stats.requests
    url = cp.next_url if cp.started else first_url
    while url is not None:
        try:
            page = client.get_page(url)
        except SketchfabAPIError as exc:
            if url == first_url or exc.status not in EXPIRED_CURSOR_STATUSES:
                raise
            # A stored cursor the API no longer accepts: start from the top. Models this crawl
            # already took are recognised (last_crawl_id) and counted as duplicates, not twice.
            log.warning("Stored page no longer valid (%s); restarting the listing from the first page", exc)
            url = first_url
            continue
        now = datetime.now(UTC)
        records: list[tuple[Any, ModelRow | str]] = []
        for raw in page.results:
            try:
                records.append((raw, validate_model(raw, now)))
            except RejectedRecord as exc:
                records.append((raw, str(exc)))
        uids = [v.uid for _, v in records if isinstance(v, ModelRow)]
        with connect(settings.db_url) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT uid FROM sketchfab_models WHERE uid = ANY(%s) AND last_crawl_id = %s", (uids, cp.id)
            )
            already_seen = {r[0] for r in cur.fetchall()}
            outcome = classify_page(records, already_seen, filters, cp)
            if outcome.rows:
                upsert_models(cur, outcome.rows, cp.id)
            if outcome.rejects:
                record_rejects(cur, outcome.rejects, cp.id)
            stats.pages += 1
            stats.upserted += len(outcome.rows)
            stats.requests = requests_before + client.requests_made
            if outcome.stop is None and page.next_url is None:
                stats.stopped_by = "end of listing"
            else:
                stats.stopped_by = outcome.stop
            stats.complete = stats.stopped_by in ("window", "end of listing")
            cp.next_url = None if stats.stopped_by else page.next_url
            save_checkpoint(cur, cp)
        progress.advance(len(outcome.rows))
        url = cp.next_url

    from .sliced import continue_crawl  # after the listing: slices, re-crawls, deletions

    continue_crawl(settings, cp, filters, client, full_recrawl)
    finish(settings.db_url, cp, filters)
    progress.finish(
        f"{stats.upserted} models upserted, {stats.rejected} rejected {stats.reject_reasons}, "
        f"{stats.duplicates} duplicates, {stats.pages} pages, {stats.requests} requests, "
        f"{stats.slices_crawled} slices ({stats.slices_split} split, {stats.slices_capped} capped), "
        f"{stats.deleted} deleted, "
        f"watermark {stats.watermark}" + ("" if stats.complete else " (not advanced: stopped at max_models)")
    )


def finish(db_url: str, cp: Checkpoint, filters: CrawlFilters) -> None:
    """Close the crawl and move the watermark, in one transaction: both happen or neither."""
    name = watermark_name(filters)
    with connect(db_url) as conn, conn.cursor() as cur:
        if cp.window.incremental and cp.stats.complete and cp.newest is not None:
            advance_watermark(cur, name, cp.newest)
        watermark = _read_watermark(cur, name)
        cp.stats.watermark = watermark.isoformat() if watermark else None
        save_checkpoint(cur, cp)
        cur.execute(
            "UPDATE crawl_runs SET status = 'succeeded', error = NULL, finished_at = now() WHERE id = %s",
            (cp.id,),
        )
