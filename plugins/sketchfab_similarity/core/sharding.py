"""Split work across parallel tasks by uid, so mapped Airflow tasks never overlap.

A shard is a range of the uid space, not a hash bucket: each mapped task can then select
its own rows with a range predicate that a btree index serves, instead of every task
reading every row and keeping its own in Python. Uids are lowercase hex (`uids.py`), so
their byte order (COLLATE "C", the same as Python's and numpy's string order) is their
numeric order; sql/080 indexes the uid columns in that collation, whatever the database's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX_DIGITS = 8
"""Shards split the numbers formed by a uid's first 8 hex digits: 2**32 values, plenty for any count."""
SPACE = 16**PREFIX_DIGITS
_COLUMN = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the uids whose first 8 hex digits, as a number, lie in
    [index * 2**32 // count, (index + 1) * 2**32 // count)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"invalid shard {self.index} of {self.count}")

    @property
    def bounds(self) -> tuple[str | None, str | None]:
        """(lowest uid prefix owned, first prefix not owned) as 8 hex digits; None where the range is open."""
        lo = self.index * SPACE // self.count
        hi = (self.index + 1) * SPACE // self.count
        return (f"{lo:08x}" if lo else None, f"{hi:08x}" if hi < SPACE else None)

    def contains(self, uid: str) -> bool:
        """Byte order of the uid against the bounds: exactly what `sql_predicate` selects."""
        lo, hi = self.bounds
        return (lo is None or uid >= lo) and (hi is None or uid < hi)

    def sql_predicate(self, column: str) -> str:
        """A WHERE clause selecting this shard's rows of `column` (a uid column, from code, never from
        input); a range in the "C" collation, so an index on (column COLLATE "C") serves it."""
        if not _COLUMN.match(column):
            raise ValueError(f"not a column name: {column!r}")
        lo, hi = self.bounds
        parts = [f"{column} COLLATE \"C\" >= '{lo}'"] if lo else []
        parts += [f"{column} COLLATE \"C\" < '{hi}'"] if hi else []
        return " AND ".join(parts) or "TRUE"

    @classmethod
    def all(cls, count: int) -> list[Shard]:
        return [cls(i, count) for i in range(count)]


WHOLE = Shard()
