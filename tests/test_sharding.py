import random

import pytest
from sketchfab_similarity.core.sharding import SPACE, Shard


def boundary_uids(counts: list[int]) -> list[str]:
    """For every shard edge: the first and last uid on each side of it, and the ends of the space."""
    uids = {"0" * 32, "f" * 32}
    for count in counts:
        for shard in Shard.all(count):
            for edge in shard.bounds:
                if edge is not None:
                    below = f"{int(edge, 16) - 1:08x}"
                    uids |= {edge + "0" * 24, edge + "f" * 24, below + "f" * 24, below + "0" * 24}
    return sorted(uids)


COUNTS = [1, 2, 3, 5, 7, 16, 17, 1000]
rng = random.Random(10)
UIDS = boundary_uids(COUNTS) + [f"{rng.getrandbits(128):032x}" for _ in range(5000)]


@pytest.mark.parametrize("count", COUNTS)
def test_shards_partition_uids_exactly_and_evenly(count):
    shards = Shard.all(count)
    owners = [[s.index for s in shards if s.contains(u)] for u in UIDS]
    assert all(len(o) == 1 for o in owners)
    if count <= 17:
        sizes = [sum(o == [s.index] for o in owners) for s in shards]
        assert min(sizes) > 0.7 * len(UIDS) / count  # ranges of equal width: roughly balanced


@pytest.mark.parametrize("count", COUNTS)
def test_contains_is_the_numeric_range_of_the_first_eight_hex_digits(count):
    for shard in Shard.all(count):
        lo, hi = shard.index * SPACE // count, (shard.index + 1) * SPACE // count
        for uid in UIDS:
            assert shard.contains(uid) == (lo <= int(uid[:8], 16) < hi), (shard, uid)


def test_sql_predicate_names_the_bounds_and_refuses_odd_columns():
    assert Shard().sql_predicate("uid") == "TRUE"
    assert Shard(0, 2).sql_predicate("m.uid") == "m.uid COLLATE \"C\" < '80000000'"
    assert Shard(1, 2).sql_predicate("uid") == "uid COLLATE \"C\" >= '80000000'"
    assert Shard(1, 4).sql_predicate("t.uid") == (
        "t.uid COLLATE \"C\" >= '40000000' AND t.uid COLLATE \"C\" < '80000000'"
    )
    with pytest.raises(ValueError):
        Shard(0, 2).sql_predicate("uid; DROP TABLE x")


def test_invalid_shard_is_refused():
    with pytest.raises(ValueError):
        Shard(3, 3)
    with pytest.raises(ValueError):
        Shard(0, 0)
