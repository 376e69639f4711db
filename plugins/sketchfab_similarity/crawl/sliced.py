"""What a crawl does after its plain newest-first listing: slices, re-crawls and deletions.

- The listing reached the API's cap before the crawl's window start (a first run, an old
  backfill, a long gap): the rest is crawled through the slice map (`slicemap`), built on the
  way when there is none yet, each slice split further when it reaches the cap (`slices`).
- Rolling re-crawl: incremental runs page a share of the slices to their end again
  (`crawl_recrawl_percent`; every slice with the Param `full_recrawl`), so that models whose
  name or thumbnail changed are updated.
- A slice paged to its end that lacks a stored model is checked with `GET /v3/models/{uid}`:
  404 marks the model deleted (its thumbnail and vector rows go, so the next refresh drops it
  from every list); any other answer keeps it.

Every pass over a slice has its own checkpoint row, written with each page, so a crawl killed
at any point resumes slice by slice and page by page.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Any

from ..core.db import connect
from . import slicemap
from .crawler import (
    EXPIRED_CURSOR_STATUSES,
    Checkpoint,
    CrawlFilters,
    CrawlStats,
    CrawlWindow,
    ModelRow,
    classify_page,
    record_rejects,
    save_checkpoint,
    upsert_models,
)
from .deletions import check_missing
from .records import RejectedRecord, validate_model
from .sketchfab import LISTING_CAP_SLACK, SketchfabAPIError, SketchfabClient
from .slices import Slice, density_child, plan_child, scope_key, scope_sql, target_sample

log = logging.getLogger(__name__)

SUMMED = (
    "pages",
    "seen",
    "upserted",
    "rejected",
    "skipped_outside_window",
    "skipped_min_likes",
    "duplicates",
)
"""The per-pass counts that add up into the crawl's own."""


class SliceRefused(SketchfabAPIError):
    """The API refused a slice's filters: the slicing cannot work against this endpoint."""


def scope_filters(filters: CrawlFilters) -> dict[str, Any]:
    return {"categories": filters.categories, "tags": sorted(filters.tags)}


def query_filters(filters: CrawlFilters) -> dict[str, Any]:
    return {"categories": filters.categories, "tags": ",".join(filters.tags) or None}


def capped(records: int, cap: int) -> bool:
    return records >= cap - LISTING_CAP_SLACK


def continue_crawl(
    settings: Any, cp: Checkpoint, filters: CrawlFilters, client: SketchfabClient, full_recrawl: bool
) -> None:
    """Run (or resume) everything after the plain listing; the caller then finishes the crawl."""
    stats = cp.stats
    if stats.stopped_by == "max_models":
        return
    scope_f = scope_filters(filters)
    scope = scope_key(scope_f)
    requests_base = stats.requests - client.requests_made
    with connect(settings.db_url) as conn, conn.cursor() as cur:
        if slicemap.slicing_state(cur, cp.id) is None:
            _decide(cur, settings, cp, filters, scope, scope_f, full_recrawl)
    while True:
        with connect(settings.db_url) as conn, conn.cursor() as cur:
            p = slicemap.next_pass(cur, cp.id)
        if p is None:
            break
        if p.status == "pending":
            _page_slice(settings, cp, filters, client, scope, scope_f, p, requests_base)
        else:
            check_missing(settings, cp, client, scope_f, p, filters)
            cp.stats.requests = requests_base + client.requests_made
    with connect(settings.db_url) as conn, conn.cursor() as cur:
        counts = slicemap.pass_counts(cur, cp.id)
    stats.slices_crawled = counts.get("done", 0)
    stats.slices_split = counts.get("split", 0)
    stats.slices_capped = counts.get("capped", 0)
    if stats.slices_capped:
        log.error(
            "%d slice(s) still reached the listing cap with every facet used: their oldest models may "
            "be missing (see crawl_slice_passes with status 'capped' for crawl %d)",
            stats.slices_capped,
            cp.id,
        )


