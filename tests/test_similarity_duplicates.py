"""Identical vectors searched once: the same lists as the plain search, at a cost linear in a cluster."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_similarity_is_exact
from sketchfab_similarity import similarity
from sketchfab_similarity.similarity import duplicates, topn
from test_similarity_refresh import put_vectors, random_uids


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, total: int, dim: int, share: float, clusters: int) -> np.ndarray:
    """Random unit vectors, `share` of them copies of `clusters` of the others (scattered rows)."""
    x = unit(rng.normal(size=(total, dim)))
    copies = rng.choice(total, int(share * total), replace=False)
    sources = rng.choice(np.setdiff1d(np.arange(total), copies), clusters, replace=False)
    x[copies] = x[sources[rng.integers(0, clusters, len(copies))]]
    return x


def tied(rng: np.random.Generator, total: int, dim: int) -> np.ndarray:
    """Small-integer vectors: many identical rows and many exact score ties between distinct ones."""
    x = rng.integers(0, 3, size=(total, dim)).astype(np.float32)
    x[x.sum(axis=1) == 0, 0] = 1
    return unit(x)


def assert_same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    assert a[0].shape == b[0].shape
    assert np.array_equal(a[0], b[0]), "neighbour lists differ"
    assert np.array_equal(a[1], b[1]), "scores differ"


@pytest.mark.parametrize(
    ("seed", "total", "dim", "n", "tile"),
    [(1, 3000, 64, 20, 256), (2, 700, 16, 5, 64), (3, 60, 8, 20, 32), (4, 25, 8, 20, 32)],
)
def test_grouped_search_equals_the_plain_one(seed, total, dim, n, tile):
    rng = np.random.default_rng(seed)
    for x in (clustered(rng, total, dim, 0.4, 3), tied(rng, total, min(dim, 6))):
        groups = duplicates.group_rows(x)
        assert groups.duplicated or total < 100
        before = x.copy()
        assert_same(duplicates.top_n_all(x, n, tile, groups=groups), topn.top_n_all(x, n, tile))
        rows = rng.choice(total, max(1, total // 3), replace=False)
        assert_same(duplicates.top_n_rows(x, rows, n, tile, groups=groups), topn.top_n_rows(x, rows, n, tile))
        assert np.array_equal(x.view(np.uint32), before.view(np.uint32)), "the matrix was not put back"


@pytest.mark.parametrize("seed", range(3))
def test_distinct_rows_are_moved_in_place_and_put_back_bit_for_bit(monkeypatch, seed):
    monkeypatch.setattr(duplicates, "CHECK_ROWS", 7)  # many chunks, moves across chunk borders
    rng = np.random.default_rng(seed)
    x = clustered(rng, 300, 8, 0.5, 6)
    x[rng.choice(300, 20)] = 0.0  # a cluster of zero rows too
    before = x.copy()
    groups = duplicates.group_rows(x)
    with duplicates.distinct_rows(x, groups) as unique:
        assert np.shares_memory(unique, x)
        assert np.array_equal(unique, before[groups.first])
    assert np.array_equal(x.view(np.uint32), before.view(np.uint32))
    with pytest.raises(RuntimeError), duplicates.distinct_rows(x, groups):
        raise RuntimeError("a failing search")
    assert np.array_equal(x.view(np.uint32), before.view(np.uint32))
    float64 = before.astype(np.float64)
    with duplicates.distinct_rows(float64, groups) as unique:  # not float32: a copy, input untouched
        assert not np.shares_memory(unique, float64)
        assert np.array_equal(unique, before[groups.first])


@pytest.mark.parametrize("total", [1, 2, 3, 21, 22])
def test_all_identical_and_tiny_tables(total):
    x = np.tile(unit(np.arange(1, 9, dtype=np.float32)[None, :]), (total, 1))
    indices, scores = duplicates.top_n_all(x, 20)
    assert_same((indices, scores), topn.top_n_all(x, 20))
    for row in range(total):  # every other row, by row number
        assert indices[row].tolist() == [r for r in range(total) if r != row][:20]


def test_groups_are_exact_equality_of_bits():
    rng = np.random.default_rng(5)
    x = unit(rng.normal(size=(50, 16)))
    x[10] = x[3]
    x[11] = x[3]
    x[12] = np.nextafter(x[3], np.float32(2))  # one ulp away: a different vector
    x[13] = x[4]
    x[14], x[15] = x[5], x[5]
    x[14, 0], x[15, 0] = 0.0, -0.0  # equal as floats, not as bits: kept apart
    # A hash collision must not merge different vectors.
    hashes = np.zeros(50, np.uint64)
    groups = duplicates.group_rows(x, hashes)
    assert groups.group_of[10] == groups.group_of[11] == groups.group_of[3]
    assert groups.group_of[12] != groups.group_of[3]
    assert groups.group_of[13] == groups.group_of[4]
    assert len({groups.group_of[5], groups.group_of[14], groups.group_of[15]}) == 3
    assert len(groups.first) == 47
    assert groups.first.tolist() == sorted(groups.first.tolist())
    assert duplicates.group_rows(x).group_of.tolist() == groups.group_of.tolist()


def test_fifty_thousand_with_forty_percent_in_clusters_match_the_plain_search_row_by_row():
    """The full grouped rebuild at 50,000 vectors; rows checked against the plain per-row search
    (cluster rows included: one plain query row costs O(cluster), a whole cluster O(cluster^2))."""
    rng = np.random.default_rng(6)
    x = clustered(rng, 50_000, 48, 0.4, 5)
    groups = duplicates.group_rows(x)
    assert len(groups.first) == 30_000
    indices, scores = duplicates.top_n_all(x, 20, groups=groups)
    big = np.flatnonzero(groups.counts[groups.group_of] > 1)
    sample = np.concatenate([rng.choice(50_000, 300, replace=False), rng.choice(big, 200, replace=False)])
    plain = topn.top_n_rows(x, sample, 20)
    assert_same((indices[sample], scores[sample]), plain)
    # A cluster row's list: the 20 lowest other rows of its cluster, at its own score.
    row = big[0]
    mates = groups.members[groups.starts[groups.group_of[row]] :][: groups.counts[groups.group_of[row]]]
    assert indices[row].tolist() == [m for m in mates.tolist() if m != row][:20]


def test_a_cluster_costs_what_its_rows_cost_not_their_square(monkeypatch):
    """Count the candidates the exact kernel keeps: linear in the rows, whatever the clusters."""
    kept: list[int] = []
    real_add = topn.Candidates.add

    def counting_add(self, local_rows, maxima, values_of, column_of):
        before = sum(len(p[0]) for p in self.parts)
        real_add(self, local_rows, maxima, values_of, column_of)
        kept.append(sum(len(p[0]) for p in self.parts) - before)

    monkeypatch.setattr(topn.Candidates, "add", counting_add)
    rng = np.random.default_rng(7)
    counts = {}
    for share in (0.0, 0.4):
        kept.clear()
        x = clustered(rng, 6000, 32, share, 2) if share else unit(rng.normal(size=(6000, 32)))
        duplicates.top_n_all(x, 10, 512)
        counts[share] = sum(kept)
    # 2 clusters of 1,200 rows: searched plainly each row would keep ~1,200 candidates (2.9 M).
    assert counts[0.4] <= 1.5 * counts[0.0], counts


@pytest.mark.integration
def test_refresh_with_forty_percent_in_identical_clusters_matches_brute_force(make_settings):
    """Through the database: full rebuild, then incremental runs that add copies to the clusters,
    start a new cluster and change a cluster member; each table equals the brute-force reference."""
    rng = np.random.default_rng(8)
    settings = make_settings(top_n=10, refresh_tile=256)
    x = clustered(rng, 2500, 512, 0.4, 4)
    uids = random_uids(rng, 2500)
    put_vectors(settings, uids, x)
    first = similarity.refresh_similarity(settings)
    assert first.mode == "full" and first.rows == 2500 * 10
    assert_similarity_is_exact(settings.db_url, 10)

    more = random_uids(rng, 60)
    put_vectors(
        settings,
        more,
        np.concatenate([x[rng.integers(0, 2500, 40)], np.tile(unit(rng.normal(size=(1, 512))), (20, 1))]),
    )
    put_vectors(settings, uids[:3], np.tile(x[rng.integers(0, 2500)], (3, 1)))
    second = similarity.refresh_similarity(settings)
    assert (second.mode, second.new, second.changed) == ("incremental", 60, 3)
    assert_similarity_is_exact(settings.db_url, 10)
