"""The exact top-N kernel against an independent float64 brute force (no database)."""

import numpy as np
import pytest
from helpers import brute_force_top_n
from sketchfab_similarity.similarity.topn import SCORE_MARGIN, exact_scores, top_n_all, top_n_rows


def unit(rows):
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def expected_lists(matrix: np.ndarray, n: int) -> list[list[int]]:
    """Float64 scores rounded to float32 (the stored `real`), sorted by (-score, index)."""
    sims = (matrix.astype(np.float64) @ matrix.astype(np.float64).T).astype(np.float32)
    out = []
    for i in range(len(matrix)):
        others = sorted((-sims[i, j], j) for j in range(len(matrix)) if j != i)
        out.append([j for _, j in others[:n]])
    return out


@pytest.mark.parametrize(
    ("total", "n", "tile", "dim"),
    [(50, 5, 32, 16), (300, 20, 64, 16), (6, 20, 32, 4), (1, 3, 32, 4), (2, 3, 32, 4), (777, 7, 128, 512),
     (1000, 20, 96, 64), (33, 40, 32, 8), (129, 64, 32, 8)],
)  # fmt: skip
def test_top_n_equals_brute_force(total, n, tile, dim):
    rng = np.random.default_rng(total)
    matrix = unit(rng.normal(size=(total, dim)))
    uids = [f"{i:032x}" for i in range(total)]
    idx, scores = top_n_all(matrix, n, tile=tile)
    expected = brute_force_top_n(uids, matrix.astype(np.float64), n)
    assert idx.shape == (total, min(n, max(total - 1, 0)))
    for i, uid in enumerate(uids):
        assert [uids[j] for j in idx[i]] == [u for u, _ in expected[uid]]
        np.testing.assert_allclose(scores[i], [s for _, s in expected[uid]], atol=1e-6)
    rows = rng.permutation(total)[: max(1, total // 3)]
    some_idx, some_scores = top_n_rows(matrix, rows, n, tile=tile)
    assert np.array_equal(some_idx, idx[rows]) and np.array_equal(some_scores, scores[rows])


def test_many_exact_ties_resolve_by_index_and_agree_between_kernels():
    # Sparse 0/1 vectors from a small pool: most scores are exactly equal to several others.
    rng = np.random.default_rng(5)
    pool = unit((rng.random((40, 512)) < 0.01).astype(np.float32) + np.eye(40, 512, dtype=np.float32))
    matrix = pool[rng.integers(0, 40, 400)]
    expected = expected_lists(matrix, 12)
    for tile in (32, 96, 2048):
        idx, _ = top_n_all(matrix, 12, tile=tile)
        assert idx.tolist() == expected
        rows_idx, _ = top_n_rows(matrix, np.arange(400)[::-1].copy(), 12, tile=tile)
        assert rows_idx[::-1].tolist() == expected


def test_ties_are_broken_by_uid_order():
    # Rows 1..4 are identical: every tie must resolve to the lowest index first.
    matrix = unit(np.array([[1, 0], [0, 1], [0, 1], [0, 1], [0, 1], [1, 1]], dtype=np.float32))
    idx, scores = top_n_all(matrix, 2, tile=32)
    assert idx[1].tolist() == [2, 3]
    assert idx[4].tolist() == [1, 2]
    assert idx[0].tolist() == [5, 1]


def test_self_is_never_a_neighbour_even_when_duplicated():
    matrix = unit(np.random.default_rng(0).normal(size=(40, 8)))
    matrix[7] = matrix[3]
    idx, scores = top_n_all(matrix, 10, tile=32)
    assert not any(i in row for i, row in enumerate(idx))
    assert idx[3][0] == 7 and idx[7][0] == 3 and scores[3][0] == scores[7][0]


def test_exact_scores_do_not_depend_on_pair_order_or_batch():
    rng = np.random.default_rng(1)
    matrix = unit(rng.normal(size=(500, 512)))
    rows, cols = rng.integers(0, 500, 5000), rng.integers(0, 500, 5000)
    batch = exact_scores(matrix, rows, cols)
    assert np.array_equal(batch, exact_scores(matrix, cols, rows))
    assert all(
        exact_scores(matrix, rows[i : i + 1], cols[i : i + 1])[0] == batch[i] for i in range(0, 5000, 97)
    )
    reference = np.einsum("ij,ij->i", matrix[rows].astype(np.float64), matrix[cols].astype(np.float64))
    assert np.max(np.abs(batch - reference)) < 1e-7


def test_margin_covers_float32_rounding():
    # The float32 product error of unit 512-d vectors, measured, is far inside the margin.
    rng = np.random.default_rng(2)
    matrix = unit(rng.normal(size=(2000, 512)))
    fast = matrix @ matrix.T
    exact = matrix.astype(np.float64) @ matrix.astype(np.float64).T
    assert np.max(np.abs(fast - exact)) < SCORE_MARGIN / 10