def _decide(
    cur: Any,
    settings: Any,
    cp: Checkpoint,
    filters: CrawlFilters,
    scope: str,
    scope_f: dict[str, Any],
    full_recrawl: bool,
) -> None:
    """Once per crawl, in one transaction: which slices this crawl pages after its plain listing."""
    stats, window = cp.stats, cp.window
    cap = settings.api_listing_cap
    root = slicemap.get_or_create(cur, scope, Slice())
    hit_cap = stats.stopped_by == "end of listing" and capped(stats.seen, cap)
    kind = "full" if window.since is None else "window"
    if hit_cap:
        log.warning(
            "The listing ended after %d records, at the API's cap (%d): going on through slices",
            stats.seen,
            cap,
        )
        if root.status == "active":
            _split(cur, settings, cp, scope, scope_f, root, kind, stats.seen)
        else:
            _queue_leaves(cur, settings, cp, scope, scope_f, kind, full_recrawl)
    elif stats.stopped_by == "end of listing" and window.since is None and window.until is None:
        # The plain listing was the root slice, paged to its end: check what it lacked.
        cur.execute("SELECT started_at FROM crawl_runs WHERE id = %s", (cp.id,))
        started_at = cur.fetchone()[0]
        slicemap.record_complete(cur, root.id, stats.seen)
        if root.status != "active":  # the catalogue shrank below the cap: one listing covers it again
            cur.execute("UPDATE crawl_slices SET status = 'active' WHERE id = %s", (root.id,))
            cur.execute("DELETE FROM crawl_slices WHERE parent_id = %s", (root.id,))
        slicemap.add_pass(
            cur, cp.id, root.id, "full", status="checking", records=stats.seen, started_at=started_at
        )
    elif window.incremental and stats.complete:
        leaves = slicemap.leaves(cur, scope)
        if full_recrawl:
            due = leaves
        else:
            share = settings.crawl_recrawl_percent / 100
            due = slicemap.due_leaves(
                cur, scope, slicemap.take_recrawl_credit(cur, scope, share, len(leaves))
            )
        for leaf in due:
            slicemap.add_pass(cur, cp.id, leaf.id, "full")
        if due:
            log.info("Re-crawling %d of %d slice(s) to their end", len(due), len(leaves))
    slicemap.save_slicing_state(cur, cp.id, {"hit_cap": hit_cap, "full_recrawl": full_recrawl})


def _queue_leaves(
    cur: Any,
    settings: Any,
    cp: Checkpoint,
    scope: str,
    scope_f: dict[str, Any],
    kind: str,
    full_recrawl: bool,
) -> None:
    """Queue every leaf of the map. A first load that an earlier run left unfinished (days of
    requests at the anonymous rate) skips the leaves it already paged to their end, and goes on
    with their sweeps: the newest models those leaves gained since are in this run's listing."""
    resume = kind == "full" and not full_recrawl and cp.window.until is None
    skipped = 0
    for leaf in slicemap.leaves(cur, scope):
        if resume and slicemap.completed(cur, leaf.id):
            skipped += 1
            _plan_next_sibling(
                cur, settings, cp, scope, scope_f, slicemap.PassRow(cp.id, leaf, 0, kind, "done", None, 0, 0)
            )
        else:
            slicemap.add_pass(cur, cp.id, leaf.id, kind)
    if skipped:
        log.info(
            "Continuing an unfinished first load: %d slice(s) already paged to their end are skipped", skipped
        )


def _split(
    cur: Any,
    settings: Any,
    cp: Checkpoint,
    scope: str,
    scope_f: dict[str, Any],
    row: slicemap.SliceRow,
    kind: str,
    records: int,
) -> str:
    """`row` reached the cap: queue its first child (or both facet children). Returns the pass status."""
    facet_children = row.slice.facet_split()
    if row.slice.high == row.slice.low and facet_children is None:
        slicemap.set_status(cur, row.id, "capped")
        log.error("Slice %s reached the cap and cannot be split further", row.slice.label())
        return "capped"
    slicemap.set_status(cur, row.id, "split")
    if facet_children:
        for child in facet_children:
            slicemap.add_pass(cur, cp.id, slicemap.get_or_create(cur, scope, child, row.id).id, kind)
    else:
        where, params = scope_sql(scope_f)
        in_slice, slice_params = row.slice.sql()
        sql = f"SELECT count(*) FROM sketchfab_models WHERE {where} AND {in_slice}"  # noqa: S608
        cur.execute(sql, [*params, *slice_params])
        stored = int(cur.fetchone()[0])
        target = target_sample(settings.api_listing_cap, settings.crawl_slice_fill_percent, [], stored)
        child, held = plan_child(cur, row.slice, row.slice.low, scope_f, target)
        slicemap.add_pass(cur, cp.id, slicemap.get_or_create(cur, scope, child, row.id, held).id, kind)
    log.info("Slice %s reached the cap after %d records: splitting it", row.slice.label(), records)
    return "split"


