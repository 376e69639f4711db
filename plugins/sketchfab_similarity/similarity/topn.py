"""Exact top-N by inner product (cosine of unit vectors), in blocks, with partial sorting.

Three ideas keep this both exact and fast on a CPU:

- **Blocked float32 matrix products** (BLAS sgemm) over tiles of rows x columns, so the
  N x N matrix never exists. For the whole table the product is symmetric, so only the
  upper triangle of tiles is computed and each tile serves both its rows and its columns:
  half the arithmetic of a plain exhaustive search.
- **Partial sorting by group maxima.** Each tile row is cut into groups of `GROUP` columns.
  The n-th largest group maximum seen so far is a lower bound on the row's n-th best
  score (n distinct groups each hold a value at least that large), so only groups whose
  maximum reaches that bound are looked at, and only their values near the bound are kept
  as candidates. No full sort or `argpartition` over a whole row ever runs.
- **Deterministic final scores.** Float32 products carry a rounding error that depends
  on how BLAS blocks the work, so the same pair could score differently in a full
  rebuild and in an incremental update. Candidates are therefore kept with a margin
  (`SCORE_MARGIN`, well above the worst-case float32 error) and rescored in float64,
  always summed in the same order, then rounded to float32 (the stored `real`). Ranking is by that
  stored score, ties broken by the lower index (rows are sorted by uid, so by uid). The
  result is a pure function of the vectors: a full rebuild and any sequence of
  incremental updates agree bit for bit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

GROUP = 32
"""Columns per group for the group-maxima bound; tiles are padded to a multiple of it."""
SCORE_MARGIN = 1e-4
"""Candidates within this of the n-th best float32 score are rescored in float64. The float32
error of a 512-d dot product of unit vectors is at most 512 * 2**-24 ~ 3e-5; twice that plus
one float32 ulp is below 1e-4, so no pair that belongs in the top n is ever missed."""
FLOOR = np.float32(-2.0)
"""Below any real cosine (vectors are unit length within 1e-3): marks masked entries."""
REAL = FLOOR + 0.5
"""Every real score is above this; masked entries are below it."""
RESCORE_CHUNK = 1024


def exact_scores(matrix: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Scores of the pairs (rows[i], cols[i]): float64 sums of exact products, rounded to float32.

    Every pair is summed by the same code over the same products (a float32 x float32
    product is exact in float64), so its score does not depend on which block, batch or
    refresh computed it, and (u, v) equals (v, u).
    """
    out = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), RESCORE_CHUNK):
        stop = start + RESCORE_CHUNK
        left = matrix[rows[start:stop]].astype(np.float64)
        right = matrix[cols[start:stop]].astype(np.float64)
        out[start:stop] = np.einsum("ij,ij->i", left, right)
    return out


