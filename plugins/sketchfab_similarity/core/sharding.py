"""Split work across parallel tasks by uid, so mapped Airflow tasks never overlap."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the uids whose first 8 hex digits are `index` modulo `count`."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"invalid shard {self.index} of {self.count}")

    def contains(self, uid: str) -> bool:
        return self.count == 1 or int(uid[:8], 16) % self.count == self.index

    @classmethod
    def all(cls, count: int) -> list[Shard]:
        return [cls(i, count) for i in range(count)]


WHOLE = Shard()
