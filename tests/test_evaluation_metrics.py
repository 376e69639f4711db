"""Every evaluation metric against small cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sketchfab_similarity.evaluation import metrics, rerank

CATS = [
    frozenset({"cube"}),
    frozenset({"cube", "art"}),
    frozenset({"sphere"}),
    frozenset({"sphere", "art"}),
    frozenset(),
]


def test_precision_at_k_by_hand():
    # query 0 (cube): 1 shares cube, 2 shares nothing, 3 shares nothing -> @1 = 1, @3 = 1/3
    # query 2 (sphere): 3 shares sphere, 0 nothing, 1 nothing            -> @1 = 1, @3 = 1/3
    # query 3 (sphere, art): 1 shares art, 2 shares sphere, 0 nothing     -> @1 = 1, @3 = 2/3
    # query 4 has no category: left out.
    lists = np.array([[1, 2, 3], [3, 0, 1], [1, 2, 0], [0, 1, 2]])
    got = metrics.precision_at_k([0, 2, 3, 4], lists, CATS, ks=(1, 3, 5))
    assert got[1] == pytest.approx(1.0)
    assert got[3] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    assert got[5] is None, "k wider than the lists is not reported"


def test_precision_counts_short_lists_over_what_they_have():
    lists = np.array([[1, -1], [2, 0]])
    got = metrics.precision_at_k([0, 1], lists, CATS, ks=(2,))
    # query 0: one entry (1, shares cube) -> 1.0; query 1: 2 (no), 0 (cube) -> 0.5
    assert got[2] == pytest.approx(0.75)


def test_tags_jaccard_by_hand():
    tags = [frozenset({"a", "b"}), frozenset({"b", "c"}), frozenset({"a", "b"}), frozenset()]
    lists = np.array([[1, 2, 3]])
    got = metrics.tags_jaccard_at_k([0], lists, tags, ks=(1, 2, 3))
    # J(ab, bc) = 1/3; J(ab, ab) = 1; J(ab, {}) = 0
    assert got[1] == pytest.approx(1 / 3)
    assert got[2] == pytest.approx((1 / 3 + 1) / 2)
    assert got[3] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert metrics.tags_jaccard_at_k([3], np.array([[0]]), tags, ks=(1,)) == {1: None}


def test_occurrences_coverage():
    lists = np.array([[1, 2], [0, 2], [2, 1], [2, -1]])
    assert metrics.occurrences(lists, 5, k=2).tolist() == [1, 2, 4, 0, 0]
    assert metrics.occurrences(lists, 5, k=1).tolist() == [1, 1, 2, 0, 0]
    assert metrics.coverage(lists, 5) == pytest.approx(3 / 5)
    assert metrics.coverage(lists, 5, k=1) == pytest.approx(3 / 5)
    assert metrics.coverage(np.array([[1], [1]]), 4) == pytest.approx(1 / 4)


def test_skewness_by_hand():
    # [0, 0, 3]: mean 1, deviations -1, -1, 2; m2 = 2, m3 = 2 -> 2 / 2**1.5 = 0.7071
    assert metrics.skewness(np.array([0, 0, 3])) == pytest.approx(2 / 2**1.5)
    assert metrics.skewness(np.array([3, 3, 0])) == pytest.approx(-2 / 2**1.5)
    assert metrics.skewness(np.array([4, 4, 4])) == 0.0


def test_gini_by_hand():
    assert metrics.gini(np.array([5, 5, 5, 5])) == pytest.approx(0.0)
    # one item takes everything among 4: (2 * 4 * 8) / (4 * 8) - 5/4 = 2 - 1.25 = 0.75
    assert metrics.gini(np.array([0, 0, 8, 0])) == pytest.approx(0.75)
    # [1, 3]: 2 * (1*1 + 2*3) / (2 * 4) - 3/2 = 14/8 - 1.5 = 0.25
    assert metrics.gini(np.array([3, 1])) == pytest.approx(0.25)
    assert metrics.gini(np.array([0, 0])) == 0.0


def test_top_hubs_and_histogram():
    counts = np.array([2, 5, 0, 5, 1])
    uids = ["a", "b", "c", "d", "e"]
    assert metrics.top_hubs(counts, uids, m=3) == [("b", 5), ("d", 5), ("a", 2)]
    assert metrics.top_hubs(counts, uids, m=10)[-1] == ("e", 1), "never-recommended items are not hubs"
    assert metrics.occurrence_histogram(counts) == [1, 1, 1, 0, 0, 2]


def test_near_duplicates_from_lists():
    dup = metrics.near_duplicates(
        ["b", "a", "c"],
        [["a", "c"], ["b", "c"], ["a", "b"]],
        [[0.9995, 0.5], [0.9995, 0.2], [0.99991, 0.3]],
        threshold=0.999,
    )
    assert dup.pairs == [("a", "c", 0.99991), ("a", "b", 0.9995)]
    assert dup.saturated == 0
    full = metrics.near_duplicates(["a"], [["b", "c"]], [[1.0, 0.9999]], threshold=0.999)
    assert full.saturated == 1 and len(full.pairs) == 2
    assert metrics.near_duplicates(["a"], [["b"]], [[0.999]], 0.999).pairs == [], "strictly above"


def test_random_lists_are_seeded_distinct_and_never_the_query():
    lists = metrics.random_lists(list(range(6)), 6, 5, seed=3)
    assert lists.shape == (6, 5)
    for q, row in enumerate(lists):
        assert sorted(row.tolist()) == [i for i in range(6) if i != q]
    assert np.array_equal(lists, metrics.random_lists(list(range(6)), 6, 5, seed=3))
    assert not np.array_equal(
        metrics.random_lists(list(range(50)), 50, 5, seed=3),
        metrics.random_lists(list(range(50)), 50, 5, seed=4),
    )
    padded = metrics.random_lists([0], 3, 5, seed=0)
    assert sorted(padded[0, :2].tolist()) == [1, 2] and padded[0, 2:].tolist() == [-1, -1, -1]


def test_colour_histogram():
    red = np.zeros((4, 4, 3))
    red[..., 0] = 255
    half = red.copy()
    half[:2] = 0  # top half black
    h_red, h_half = metrics.colour_histogram(red, bins=2), metrics.colour_histogram(half, bins=2)
    assert h_red.shape == (8,)
    assert h_red[4] == pytest.approx(1.0)  # (r=1, g=0, b=0) -> bin 4, all the mass
    assert h_half[0] == pytest.approx(np.sqrt(0.5)) and h_half[4] == pytest.approx(np.sqrt(0.5))
    assert float(h_red @ h_half) == pytest.approx(np.sqrt(0.5))  # Bhattacharyya of (1) and (1/2, 1/2)


def test_exact_top_k_by_hand_with_ties_by_index():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    idx, scores = metrics.exact_top_k(pool, pool, 2, query_index=[0, 1, 2, 3])
    # 0: 2 (1.0), 3 (0.6); 1: 3 (0.8), then 0 and 2 tie at 0 -> 0; 2: 0 (1.0), 3; 3: 1 (0.8), then 0/2 tie -> 0
    assert idx.tolist() == [[2, 3], [3, 0], [0, 3], [1, 0]]
    assert scores[1].tolist() == pytest.approx([0.8, 0.0])
    penal, _ = metrics.exact_top_k(
        pool[:1], pool, 1, query_index=[0], column_penalty=np.array([0, 0, 0.5, 0])
    )
    assert penal.tolist() == [[3]], "a penalty moves item 2 (score 0.5) below item 3 (0.6)"
    small, _ = metrics.exact_top_k(pool[:1], pool[:2], 3, query_index=[0])
    assert small.tolist() == [[1, -1, -1]]


def test_csls_lowers_a_hub():
    # Item 0 is close to everyone (a hub): plain top-1 of items 1 and 2 is 0.
    pool = np.array([[1.0, 0.0, 0.0], [0.9, 0.43589, 0.0], [0.9, 0.0, 0.43589], [0.0, 0.8, 0.6]])
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    plain, _ = metrics.exact_top_k(pool, pool, 1, query_index=[0, 1, 2, 3])
    r = rerank.radii(pool, 2)
    # r by hand: cosines 0-1 0.9, 0-2 0.9, 1-2 0.81, 1-3 0.34871, 2-3 0.26154, 0-3 0.
    assert r == pytest.approx([0.9, 0.855, 0.855, 0.305125], abs=1e-4)
    csls, scores = rerank.csls_lists([1], pool, r, 2)
    assert plain[1, 0] == 0
    # 2cos - r(y): item 0: 1.8 - 0.9 = 0.9; item 2: 1.62 - 0.855 = 0.765; item 3: 0.69742 - 0.305 = 0.392
    assert csls[0].tolist() == [0, 2]
    assert scores[0, 0] == pytest.approx(1.8 - 0.9 - 0.855, abs=1e-4)
    with_hub_penalty = rerank.csls_lists([1], pool, np.array([1.2, 0.855, 0.855, 0.305125]), 1)[0]
    assert with_hub_penalty.tolist() == [[2]], "a bigger hub radius removes the hub from the list"


def test_radii_from_lists_averages_the_first_k():
    scores = np.array([[0.9, 0.7, 0.1], [0.5, np.nan, np.nan], [np.nan, np.nan, np.nan]])
    assert rerank.radii_from_lists(scores, 2).tolist() == pytest.approx([0.8, 0.5, 0.0])
