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

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg2.extras import Json, execute_values

from ..core.db import connect
from ..core.progress import Progress
from ..core.settings import Settings
from .records import ModelRow, judge, storable
from .sketchfab import SketchfabAPIError, SketchfabClient
from .state import (
    NO_FILTERS,
    Checkpoint,
    CrawlFilters,
    CrawlStats,
    CrawlWindow,
    advance_watermark,
    default_run_key,
    mark_failed,
    open_checkpoint,
    read_watermark_in,
    save_checkpoint,
    watermark_name,
)

log = logging.getLogger(__name__)

EXPIRED_CURSOR_STATUSES = (400, 404, 410)
MAX_LISTING_RESTARTS = 1
"""How often one crawl call restarts the listing after the API refused a stored cursor; an API
that keeps refusing a later page must fail the crawl, not loop over the first pages for hours."""
WATERMARK_SKEW = timedelta(minutes=5)
"""The watermark never passes the crawl's start plus this: a record dated in the future must not
make the next runs skip real models published before that date."""


UPSERT_MODELS = """
INSERT INTO sketchfab_models
    (uid, name, author, published_at, like_count, view_count, tags, categories, viewer_url, thumbnails, raw,
     last_crawl_id, cleaned)
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
    cleaned = EXCLUDED.cleaned,
    last_seen_at = now(),
    deleted_at = NULL
"""


def upsert_models(cur: Any, rows: list[ModelRow], crawl_id: int | None = None) -> None:
    values = [
        (
            r.uid, r.name, r.author, r.published_at, r.like_count, r.view_count,
            r.tags, r.categories, r.viewer_url, Json(r.thumbnails), Json(r.raw), crawl_id,
            Json(r.cleaned) if r.cleaned else None,
        )
        for r in rows
    ]  # fmt: skip
    execute_values(cur, UPSERT_MODELS, values)


def record_rejects(cur: Any, rejects: list[tuple[Any, str]], crawl_id: int | None = None) -> None:
    # The same record twice in one statement would make ON CONFLICT touch a row twice: dedupe first.
    unique: dict[tuple[str, str], tuple[Any, str, int | None]] = {}
    for raw, reason in rejects:
        value, _ = storable(raw)
        unique[json.dumps(value, sort_keys=True), reason] = (Json(value), reason, crawl_id)
    execute_values(
        cur,
        """
        INSERT INTO crawl_rejects (raw, reason, crawl_id) VALUES %s
        ON CONFLICT (md5(raw::text), reason) DO UPDATE SET crawl_id = EXCLUDED.crawl_id, last_seen_at = now()
        """,
        list(unique.values()),
    )


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
        stats.cleaned += bool(row.cleaned)
    if out.stop is None and quota_reached():
        out.stop = "max_models"
    return out


def store_page(cur: Any, results: list[Any], filters: CrawlFilters, cp: Checkpoint) -> PageOutcome:
    """One page in the caller's transaction: judge every record (a bad one is a reject, never a
    failed page), skip models this crawl already took, upsert the rest, record the rejects."""
    now = datetime.now(UTC)
    records: list[tuple[Any, ModelRow | str]] = [(raw, judge(raw, now)) for raw in results]
    uids = [v.uid for _, v in records if isinstance(v, ModelRow)]
    cur.execute("SELECT uid FROM sketchfab_models WHERE uid = ANY(%s) AND last_crawl_id = %s", (uids, cp.id))
    already_seen = {r[0] for r in cur.fetchall()}
    outcome = classify_page(records, already_seen, filters, cp)
    if outcome.rows:
        upsert_models(cur, outcome.rows, cp.id)
    if outcome.rejects:
        record_rejects(cur, outcome.rejects, cp.id)
    return outcome


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
    restarts, visited = 0, set()
    while url is not None:
        if url in visited:
            raise SketchfabAPIError(
                f"The listing loops: 'next' leads back to {client.redact(url)}, already read in this crawl"
            )
        visited.add(url)
        try:
            page = client.get_page(url)
        except SketchfabAPIError as exc:
            if url == first_url or exc.status not in EXPIRED_CURSOR_STATUSES:
                raise
            if restarts >= MAX_LISTING_RESTARTS:
                raise SketchfabAPIError(
                    f"The API refused a page again after the listing was restarted: {exc}", exc.status
                ) from None
            restarts += 1
            visited.clear()
            # A stored cursor the API no longer accepts: start from the top. Models this crawl
            # already took are recognised (last_crawl_id) and counted as duplicates, not twice.
            log.warning("Stored page no longer valid (%s); restarting the listing from the first page", exc)
            url = first_url
            continue
        with connect(settings.db_url) as conn, conn.cursor() as cur:
            outcome = store_page(cur, page.results, filters, cp)
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
            cur.execute("SELECT started_at FROM crawl_runs WHERE id = %s", (cp.id,))
            ceiling = cur.fetchone()[0] + WATERMARK_SKEW
            if cp.newest > ceiling:
                log.warning(
                    "Newest publication time %s is in the future; the watermark stops at %s",
                    cp.newest.isoformat(),
                    ceiling.isoformat(),
                )
            advance_watermark(cur, name, min(cp.newest, ceiling))
        watermark = read_watermark_in(cur, name)
        cp.stats.watermark = watermark.isoformat() if watermark else None
        save_checkpoint(cur, cp)
        cur.execute(
            "UPDATE crawl_runs SET status = 'succeeded', error = NULL, finished_at = now() WHERE id = %s",
            (cp.id,),
        )
