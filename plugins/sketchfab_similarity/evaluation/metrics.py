"""Quality metrics of recommendation lists: pure numpy, no database, no files.

A list set is an int array `lists` of shape (queries, k): row r holds pool indices of the
models recommended to query r, best first, padded with -1. `queries[r]` is the query's own
pool index. Labels (categories, tags) are one frozenset of strings per pool item. Every
function here is deterministic: ties are broken by pool index, and pools are kept in uid
order, so by uid like the published lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KS = (1, 5, 10, 20)
"""The k of precision@k and tags Jaccard@k."""
HUB_K = 10
"""Hubness and coverage count occurrences in the first HUB_K entries of every list."""
TOP_HUBS = 10


def _rows(lists: np.ndarray) -> list[np.ndarray]:
    return [row[row >= 0] for row in np.asarray(lists)]


def precision_at_k(
    queries: Sequence[int], lists: np.ndarray, categories: Sequence[frozenset[str]], ks: Sequence[int] = KS
) -> dict[int, float | None]:
    """Mean share of the first k recommendations that share at least one category with their query.

    Queries without a category have no ground truth and are left out; a list shorter than k
    counts over the entries it has. None where no query counts or k exceeds the lists' width.
    """
    return _mean_at_k(queries, lists, categories, ks, lambda a, b: float(bool(a & b)))


def tags_jaccard_at_k(
    queries: Sequence[int], lists: np.ndarray, tags: Sequence[frozenset[str]], ks: Sequence[int] = KS
) -> dict[int, float | None]:
    """Mean Jaccard index |A & B| / |A | B| between a query's tags and those of its first k
    recommendations (0 for a recommendation without tags); queries without tags are left out."""
    return _mean_at_k(queries, lists, tags, ks, lambda a, b: len(a & b) / len(a | b))


def _mean_at_k(queries, lists, labels, ks, score) -> dict[int, float | None]:
    width = np.asarray(lists).shape[1] if np.asarray(lists).ndim == 2 else 0
    per_row: list[np.ndarray] = []
    for query, row in zip(queries, _rows(lists), strict=True):
        own = labels[query]
        if not own or not len(row):
            continue
        per_row.append(np.array([score(own, labels[j]) for j in row], dtype=np.float64))
    out: dict[int, float | None] = {}
    for k in ks:
        if k > width or not per_row:
            out[k] = None
        else:
            out[k] = float(np.mean([values[:k].mean() for values in per_row]))
    return out


def occurrences(lists: np.ndarray, pool_size: int, k: int = HUB_K) -> np.ndarray:
    """N_k: how often each pool item appears in the first k entries of the lists."""
    head = np.asarray(lists)[:, :k]
    return np.bincount(head[head >= 0].ravel(), minlength=pool_size)


def coverage(lists: np.ndarray, pool_size: int, k: int | None = None) -> float:
    """Share of the pool that appears in at least one list (in its first k entries)."""
    counts = occurrences(lists, pool_size, k if k is not None else np.asarray(lists).shape[1])
    return float(np.count_nonzero(counts) / pool_size) if pool_size else 0.0


def skewness(values: np.ndarray) -> float:
    """Population skewness E[(x - mean)^3] / std^3: the usual hubness score of N_k (0 if constant)."""
    x = np.asarray(values, dtype=np.float64)
    centred = x - x.mean()
    variance = float(np.mean(centred**2))
    return float(np.mean(centred**3) / variance**1.5) if variance > 0 else 0.0


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 when every item is recommended equally often,
    towards 1 when a few items take every slot."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = len(x), float(x.sum())
    if n == 0 or total == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(2.0 * np.sum(ranks * x) / (n * total) - (n + 1) / n)


def top_hubs(counts: np.ndarray, uids: Sequence[str], m: int = TOP_HUBS) -> list[tuple[str, int]]:
    """The m most recommended items with their counts, by count then uid; items never recommended are left out."""
    order = np.lexsort((np.arange(len(counts)), -np.asarray(counts)))
    return [(str(uids[i]), int(counts[i])) for i in order[:m] if counts[i] > 0]


def occurrence_histogram(counts: np.ndarray) -> list[int]:
    """h[c] = number of items recommended exactly c times (the hubness histogram)."""
    return np.bincount(np.asarray(counts, dtype=np.int64)).tolist() if len(counts) else []


@dataclass(frozen=True)
class DuplicatePairs:
    pairs: list[tuple[str, str, float]]
    """(uid, uid, cosine) with the smaller uid first, highest cosine first."""
    saturated: int
    """Lists whose every entry is above the threshold: they may hide further pairs."""


def near_duplicates(
    query_uids: Sequence[str],
    lists_uids: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    threshold: float,
) -> DuplicatePairs:
    """Pairs with cosine above `threshold`, read from top-N lists.

    Any such pair sits in both models' top-N unless a model has more than N of them, which
    `saturated` counts. Each pair is reported once.
    """
    found: dict[tuple[str, str], float] = {}
    saturated = 0
    for query, row, row_scores in zip(query_uids, lists_uids, scores, strict=True):
        above = [(uid, float(s)) for uid, s in zip(row, row_scores, strict=True) if s > threshold]
        if above and len(above) == len(row):
            saturated += 1
        for uid, s in above:
            key = (min(query, uid), max(query, uid))
            found[key] = max(s, found.get(key, s))
    pairs = sorted(((a, b, s) for (a, b), s in found.items()), key=lambda p: (-p[2], p[0], p[1]))
    return DuplicatePairs(pairs, saturated)


def random_lists(queries: Sequence[int], pool_size: int, k: int, seed: int) -> np.ndarray:
    """The random baseline: k distinct pool items per query, never the query itself (seeded)."""
    rng = np.random.default_rng(seed)
    width = min(k, pool_size - 1)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    for r, query in enumerate(queries):
        picks = rng.choice(pool_size - 1, size=width, replace=False)
        out[r, :width] = picks + (picks >= query)
    return out


def colour_histogram(pixels: np.ndarray, bins: int = 8) -> np.ndarray:
    """Joint RGB histogram (bins^3), square-rooted and L2-normalised: the cosine of two such
    vectors is the Bhattacharyya coefficient of the colour distributions. The colour baseline."""
    rgb = np.clip(np.asarray(pixels, dtype=np.float64), 0, 255).reshape(-1, 3)
    idx = np.minimum((rgb * bins / 256.0).astype(np.int64), bins - 1)
    flat = (idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2]
    hist = np.bincount(flat, minlength=bins**3).astype(np.float64)
    root = np.sqrt(hist / max(hist.sum(), 1.0))
    norm = np.linalg.norm(root)
    return root / norm if norm > 0 else root


def exact_top_k(
    query_vectors: np.ndarray,
    pool_vectors: np.ndarray,
    k: int,
    query_index: Sequence[int] | None = None,
    column_penalty: np.ndarray | None = None,
    scale: float = 1.0,
    block_cells: int = 1 << 24,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best pool items per query by scale * <q, p> - penalty[p], in float64, ties by pool index.

    `query_index[r]` (the query's own pool index) is never recommended to itself. Exact and
    deterministic: every score is computed in float64 and the cut keeps all ties at the k-th
    score before ordering by (score desc, index). Returns (indices, scores), padded with -1/nan.
    """
    pool = np.asarray(pool_vectors, dtype=np.float64)
    queries = np.asarray(query_vectors, dtype=np.float64)
    n_q, n_p = len(queries), len(pool)
    width = min(k, n_p - (1 if query_index is not None else 0))
    idx_out = np.full((n_q, k), -1, dtype=np.int64)
    score_out = np.full((n_q, k), np.nan)
    if width <= 0:
        return idx_out, score_out
    block = max(1, block_cells // max(n_p, 1))  # a block of scores stays near 128 MB of float64
    for start in range(0, n_q, block):
        scores = scale * (queries[start : start + block] @ pool.T)
        if column_penalty is not None:
            scores -= column_penalty[None, :]
        if query_index is not None:
            rows = np.arange(len(scores))
            scores[rows, np.asarray(query_index[start : start + block])] = -np.inf
        kth = -np.partition(-scores, width - 1, axis=1)[:, width - 1]
        for r, row in enumerate(scores):
            cand = np.flatnonzero(row >= kth[r])
            order = cand[np.lexsort((cand, -row[cand]))][:width]
            idx_out[start + r, :width] = order
            score_out[start + r, :width] = row[order]
    return idx_out, score_out
