"""Slices: listing queries narrow enough to page to their end under the API's cap.

A slice is a face-count range (inclusive bounds; every model has a face count, so ranges that
meet end to end cover every model, whatever its categories or license), narrowed further by
boolean facets once the range is a single value. The root slice has no extra filters: it is the
plain listing.

A slice that reaches the cap is split by a sweep over its range: children are planned one at a
time, each sized from the models already stored in that range (their count times the rate the
finished siblings showed, aiming at `crawl_slice_fill_percent` of the cap), growing at most
fourfold per step while the rate is still unknown. Sizing errors only cost a further split.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .sketchfab import FACE_COUNT_FILTERS, FACET_FILTERS

FACE_MAX = 2**62
"""Upper bound used where a range has none (`max_face_count` omitted)."""
GROWTH = 4
THIN_SAMPLE = 20
"""Below this many stored models in the rest of a range, size by listing density instead."""
"""At most this many times the stored models of the previous child, until the rate is known."""
FIRST_SHARE = 1024
"""The first child of a sweep takes 1/FIRST_SHARE of the stored models in the parent's range: the
rate (listed records per stored model) is unknown until one child is done, and can be in the
hundreds on a first run (a catalogue of millions, ten thousand stored); the growth limit then
reaches the right size in a few small slices, which cost little, where one too large costs a cap."""


@dataclass(frozen=True)
class Slice:
    """Face counts in [low, high] (high None: no bound) with boolean facets fixed."""

    low: int = 0
    high: int | None = None
    facets: tuple[tuple[str, bool], ...] = ()

    @property
    def is_root(self) -> bool:
        return self.low == 0 and self.high is None and not self.facets

    def filters(self) -> dict[str, Any]:
        """The query filters (API names from the client); the root slice has none."""
        if self.is_root:
            return {}
        low_name, high_name = FACE_COUNT_FILTERS
        out: dict[str, Any] = {low_name: self.low}
        if self.high is not None:
            out[high_name] = self.high
        out.update(self.facets)
        return out

    def key(self) -> dict[str, Any]:
        """Stored form (crawl_slices.filters)."""
        return self.filters()

    @classmethod
    def from_key(cls, data: dict[str, Any]) -> Slice:
        low_name, high_name = FACE_COUNT_FILTERS
        facets = tuple((name, bool(data[name])) for name in FACET_FILTERS if name in data)
        return cls(int(data.get(low_name, 0)), data.get(high_name), facets)

    def label(self) -> str:
        if self.is_root:
            return "all models"
        high = "inf" if self.high is None else str(self.high)
        facets = "".join(f", {name}={str(v).lower()}" for name, v in self.facets)
        return f"faces {self.low}..{high}{facets}"

    def facet_split(self) -> list[Slice] | None:
        """Children by the next unused facet (a single face count only); None when none is left."""
        if self.high != self.low:
            return None
        used = {name for name, _ in self.facets}
        for name in FACET_FILTERS:
            if name not in used:
                return [Slice(self.low, self.high, (*self.facets, (name, value))) for value in (True, False)]
        return None

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE fragment for stored models inside this slice (face count and facets)."""
        if self.is_root:
            return "TRUE", []
        parts, params = (
            ["face_count BETWEEN %s AND %s"],
            [self.low, FACE_MAX if self.high is None else self.high],
        )
        for name, value in self.facets:
            parts.append(_FACET_SQL[name])
            params.append(value)
        return " AND ".join(parts), params


# How each boolean facet reads from the stored raw record (the API's own semantics for the filters).
_FACET_SQL = {
    "downloadable": "coalesce((raw->>'isDownloadable')::boolean, false) = %s",
    "animated": "(coalesce(raw->>'animationCount', '0') <> '0') = %s",
}


