"""Identical vectors searched once: a cluster of c equal vectors costs O(c), not O(c^2).

Identical thumbnails are common (placeholder images, re-uploads, one asset published many
times). Every member of a cluster scores exactly the same against every vector (`exact_scores`
is a function of the two vectors' values), so the top-N search keeps all c members of a cluster
as candidates of each of them (they tie within the rescoring margin): c^2 candidates, memory and
time growing with the square of the cluster.

Instead the search runs over the distinct vectors (one per cluster, in the order of each
cluster's first row, so ties between clusters still go to the lower uid) and each
row's list is rebuilt from its neighbouring clusters: the members of the row's own cluster and of
each listed cluster, merged by (score desc, row asc), self excluded: the same order as the
plain search. A cluster needs at most k + 1 of its members, so a row costs O(k^2) and a cluster
of c rows O(c k).

Why no other row is missed: take a row j in the true list of row i, in cluster h. Members of
h rank by row, so j is among h's first k + 1 members (i may be one of them). If h is neither i's
cluster nor listed, the list was cut and holds k clusters ranking before h (higher score, or the
same score and a lower first row); their first rows all rank before j, so j is not in the top k.

Equality is of the float32 bits: found through a 64-bit hash, then checked byte for byte. The
distinct vectors are moved to the front of the matrix for the search and put back afterwards
(`distinct_rows`), so the vectors are still held once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from . import topn

EXPAND_GROUPS = 2048
"""Clusters whose lists are rebuilt per numpy batch (bounds the batch's memory to ~100 MB)."""
CHECK_ROWS = 65536
"""Rows compared byte for byte per batch when confirming hash matches."""

RowSearch = Callable[..., tuple[np.ndarray, np.ndarray]]
"""`topn.top_n_rows`-like: (matrix, query_rows, n, tile) -> (indices, scores)."""


@dataclass
class Groups:
    """Rows grouped by identical vectors. Group g's first row is `first[g]` (ascending)."""

    group_of: np.ndarray
    """Per row: its group (index into `first`)."""
    first: np.ndarray
    members: np.ndarray
    """Rows sorted by (group, row): group g's rows are members[starts[g]:starts[g] + counts[g]]."""
    starts: np.ndarray
    counts: np.ndarray

    @property
    def duplicated(self) -> bool:
        return len(self.first) < len(self.group_of)


def row_hashes(matrix: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint of each row's float32 bits (32-bit words times fixed odd weights)."""
    words = np.ascontiguousarray(matrix, dtype=np.float32).view(np.uint32)
    weights = np.random.default_rng(0xD0B1).integers(1, 2**63, words.shape[1], dtype=np.uint64) | np.uint64(1)
    out = np.zeros(len(words), np.uint64)
    for start in range(0, len(words), CHECK_ROWS):  # uint64 copies of a slice, not of the matrix
        out[start : start + CHECK_ROWS] = words[start : start + CHECK_ROWS].astype(np.uint64) @ weights
    return out


def group_rows(matrix: np.ndarray, hashes: np.ndarray | None = None) -> Groups:
    """Group the rows of `matrix` whose float32 bits are equal."""
    total = len(matrix)
    hashes = row_hashes(matrix) if hashes is None else np.asarray(hashes).view(np.uint64)
    order = np.argsort(hashes, kind="stable")  # equal hashes: ascending rows
    sorted_hashes = hashes[order]
    run_start = np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]] if total else np.zeros(0, bool)
    rep = order[np.flatnonzero(run_start)[np.cumsum(run_start) - 1]]  # first row of each hash run
    rep_of = np.empty(total, np.int64)
    rep_of[order] = rep
    # Confirm byte for byte. Rows that differ from their run's first row (a hash collision) are
    # grouped among themselves by their bytes.
    words = (
        matrix.view(np.uint32) if matrix.dtype == np.float32 else matrix.astype(np.float32).view(np.uint32)
    )
    suspects = np.flatnonzero(rep_of != np.arange(total))
    collided = []
    for start in range(0, len(suspects), CHECK_ROWS):
        rows = suspects[start : start + CHECK_ROWS]
        collided.append(rows[~np.all(words[rows] == words[rep_of[rows]], axis=1)])
    collided = np.concatenate(collided) if collided else np.zeros(0, np.int64)
    if len(collided):
        raw = np.ascontiguousarray(words[collided]).view(np.dtype((np.void, words.shape[1] * 4))).ravel()
        _, first_at, inverse = np.unique(raw, return_index=True, return_inverse=True)
        rep_of[collided] = collided[first_at[inverse.ravel()]]
    first, group_of = np.unique(rep_of, return_inverse=True)
    members = np.argsort(group_of, kind="stable")
    counts = np.bincount(group_of, minlength=len(first))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return Groups(group_of.astype(np.int64), first, members, starts, counts)


