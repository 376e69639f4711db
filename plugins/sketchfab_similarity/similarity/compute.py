"""Refresh computation: the lists a part owns, by a full search or incrementally.

A full rebuild searches every list of the part (`topn`, or `topn_keras` on a device). An
incremental refresh recomputes new, changed and invalidated lists from scratch and merges new
models into the other lists, reading back only the tails they can move; what it reads must
agree with the bookkeeping, or the refresh falls back to a full rebuild.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..core.db import connect
from ..core.pgcopy import copy_out_rows
from ..core.progress import Progress
from ..core.settings import Settings
from ..core.sharding import Shard
from . import duplicates, topn, topn_keras
from .plan import BookkeepingMismatch, Plan

log = logging.getLogger(__name__)


@dataclass
class Lists:
    """Computed top-N lists: row `i` is the list of model `rows[i]` (indices into the plan's uids)."""

    rows: np.ndarray
    indices: np.ndarray
    scores: np.ndarray
    changed: np.ndarray | None = None
    """Which entries differ from the published lists (None: unknown, stage them all)."""


def shard_rows(plan: Plan, shard: Shard) -> np.ndarray:
    """Mask of the uids whose lists this part computes (byte order, as `Shard.contains`)."""
    lo, hi = shard.bounds
    mine = np.ones(len(plan.uids), dtype=bool)
    if lo is not None:
        mine &= plan.uid_bytes >= np.bytes_(lo)
    if hi is not None:
        mine &= plan.uid_bytes < np.bytes_(hi)
    return mine


def compute_full(plan: Plan, shard: Shard, tile: int, engine: str, progress: Progress) -> Lists:
    """Every list of this shard: the symmetric numpy search for the whole table, query blocks
    for a shard, or candidates from the Keras device (each gives the same lists)."""
    groups = duplicates.group_rows(plan.matrix, plan.hashes)  # identical vectors searched once
    if shard.count == 1 and engine == "numpy":
        indices, scores = duplicates.top_n_all(plan.matrix, plan.n, tile, progress.advance, groups)
        return Lists(np.arange(len(plan.uids)), indices, scores)
    rows = np.flatnonzero(shard_rows(plan, shard))
    search = topn_keras.top_n_rows if engine == "keras" else topn.top_n_rows
    indices, scores = duplicates.top_n_rows(plan.matrix, rows, plan.n, tile, progress.advance, groups, search)
    return Lists(rows, indices, scores)


LIST_ROW = np.dtype(
    [("fields", ">i2"), ("ulen", ">i4"), ("uid", "S32"), ("rlen", ">i4"), ("rank", ">i4"),
     ("slen", ">i4"), ("similar", "S32"), ("flen", ">i4"), ("score", ">f4")]
)  # fmt: skip


def old_lists(db_url: str, uids: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Rows (uid, rank, similar, score) of the published lists of these models ('S32' uids) whose
    score is at most the list's bound: the part of each list a new entry can move (binary COPY)."""
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SET LOCAL enable_hashjoin = off")  # probe the primary key per list
        rows = copy_out_rows(
            cur,
            cur.mogrify(
                "COPY (SELECT s.uid, s.rank, s.similar_uid, s.score "
                "FROM unnest(%s::text[], %s::real[]) AS t(uid, bound) "
                "JOIN model_similarity s ON s.uid = t.uid AND s.score <= t.bound) TO STDOUT (FORMAT binary)",
                ([u.decode() for u in uids.tolist()], bounds.tolist()),
            ).decode(),
            LIST_ROW,
        )
    if rows is None or not (np.all(rows["ulen"] == 32) and np.all(rows["slen"] == 32)):
        raise BookkeepingMismatch("model_similarity holds a uid that is not 32 characters long")
    return rows


def compute_incremental(plan: Plan, shard: Shard, tile: int, db_url: str, progress: Progress) -> Lists:
    """Lists to recompute from scratch, plus existing lists that new models enter."""
    total = len(plan.uids)
    k = topn.neighbours_k(total, plan.n)
    mine = shard_rows(plan, shard)
    recompute = plan.recompute[mine[plan.recompute]]
    kept = mine.copy()
    kept[plan.recompute] = False
    # A new model enters a kept list when it beats the last entry (score, then uid); a list
    # shorter than k takes every new model. Candidates come from the float32 products, with
    # the margin; `cut` is +inf for lists that are not kept (and for padding).
    full_list = plan.list_length >= k
    bar = np.where(full_list, plan.last_score, -np.inf)
    cut = np.full(topn.padded_length(total) + tile, np.inf, np.float32)
    cut[:total] = np.where(kept, np.where(full_list, bar - topn.SCORE_MARGIN, topn.REAL), np.inf)
    is_new = np.zeros(total, bool)
    is_new[plan.new] = True
    pairs: list[tuple[np.ndarray, np.ndarray]] = []

    def candidates(rows: np.ndarray, column: int, block: np.ndarray) -> None:
        new_rows = np.flatnonzero(is_new[rows])
        if len(new_rows) and kept.any():
            part = block if len(new_rows) == len(rows) else block[new_rows]
            bar_here = cut[column : column + block.shape[1]]
            cols = np.flatnonzero(part.max(axis=0) >= bar_here)  # lists any new model may enter
            a, u = np.nonzero(part[:, cols] >= bar_here[cols])
            pairs.append((column + cols[u], rows[new_rows[a]]))

    groups = duplicates.group_rows(plan.matrix, plan.hashes)
    if groups.duplicated:  # identical vectors searched once; candidate checks of new rows apart
        rec_idx, rec_scores = duplicates.top_n_rows(
            plan.matrix, recompute, plan.n, tile, progress.advance, groups
        )
        others = plan.new
    else:  # new rows of this part are query rows anyway: their products double as candidate checks
        rec_idx, rec_scores = topn.top_n_rows(
            plan.matrix, recompute, plan.n, tile, progress.advance, candidates
        )
        others = plan.new[~np.isin(plan.new, recompute)]
    for start in range(0, len(others), tile):
        rows = others[start : start + tile]
        for column in range(0, total, tile):
            candidates(rows, column, plan.matrix[rows] @ plan.matrix[column : column + tile].T)
    if not pairs:
        return Lists(recompute, rec_idx, rec_scores)
    u = np.concatenate([p[0] for p in pairs])
    a = np.concatenate([p[1] for p in pairs])
    scores = topn.exact_scores(plan.matrix, u, a)
    enters = ~full_list[u] | (scores > bar[u]) | ((scores == bar[u]) & (a < plan.last_index[u]))
    u, a, scores = u[enters], a[enters], scores[enters]
    touched = np.unique(u)
    if not len(touched):
        return Lists(recompute, rec_idx, rec_scores)

    # Entries scoring above everything that enters a list keep their place: read only the rest.
    entering = np.searchsorted(touched, u)
    bounds = np.full(len(touched), -np.inf, np.float32)
    np.maximum.at(bounds, entering, scores)
    old = old_lists(db_url, plan.uid_bytes[touched], bounds)
    old_u = np.searchsorted(touched, np.searchsorted(plan.uid_bytes, old["uid"]))
    old_s = np.searchsorted(plan.uid_bytes, old["similar"])
    old_scores = old["score"].astype(np.float32)
    old_rank = old["rank"].astype(np.int64)
    # What was read must agree with the bookkeeping: each list's tail, ending at its last entry.
    lengths = plan.list_length[touched]
    prefix = lengths - np.bincount(old_u, minlength=len(touched))
    last_rows = old_rank == lengths[old_u]
    if not (
        np.all(prefix >= 0)
        and np.all((old_rank > prefix[old_u]) & (old_rank <= lengths[old_u]))
        and last_rows.sum() == np.count_nonzero((lengths > 0) & (bounds >= plan.last_score[touched]))
        and np.array_equal(old_s[last_rows], plan.last_index[touched][old_u[last_rows]])
        and np.array_equal(old_scores[last_rows], plan.last_score[touched][old_u[last_rows]])
    ):
        raise BookkeepingMismatch("published lists differ from similarity_members")
    # New tails: the entries read plus the entering ones, best first, ties by uid.
    all_u = np.concatenate([old_u, entering])
    all_s = np.concatenate([old_s, a])
    all_scores = np.concatenate([old_scores, scores])
    order = np.lexsort((all_s, -all_scores, all_u))
    all_u, all_s, all_scores = all_u[order], all_s[order], all_scores[order]
    position = prefix[all_u] + np.arange(len(all_u)) - np.searchsorted(all_u, all_u)
    fits = position < k
    merged_s = np.full((len(touched), k), -1, np.int64)
    merged_scores = np.full((len(touched), k), np.nan, np.float32)
    merged_s[all_u[fits], position[fits]] = all_s[fits]
    merged_scores[all_u[fits], position[fits]] = all_scores[fits]
    # Only entries that differ from the published list are written.
    before_s = np.full((len(touched), k), -1, np.int64)
    before_scores = np.full((len(touched), k), np.nan, np.float32)
    before_s[old_u, old_rank - 1] = old_s
    before_scores[old_u, old_rank - 1] = old_scores
    in_tail = np.arange(k) >= prefix[:, None]
    changed = in_tail & ((before_s != merged_s) | (before_scores != merged_scores))
    progress.advance(len(touched))
    return Lists(
        np.concatenate([recompute, touched]),
        np.concatenate([rec_idx, merged_s]),
        np.concatenate([rec_scores, merged_scores]),
        np.concatenate([np.ones(rec_idx.shape, bool), changed]),
    )


def compute(plan: Plan, shard: Shard, settings: Settings, progress: Progress) -> Lists | None:
    if plan.mode == "none":
        return None
    if plan.mode == "full":
        engine = topn_keras.choose_engine(settings.refresh_engine)
        log.info("full rebuild on the %s engine", engine)
        return compute_full(plan, shard, settings.refresh_tile, engine, progress)
    return compute_incremental(plan, shard, settings.refresh_tile, settings.db_url, progress)