def _plan_next_sibling(
    cur: Any, settings: Any, cp: Checkpoint, scope: str, scope_f: dict[str, Any], p: Any
) -> None:
    """A sweep advances when its latest child finishes (or splits): plan the range after it."""
    row = p.row
    if row.parent_id is None or row.slice.high is None:
        return
    parent = slicemap.get_slice(cur, row.parent_id)
    if parent.slice.high is not None and row.slice.high >= parent.slice.high:
        return  # the sweep reached the top of its parent's range (facet children always do)
    siblings = slicemap.children(cur, parent.id)
    if any(s.slice.high is None or s.slice.high > row.slice.high for s in siblings):
        return  # a later child exists already
    history = slicemap.sweep_history(cur, cp.id, parent.id)
    target = target_sample(settings.api_listing_cap, settings.crawl_slice_fill_percent, history, 0)
    low = row.slice.high + 1
    target_records = settings.api_listing_cap * settings.crawl_slice_fill_percent / 100
    by_density = density_child(parent.slice, low, row.slice, p.records, target_records)
    child, held = plan_child(cur, parent.slice, low, scope_f, target, by_density)
    slicemap.add_pass(cur, cp.id, slicemap.get_or_create(cur, scope, child, parent.id, held).id, p.kind)


def _add(total: CrawlStats, before: CrawlStats, after: CrawlStats) -> None:
    for name in SUMMED:
        setattr(total, name, getattr(total, name) + getattr(after, name) - getattr(before, name))
    for reason, n in after.reject_reasons.items():
        delta = n - before.reject_reasons.get(reason, 0)
        if delta:
            total.reject_reasons[reason] = total.reject_reasons.get(reason, 0) + delta


def _page_slice(
    settings: Any,
    cp: Checkpoint,
    filters: CrawlFilters,
    client: SketchfabClient,
    scope: str,
    scope_f: dict[str, Any],
    p: slicemap.PassRow,
    requests_base: int,
) -> None:
    """Page one slice from its checkpoint to its end (or the window start), then close its pass."""
    window = CrawlWindow(since=cp.window.since if p.kind == "window" else None, until=cp.window.until)
    first_url = client.listing_url(
        {**query_filters(filters), **p.row.slice.filters()}, count=settings.page_size
    )
    pass_stats = CrawlStats.from_json(p.stats)
    pcp = Checkpoint(cp.id, cp.run_key, window, p.next_url, pass_stats, None)
    page_filters = replace(filters, max_models=None)
    url: str | None = p.next_url if p.pages else first_url
    while url is not None:
        try:
            page = client.get_page(url)
        except SketchfabAPIError as exc:
            if url == first_url and exc.status == 400:
                raise SliceRefused(
                    f"The API refused slice {p.row.slice.label()} (filters {p.row.slice.filters()} on "
                    f"{client.slice_endpoint}): {exc}. Listings past the cap need these filters; check "
                    f"SLICE_ENDPOINT and FACE_COUNT_FILTERS in crawl/sketchfab.py against the API",
                    400,
                ) from None
            if url == first_url or exc.status not in EXPIRED_CURSOR_STATUSES:
                raise
            log.warning(
                "Stored page of slice %s no longer valid (%s); restarting it", p.row.slice.label(), exc
            )
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
        before = CrawlStats.from_json(asdict(pass_stats))
        with connect(settings.db_url) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT uid FROM sketchfab_models WHERE uid = ANY(%s) AND last_crawl_id = %s", (uids, cp.id)
            )
            already_seen = {r[0] for r in cur.fetchall()}
            outcome = classify_page(records, already_seen, page_filters, pcp)
            if outcome.rows:
                upsert_models(cur, outcome.rows, cp.id)
            if outcome.rejects:
                record_rejects(cur, outcome.rejects, cp.id)
            pass_stats.pages += 1
            pass_stats.upserted += len(outcome.rows)
            p.pages += 1
            p.records += len(page.results)
            stop = outcome.stop or ("end of listing" if page.next_url is None else None)
            p.next_url = None if stop else page.next_url
            p.stats = asdict(pass_stats)
            if stop:
                p.status = _close_status(cur, settings, cp, scope, scope_f, p, stop, window)
            slicemap.save_pass(cur, p)
            if stop:
                _plan_next_sibling(cur, settings, cp, scope, scope_f, p)
            _add(cp.stats, before, pass_stats)
            cp.stats.requests = requests_base + client.requests_made
            save_checkpoint(cur, cp)
        url = p.next_url
    log.info("Slice %s: %d records in %d pages, %s", p.row.slice.label(), p.records, p.pages, p.status)


def _close_status(
    cur: Any,
    settings: Any,
    cp: Checkpoint,
    scope: str,
    scope_f: dict[str, Any],
    p: slicemap.PassRow,
    stop: str,
    window: CrawlWindow,
) -> str:
    """The pass reached its end: split a capped slice, or record a complete one."""
    if stop == "end of listing" and capped(p.records, settings.api_listing_cap):
        status = _split(cur, settings, cp, scope, scope_f, p.row, p.kind, p.records)
    elif stop == "end of listing" and window.since is None:
        slicemap.record_complete(cur, p.row.id, p.records)
        status = "checking"  # paged to its end: look for stored models it lacked
    else:
        status = "done"
    return status