def top_n_all(
    matrix: np.ndarray,
    n: int,
    tile: int = 2048,
    on_rows_done: Callable[[int], None] | None = None,
    groups: Groups | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`topn.top_n_all` with identical vectors searched once: the same indices and scores."""
    groups = groups or group_rows(matrix)
    if not groups.duplicated:
        return topn.top_n_all(matrix, n, tile, on_rows_done)
    with distinct_rows(matrix, groups) as unique:
        u_idx, u_scores = topn.top_n_all(unique, n, tile)
        self_scores = cluster_self_scores(unique, groups)
    rows = np.arange(len(matrix))
    return _expand(
        matrix,
        groups,
        self_scores,
        rows,
        np.arange(len(groups.first)),
        u_idx,
        u_scores,
        n,
        tile,
        on_rows_done,
    )


def top_n_rows(
    matrix: np.ndarray,
    query_rows: np.ndarray,
    n: int,
    tile: int = 2048,
    on_rows_done: Callable[[int], None] | None = None,
    groups: Groups | None = None,
    search: RowSearch = topn.top_n_rows,
) -> tuple[np.ndarray, np.ndarray]:
    """`search` (topn's or the Keras engine's top_n_rows) with identical vectors searched once."""
    query_rows = np.asarray(query_rows, dtype=np.int64)
    groups = groups or group_rows(matrix)
    if not groups.duplicated:
        return search(matrix, query_rows, n, tile, on_rows_done)
    query_groups = np.unique(groups.group_of[query_rows])
    with distinct_rows(matrix, groups) as unique:
        u_idx, u_scores = search(unique, query_groups, n, tile)
        self_scores = cluster_self_scores(unique, groups)
    return _expand(
        matrix, groups, self_scores, query_rows, query_groups, u_idx, u_scores, n, tile, on_rows_done
    )


@contextmanager
def distinct_rows(matrix: np.ndarray, groups: Groups) -> Iterator[np.ndarray]:
    """The distinct vectors (group g's at row g) as `matrix[:len(groups.first)]` for the duration of
    the block, moved there in place and put back afterwards, so the vectors stay held once.

    Group g's first row is never before row g, so moving rows down in ascending order never
    overwrites a row still to be moved, and moving them back in descending order never
    overwrites one still to be put back; duplicates are then copied from their group's first
    row (they are equal bit for bit). A matrix that is not C-contiguous writable float32 is
    copied instead.
    """
    first, count = groups.first, len(groups.first)
    if not (matrix.dtype == np.float32 and matrix.flags.c_contiguous and matrix.flags.writeable):
        yield np.ascontiguousarray(matrix[first], dtype=np.float32)
        return
    chunks = [(start, min(start + CHECK_ROWS, count)) for start in range(0, count, CHECK_ROWS)]
    for start, stop in chunks:
        matrix[start:stop] = matrix[first[start:stop]]
    try:
        yield matrix[:count]
    finally:
        for start, stop in reversed(chunks):
            matrix[first[start:stop]] = matrix[start:stop].copy()
        copies = np.flatnonzero(first[groups.group_of] != np.arange(len(matrix)))
        for start in range(0, len(copies), CHECK_ROWS):
            rows = copies[start : start + CHECK_ROWS]
            matrix[rows] = matrix[first[groups.group_of[rows]]]


def cluster_self_scores(unique: np.ndarray, groups: Groups) -> np.ndarray:
    """Per group, the score of its vector with itself (what its members score with each other);
    only groups of two or more rows need it."""
    out = np.zeros(len(groups.first), np.float32)
    multi = np.flatnonzero(groups.counts > 1)
    out[multi] = topn.exact_scores(unique, multi, multi)
    return out


def _expand(
    matrix: np.ndarray,
    groups: Groups,
    self_scores: np.ndarray,
    rows: np.ndarray,
    query_groups: np.ndarray,
    u_idx: np.ndarray,
    u_scores: np.ndarray,
    n: int,
    tile: int,
    on_rows_done: Callable[[int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Lists of `rows` from the lists of their clusters (`u_idx`, `u_scores`: row i is cluster
    query_groups[i]'s list among the distinct vectors)."""
    total = len(matrix)
    k = topn.neighbours_k(total, n)
    indices = np.empty((len(rows), k), np.int64)
    scores = np.empty((len(rows), k), np.float32)
    if k == 0 or not len(rows):
        return indices, scores
    position = np.searchsorted(query_groups, groups.group_of[rows])
    # A lone vector whose list holds only lone vectors: its cluster's list is its list.
    simple = (groups.counts[query_groups] == 1) & np.all(groups.counts[u_idx] == 1, axis=1)
    simple &= u_idx.shape[1] == k
    easy = simple[position]
    if easy.any():
        indices[easy] = groups.first[u_idx[position[easy]]]
        scores[easy] = u_scores[position[easy]]
    hard = np.flatnonzero(~simple)
    slot = np.full(len(query_groups), -1, np.int64)
    slot[hard] = np.arange(len(hard))
    row_slot = slot[position]
    by_slot = np.argsort(row_slot, kind="stable")[np.count_nonzero(easy) :]
    bounds = np.searchsorted(row_slot[by_slot], np.arange(0, len(hard) + EXPAND_GROUPS, EXPAND_GROUPS))
    for lo, hi, first_slot in zip(bounds[:-1], bounds[1:], range(0, len(hard), EXPAND_GROUPS), strict=False):
        out = by_slot[lo:hi]
        local = row_slot[out] - first_slot
        at_list = hard[first_slot : first_slot + EXPAND_GROUPS]
        own = query_groups[at_list]
        # Candidate clusters of each cluster: itself, then its list; each gives its first k + 1 rows.
        cand_groups = np.concatenate([own[:, None], u_idx[at_list]], axis=1)
        cand_scores = np.concatenate([self_scores[own][:, None], u_scores[at_list]], axis=1)
        offset = np.arange(k + 1)
        valid = offset < groups.counts[cand_groups][..., None]
        at = np.minimum(groups.starts[cand_groups][..., None] + offset, total - 1)
        member = np.where(valid, groups.members[at], total).reshape(len(own), -1)
        member_scores = (
            np.where(valid, cand_scores[..., None], -np.inf).astype(np.float32).reshape(len(own), -1)
        )
        order = np.lexsort((member, -member_scores), axis=1)[:, : k + 1]
        best = np.take_along_axis(member, order, axis=1)
        best_scores = np.take_along_axis(member_scores, order, axis=1)
        # Each row: its cluster's first k + 1 entries without itself.
        lists, list_scores, me = best[local], best_scores[local], rows[out]
        hit = lists == me[:, None]
        skip = np.where(hit.any(axis=1), hit.argmax(axis=1), k)
        take = np.arange(k) + (np.arange(k)[None, :] >= skip[:, None])
        got = np.take_along_axis(lists, take, axis=1)
        got_scores = np.take_along_axis(list_scores, take, axis=1)
        if np.any(got >= total):
            raise AssertionError("a cluster list ran short of members: the grouping is broken")
        indices[out], scores[out] = got, got_scores
    if on_rows_done:
        on_rows_done(len(rows))
    return indices, scores