@dataclass
class Candidates:
    """Running state for a set of query rows: a lower bound on each row's n-th best score
    and every (row, column, float32 score) within SCORE_MARGIN of the bound when it was seen."""

    rows: int
    n: int
    best_maxima: np.ndarray = field(init=False)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.best_maxima = np.full((self.rows, self.n), FLOOR, np.float32)

    def add(
        self,
        local_rows: np.ndarray,
        maxima: np.ndarray,
        values_of: Callable[[np.ndarray, np.ndarray], np.ndarray],
        column_of: Callable[[np.ndarray, np.ndarray], np.ndarray],
    ) -> None:
        """Take one tile: `maxima[i, g]` is the largest value of group g for row local_rows[i];
        `values_of(i, g)` returns those groups' GROUP values and `column_of(g, member)` the
        matrix column of a group's member."""
        merged = np.concatenate([self.best_maxima[local_rows], maxima], axis=1)
        best = np.partition(merged, merged.shape[1] - self.n, axis=1)[:, -self.n :]
        self.best_maxima[local_rows] = best
        cut = np.maximum(best.min(axis=1) - SCORE_MARGIN, REAL)
        sel_row, sel_group = np.nonzero(maxima >= cut[:, None])
        if not len(sel_row):
            return
        values = values_of(sel_row, sel_group)
        hit, offset = np.nonzero(values >= cut[sel_row][:, None])
        self.parts.append(
            (
                local_rows[sel_row[hit]].astype(np.int64),
                column_of(sel_group[hit].astype(np.int64), offset),
                values[hit, offset],
            )
        )

    def finish(self, matrix: np.ndarray, global_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top-k (column indices, float32 scores) of every row, best first."""
        if k == 0:
            return np.zeros((self.rows, 0), np.int64), np.zeros((self.rows, 0), np.float32)
        rows, cols, values = (np.concatenate(p) for p in zip(*self.parts, strict=True))
        self.parts.clear()
        order = np.lexsort((-values, rows))
        rows, cols, values = rows[order], cols[order], values[order]
        starts = np.searchsorted(rows, np.arange(self.rows))
        counts = np.diff(np.append(starts, len(rows)))
        if counts.min() < k:
            raise AssertionError("fewer candidates than neighbours: the group bound is broken")
        kth = values[starts + k - 1]
        keep = values >= kth[rows] - SCORE_MARGIN
        rows, cols = rows[keep], cols[keep]
        scores = exact_scores(matrix, global_rows[rows], cols)
        order = np.lexsort((cols, -scores, rows))
        rows, cols, scores = rows[order], cols[order], scores[order]
        take = np.searchsorted(rows, np.arange(self.rows))[:, None] + np.arange(k)
        return cols[take], scores[take]


def padded_length(rows: int) -> int:
    return rows + (-rows % GROUP)


def tile_rows(matrix: np.ndarray, start: int, size: int) -> np.ndarray:
    """matrix[start:start + size], zero-padded to a multiple of GROUP rows (padding is masked
    after each product); only the last tile is copied."""
    part = matrix[start : start + size]
    extra = -len(part) % GROUP
    return np.concatenate([part, np.zeros((extra, part.shape[1]), np.float32)]) if extra else part


def row_maxima(tile: np.ndarray) -> np.ndarray:
    """Per tile row, maxima of the strided groups {g, g + G, g + 2G, ...} (G = columns / GROUP).

    Strided groups let numpy take elementwise maxima of contiguous slices, several times
    faster than reducing each run of GROUP adjacent values."""
    width = tile.shape[1] // GROUP
    out = tile[:, :width].copy()
    for member in range(1, GROUP):
        np.maximum(out, tile[:, member * width : (member + 1) * width], out=out)
    return out


def row_group_values(tile: np.ndarray, rows: np.ndarray, groups: np.ndarray) -> np.ndarray:
    return tile.reshape(tile.shape[0], GROUP, -1)[rows, :, groups]


def row_group_column(tile: np.ndarray, offset: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    width = tile.shape[1] // GROUP
    return lambda groups, members: offset + groups + members * width


def column_maxima(tile: np.ndarray) -> np.ndarray:
    """Per tile column, maxima of groups of GROUP adjacent rows (fast: elementwise maxima of rows)."""
    return tile.reshape(-1, GROUP, tile.shape[1]).max(axis=1).T


def column_group_values(tile: np.ndarray, cols: np.ndarray, groups: np.ndarray) -> np.ndarray:
    return tile.reshape(-1, GROUP, tile.shape[1])[groups, :, cols]


def column_group_row(offset: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda groups, members: offset + groups * GROUP + members


def prefetched(products: Iterator, depth: int = 2) -> Iterator:
    """Run a generator of matrix products on a second thread, so BLAS works on the next tile
    while this thread selects candidates from the current one (numpy releases the GIL)."""
    done = object()
    q: queue.Queue = queue.Queue(maxsize=depth)
    errors: list[BaseException] = []
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in products:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as exc:  # re-raised in the consuming thread
            errors.append(exc)
        finally:
            q.put(done)

    thread = threading.Thread(target=produce, name="topn-gemm", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)
    if errors:
        raise errors[0]


def neighbours_k(total: int, n: int) -> int:
    return max(0, min(n, total - 1))


def top_n_all(
    matrix: np.ndarray, n: int, tile: int = 2048, on_rows_done: Callable[[int], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-n neighbours of every row among all other rows (symmetric, upper-triangle tiles).

    Returns (indices, scores), each (rows, min(n, rows - 1)), best first, ties by lower index.
    """
    total = len(matrix)
    k = neighbours_k(total, n)
    if k == 0:
        return np.zeros((total, 0), np.int64), np.zeros((total, 0), np.float32)
    tile = max(GROUP, tile // GROUP * GROUP)
    x = np.ascontiguousarray(matrix, dtype=np.float32)
    starts = list(range(0, padded_length(total), tile))
    pending = {i: Candidates(min(tile, total - s), k) for i, s in enumerate(starts)}
    indices = np.empty((total, k), np.int64)
    scores = np.empty((total, k), np.float32)

    def products() -> Iterator[tuple[int, int, np.ndarray]]:
        for i, si in enumerate(starts):
            for j in range(i, len(starts)):
                sj = starts[j]
                block = tile_rows(x, si, tile) @ tile_rows(x, sj, tile).T
                if si + tile > total:
                    block[max(0, total - si) :] = FLOOR
                if sj + tile > total:
                    block[:, max(0, total - sj) :] = FLOOR
                if i == j:
                    np.fill_diagonal(block, FLOOR)
                yield i, j, block

    for i, j, block in prefetched(products()):
        si, sj = starts[i], starts[j]
        real_i, real_j = pending[i].rows, pending[j].rows
        pending[i].add(
            np.arange(real_i),
            row_maxima(block)[:real_i],
            lambda r, g, b=block: row_group_values(b, r, g),
            row_group_column(block, sj),
        )
        if i != j:
            pending[j].add(
                np.arange(real_j),
                column_maxima(block)[:real_j],
                lambda r, g, b=block: column_group_values(b, r, g),
                column_group_row(si),
            )
        if j == len(starts) - 1:  # row block i has now met every column
            cand = pending.pop(i)
            indices[si : si + real_i], scores[si : si + real_i] = cand.finish(
                x, np.arange(si, si + real_i), k
            )
            if on_rows_done:
                on_rows_done(real_i)
    return indices, scores


def top_n_rows(
    matrix: np.ndarray,
    query_rows: np.ndarray,
    n: int,
    tile: int = 2048,
    on_rows_done: Callable[[int], None] | None = None,
    on_block: Callable[[np.ndarray, int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-n neighbours of the given rows among all rows of `matrix` (self excluded).

    Costs len(query_rows) x len(matrix); used for incremental updates and for splitting a
    full rebuild into query blocks that run on several workers. `on_block(rows, column,
    scores)` sees every product block (masked entries below REAL), so a caller can reuse it.
    """
    total = len(matrix)
    query_rows = np.asarray(query_rows, dtype=np.int64)
    k = neighbours_k(total, n)
    indices = np.empty((len(query_rows), k), np.int64)
    scores = np.empty((len(query_rows), k), np.float32)
    if k == 0 or not len(query_rows):
        return indices, scores
    tile = max(GROUP, tile // GROUP * GROUP)
    x = np.ascontiguousarray(matrix, dtype=np.float32)
    for qs in range(0, len(query_rows), tile):
        q_rows = query_rows[qs : qs + tile]
        q = x[q_rows]
        cand = Candidates(len(q_rows), k)
        local = np.arange(len(q_rows))

        def products(q=q, q_rows=q_rows) -> Iterator[tuple[int, np.ndarray]]:
            for cs in range(0, padded_length(total), tile):
                block = q @ tile_rows(x, cs, tile).T
                if cs + tile > total:
                    block[:, max(0, total - cs) :] = FLOOR
                own = np.flatnonzero((q_rows >= cs) & (q_rows < cs + block.shape[1]))
                block[own, q_rows[own] - cs] = FLOOR
                yield cs, block

        for cs, block in prefetched(products()):
            if on_block:
                on_block(q_rows, cs, block)
            cand.add(
                local,
                row_maxima(block),
                lambda r, g, b=block: row_group_values(b, r, g),
                row_group_column(block, cs),
            )
        indices[qs : qs + tile], scores[qs : qs + tile] = cand.finish(x, q_rows, k)
        if on_rows_done:
            on_rows_done(len(q_rows))
    return indices, scores
