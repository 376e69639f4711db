import pytest
from sketchfab_similarity.core.sharding import Shard


def test_shards_partition_uids_exactly():
    uids = [f"{i * 7919:08x}" + "0" * 24 for i in range(1000)]
    shards = Shard.all(7)
    owners = [[s for s in shards if s.contains(u)] for u in uids]
    assert all(len(o) == 1 for o in owners)
    sizes = [sum(s.contains(u) for u in uids) for s in shards]
    assert min(sizes) > 100  # roughly balanced


def test_invalid_shard_is_refused():
    with pytest.raises(ValueError):
        Shard(3, 3)
