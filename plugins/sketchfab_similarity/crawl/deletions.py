"""Deletions: stored models that a slice paged to its end did not list.

Each is checked with `GET /v3/models/{uid}`: 404 means deleted or made private, so the model
is marked (`sketchfab_models.deleted_at`) and its thumbnail and vector rows go (the next
refresh then drops it from every list); any other answer keeps it (it moved to another slice,
or the API could not say). Checks of one slice are resumable: deleted models are excluded
from the candidates when a killed check runs again.
"""

from __future__ import annotations

import logging
from typing import Any

from ..core.db import connect
from . import slicemap
from .crawler import Checkpoint, CrawlFilters, save_checkpoint
from .sketchfab import SketchfabAPIError, SketchfabClient
from .slices import scope_sql

log = logging.getLogger(__name__)


def check_missing(
    settings: Any,
    cp: Checkpoint,
    client: SketchfabClient,
    scope_f: dict[str, Any],
    p: slicemap.PassRow,
    filters: CrawlFilters,
) -> None:
    """Stored models of a fully paged slice that it did not list: 404 on detail = deleted."""
    candidates: list[str] = []
    if filters.min_likes == 0:  # skipped low-like models were not re-seen: they are not missing
        where, params = scope_sql(scope_f)
        in_slice, slice_params = p.row.slice.sql()
        with connect(settings.db_url) as conn, conn.cursor() as cur:
            cur.execute(
                f"SELECT uid FROM sketchfab_models WHERE {where} AND {in_slice} "  # noqa: S608
                "AND last_crawl_id IS DISTINCT FROM %s AND first_seen_at < %s ORDER BY uid",
                [*params, *slice_params, cp.id, p.started_at],
            )
            candidates = [r[0] for r in cur.fetchall()]
    deleted = kept = 0
    for uid in candidates:
        try:
            gone = client.get_model(uid) is None
        except SketchfabAPIError as exc:
            if exc.status in (401, 403):
                raise
            log.warning("Could not confirm whether %s is gone (%s); keeping it", uid, exc)
            gone = False
        if not gone:
            kept += 1
            continue
        with connect(settings.db_url) as conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE sketchfab_models SET deleted_at = now() WHERE uid = %s AND deleted_at IS NULL", (uid,)
            )
            cur.execute("DELETE FROM model_thumbnails WHERE uid = %s", (uid,))
            cur.execute("DELETE FROM model_embeddings WHERE uid = %s", (uid,))
        deleted += 1
    with connect(settings.db_url) as conn, conn.cursor() as cur:
        p.status = "done"
        p.stats = {**p.stats, "missing_deleted": deleted, "missing_kept": kept}
        slicemap.save_pass(cur, p)
        cp.stats.deleted += deleted
        cp.stats.missing_kept += kept
        save_checkpoint(cur, cp)
    if candidates:
        log.info(
            "Slice %s: %d stored model(s) not listed; %d gone (404, marked deleted), %d kept",
            p.row.slice.label(), len(candidates), deleted, kept,
        )  # fmt: skip