def scope_sql(scope_filters: dict[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE fragment for stored models inside the crawl's own filters (categories, tags)."""
    parts, params = ["deleted_at IS NULL"], []
    if scope_filters.get("categories"):
        parts.append("categories @> ARRAY[%s]::text[]")
        params.append(scope_filters["categories"])
    if scope_filters.get("tags"):
        parts.append("tags @> %s::text[]")
        params.append(list(scope_filters["tags"]))
    return " AND ".join(parts), params


def scope_key(scope_filters: dict[str, Any]) -> str:
    """'' for the whole catalogue; otherwise the filters, so a filtered crawl keeps a map of its own."""
    kept = {k: v for k, v in scope_filters.items() if v not in (None, "", [], ())}
    return json.dumps(kept, sort_keys=True) if kept else ""


def _count(cur: Any, where: str, params: list[Any]) -> int:
    cur.execute(f"SELECT count(*) FROM sketchfab_models WHERE {where}", params)  # noqa: S608
    return int(cur.fetchone()[0])


def plan_child(
    cur: Any,
    parent: Slice,
    low: int,
    scope_filters: dict[str, Any],
    target_sample: float,
    thin_fallback: Slice | None = None,
) -> tuple[Slice, int]:
    """The next child of `parent`'s sweep, starting at face count `low`, holding about
    `target_sample` of the stored models; returns it with the stored models it holds.
    Where fewer than THIN_SAMPLE models are stored in the rest of the range (a backfill stores
    only its interval; the tail above every stored model), `thin_fallback` is used instead."""
    scope_where, scope_params = scope_sql(scope_filters)
    facet_where, facet_params = Slice(0, FACE_MAX, parent.facets).sql()
    high_bound = FACE_MAX if parent.high is None else parent.high
    base = f"{scope_where} AND {facet_where}"
    base_params = [*scope_params, *facet_params]
    rest = _count(cur, f"{base} AND face_count BETWEEN %s AND %s", [*base_params, low, high_bound])
    want = max(1, int(target_sample))
    whole = Slice(low, parent.high, parent.facets)
    if rest < THIN_SAMPLE and thin_fallback is not None:
        held = _count(
            cur,
            f"{base} AND face_count BETWEEN %s AND %s",
            [*base_params, low, thin_fallback.high or FACE_MAX],
        )
        return thin_fallback, held
    if rest <= want * 1.5:
        if low > parent.low:
            return whole, rest
        # The whole capped range again would just cap again: too little stored to size by.
        child = geometric_child(parent, low)
        return child, _count(cur, f"{base} AND face_count BETWEEN %s AND %s", [*base_params, low, child.high])
    cur.execute(
        f"SELECT face_count FROM sketchfab_models WHERE {base} AND face_count BETWEEN %s AND %s "  # noqa: S608
        "ORDER BY face_count OFFSET %s LIMIT 1",
        [*base_params, low, high_bound, want - 1],
    )
    high = int(cur.fetchone()[0])
    if parent.high is not None and high >= parent.high:
        if low > parent.low:
            return whole, rest
        high = geometric_child(parent, low).high  # ties up to the top: halve instead
    held = _count(cur, f"{base} AND face_count BETWEEN %s AND %s", [*base_params, low, high])
    return Slice(low, high, parent.facets), held


def geometric_child(parent: Slice, low: int) -> Slice:
    """Half of the (log-scale) range when nothing stored can size it."""
    high = FACE_MAX if parent.high is None else parent.high
    mid = int(math.sqrt((low + 1) * (min(high, max(low * 64, low + 4096)) + 1)))
    mid = max(low, min(mid, high - 1))
    return Slice(low, mid, parent.facets)


def density_child(parent: Slice, low: int, last: Slice, last_records: int, target_records: float) -> Slice:
    """The next range sized by the listing density (records per log face count) of the child
    before it: for stretches where too few models are stored to size by."""
    assert last.high is not None
    width = max(math.log((last.high + 1) / (last.low + 1)), 1e-6)
    scale = GROWTH if last_records <= 0 else min(GROWTH, target_records / last_records)
    high = int((low + 1) * math.exp(width * scale)) - 1
    if high >= FACE_MAX or (parent.high is not None and high >= parent.high):
        return Slice(low, parent.high, parent.facets)
    return Slice(low, max(low, high), parent.facets)


def target_sample(cap: int, fill_percent: int, done: list[tuple[int, int]], parent_sample: int) -> float:
    """Stored models the next child should hold. `done`: (records paged, stored models planned) of
    the finished children of this sweep; before any, a small share of the parent's stored models."""
    target_records = cap * fill_percent / 100
    records = sum(r for r, _ in done)
    planned = sum(max(p, 1) for _, p in done)
    if not done or records == 0:
        return max(1.0, parent_sample / FIRST_SHARE)
    rate = records / planned  # listed records per stored model in these ranges
    biggest = max(max(p, 1) for _, p in done)
    return max(1.0, min(target_records / rate, GROWTH * biggest))
