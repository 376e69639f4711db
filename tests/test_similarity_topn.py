import numpy as np
import pytest
from helpers import brute_force_top_n
from sketchfab_similarity.similarity import top_n_neighbours


def unit(rows):
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("total", "n", "block"), [(50, 5, 7), (300, 20, 64), (6, 20, 4), (1, 3, 4)])
def test_blocked_top_n_equals_brute_force(total, n, block):
    rng = np.random.default_rng(total)
    matrix = unit(rng.normal(size=(total, 16)))
    uids = [f"{i:032x}" for i in range(total)]
    idx, scores = top_n_neighbours(matrix, n, block_rows=block)
    expected = brute_force_top_n(uids, matrix.astype(np.float64), n)
    for i, uid in enumerate(uids):
        assert [uids[j] for j in idx[i]] == [u for u, _ in expected[uid]]
        np.testing.assert_allclose(scores[i], [s for _, s in expected[uid]], atol=1e-5)


def test_ties_are_broken_by_uid_order():
    # Rows 1..4 are identical: every tie must resolve to the lowest index first.
    matrix = unit(np.array([[1, 0], [0, 1], [0, 1], [0, 1], [0, 1], [1, 1]], dtype=np.float32))
    idx, scores = top_n_neighbours(matrix, 2, block_rows=2)
    assert idx[1].tolist() == [2, 3]
    assert idx[4].tolist() == [1, 2]
    assert idx[0].tolist() == [5, 1]


def test_self_is_never_a_neighbour():
    matrix = unit(np.random.default_rng(0).normal(size=(40, 8)))
    idx, _ = top_n_neighbours(matrix, 10, block_rows=16)
    assert not any(i in row for i, row in enumerate(idx))
