"""Hubness mitigation: CSLS re-ranking (cross-domain similarity local scaling, Conneau et al. 2018).

In high dimensions a few vectors sit close to many others ("hubs") and appear in most
nearest-neighbour lists. CSLS discounts a candidate y by how crowded its neighbourhood is:

    csls(x, y) = 2 cos(x, y) - r(x) - r(y),   r(v) = mean cosine of v to its k nearest neighbours

r(x) is the same for every candidate of x, so x's list is ordered by 2 cos(x, y) - r(y). A
hub has a large r(y) and drops; a model in a sparse region can now appear. The lists stay
exact and deterministic (float64 scores over the whole pool, ties by uid), like the
published ones. Off by default (`similarity_hubness_rerank=none`); when on, the evaluation
records the re-ranked lists' metrics beside the published lists' (published lists unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .metrics import exact_top_k


def radii_from_lists(scores: np.ndarray, k: int) -> np.ndarray:
    """r(v) for every row of top-N list scores (best first, nan-padded): mean of the first k.
    A row with fewer than k scores averages what it has; a row with none gets 0."""
    head = np.asarray(scores, dtype=np.float64)[:, :k]
    counts = np.sum(~np.isnan(head), axis=1)
    sums = np.nansum(head, axis=1)
    return np.divide(sums, counts, out=np.zeros(len(head)), where=counts > 0)


def radii(vectors: np.ndarray, k: int) -> np.ndarray:
    """r(v) for every vector of a pool, computed exactly (self excluded)."""
    _, scores = exact_top_k(vectors, vectors, k, query_index=np.arange(len(vectors)))
    return radii_from_lists(scores, k)


def csls_lists(
    query_index: Sequence[int], pool_vectors: np.ndarray, pool_radii: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-n CSLS lists of the given queries against the whole pool: (indices, csls scores).

    The scores include -r(x), so they are the full CSLS values, comparable across queries.
    """
    query_index = np.asarray(query_index, dtype=np.int64)
    idx, partial = exact_top_k(
        pool_vectors[query_index],
        pool_vectors,
        n,
        query_index=query_index,
        column_penalty=pool_radii,
        scale=2.0,
    )
    return idx, partial - np.asarray(pool_radii, dtype=np.float64)[query_index][:, None]
