"""The slice map and each crawl's passes over it, in Postgres (`crawl_slices`, `crawl_slice_passes`).

Every function takes a cursor and runs inside the caller's transaction, so a page, its pass
checkpoint and any slices it plans commit together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg2.extras import Json

from .slices import Slice


@dataclass
class SliceRow:
    id: int
    slice: Slice
    parent_id: int | None
    status: str
    planned_sample: int | None


@dataclass
class PassRow:
    crawl_id: int
    row: SliceRow
    seq: int
    kind: str
    """'window': stop at the crawl's window start; 'full': page to the end (deletions are checked)."""
    status: str
    next_url: str | None
    pages: int
    records: int
    stats: dict[str, Any] = field(default_factory=dict)
    started_at: datetime | None = None


_SLICE_COLS = "s.id, s.filters, s.parent_id, s.status, s.planned_sample"


def _slice_row(values: tuple) -> SliceRow:
    sid, filters, parent_id, status, planned = values
    return SliceRow(sid, Slice.from_key(filters), parent_id, status, planned)


def get_or_create(
    cur: Any, scope: str, sl: Slice, parent_id: int | None = None, planned_sample: int | None = None
) -> SliceRow:
    """The slice's row, created when new (a slice planned twice is the same row)."""
    cur.execute(
        """
        INSERT INTO crawl_slices AS s (scope, filters, parent_id, planned_sample) VALUES (%s, %s, %s, %s)
        ON CONFLICT (scope, filters) DO UPDATE SET updated_at = now()
        RETURNING s.id, s.filters, s.parent_id, s.status, s.planned_sample
        """,
        (scope, Json(sl.key()), parent_id, planned_sample),
    )
    return _slice_row(cur.fetchone())


def leaves(cur: Any, scope: str) -> list[SliceRow]:
    """The slices crawls page: not split, in face-count order."""
    cur.execute(
        f"SELECT {_SLICE_COLS} FROM crawl_slices s WHERE scope = %s AND status IN ('active', 'capped') "  # noqa: S608
        "ORDER BY coalesce((filters->>'min_face_count')::bigint, 0), id",
        (scope,),
    )
    return [_slice_row(r) for r in cur.fetchall()]


def due_leaves(cur: Any, scope: str, n: int) -> list[SliceRow]:
    """The `n` leaves paged to their end longest ago (never first)."""
    cur.execute(
        f"SELECT {_SLICE_COLS} FROM crawl_slices s WHERE scope = %s AND status IN ('active', 'capped') "  # noqa: S608
        "ORDER BY last_complete_at NULLS FIRST, id LIMIT %s",
        (scope, n),
    )
    return [_slice_row(r) for r in cur.fetchall()]


def get_slice(cur: Any, slice_id: int) -> SliceRow:
    cur.execute(f"SELECT {_SLICE_COLS} FROM crawl_slices s WHERE id = %s", (slice_id,))  # noqa: S608
    return _slice_row(cur.fetchone())


def children(cur: Any, parent_id: int) -> list[SliceRow]:
    cur.execute(
        f"SELECT {_SLICE_COLS} FROM crawl_slices s WHERE parent_id = %s ORDER BY id",  # noqa: S608
        (parent_id,),
    )
    return [_slice_row(r) for r in cur.fetchall()]


def set_status(cur: Any, slice_id: int, status: str) -> None:
    cur.execute("UPDATE crawl_slices SET status = %s, updated_at = now() WHERE id = %s", (status, slice_id))


def completed(cur: Any, slice_id: int) -> bool:
    cur.execute("SELECT last_complete_at IS NOT NULL FROM crawl_slices WHERE id = %s", (slice_id,))
    return bool(cur.fetchone()[0])


def record_complete(cur: Any, slice_id: int, size: int) -> None:
    """The slice was paged to its end: its size and when (the rolling re-crawl's order)."""
    cur.execute(
        "UPDATE crawl_slices SET last_size = %s, last_complete_at = now(), updated_at = now() WHERE id = %s",
        (size, slice_id),
    )


def add_pass(
    cur: Any,
    crawl_id: int,
    slice_id: int,
    kind: str,
    *,
    status: str = "pending",
    records: int = 0,
    started_at: datetime | None = None,
) -> None:
    """Queue a slice for this crawl (after the ones already queued); a slice is paged once per crawl."""
    cur.execute(
        """
        INSERT INTO crawl_slice_passes (crawl_id, slice_id, seq, kind, status, records, started_at)
        SELECT %s, %s, coalesce(max(seq), 0) + 1, %s, %s, %s, coalesce(%s, now())
        FROM crawl_slice_passes WHERE crawl_id = %s
        ON CONFLICT (crawl_id, slice_id) DO NOTHING
        """,
        (crawl_id, slice_id, kind, status, records, started_at, crawl_id),
    )


_PASS_COLS = "p.crawl_id, p.seq, p.kind, p.status, p.next_url, p.pages, p.records, p.stats, p.started_at"


def next_pass(cur: Any, crawl_id: int) -> PassRow | None:
    """The first unfinished pass of the crawl: pending (paging) or checking (deletions)."""
    cur.execute(
        f"SELECT {_PASS_COLS}, {_SLICE_COLS} FROM crawl_slice_passes p JOIN crawl_slices s ON s.id = p.slice_id "  # noqa: S608
        "WHERE p.crawl_id = %s AND p.status IN ('pending', 'checking') ORDER BY p.seq LIMIT 1",
        (crawl_id,),
    )
    row = cur.fetchone()
    if row is None:
        return None
    crawl, seq, kind, status, next_url, pages, records, stats, started = row[:9]
    return PassRow(crawl, _slice_row(row[9:]), seq, kind, status, next_url, pages, records, stats, started)


def save_pass(cur: Any, p: PassRow) -> None:
    cur.execute(
        """
        UPDATE crawl_slice_passes SET status = %s, next_url = %s, pages = %s, records = %s, stats = %s,
            finished_at = CASE WHEN %s IN ('done', 'split', 'capped') THEN now() END
        WHERE crawl_id = %s AND slice_id = %s
        """,
        (p.status, p.next_url, p.pages, p.records, Json(p.stats), p.status, p.crawl_id, p.row.id),
    )


def sweep_history(cur: Any, crawl_id: int, parent_id: int) -> list[tuple[int, int]]:
    """(records paged, stored models planned) of the parent's children this crawl has finished."""
    cur.execute(
        """
        SELECT p.records, coalesce(s.planned_sample, 0) FROM crawl_slice_passes p
        JOIN crawl_slices s ON s.id = p.slice_id
        WHERE p.crawl_id = %s AND s.parent_id = %s AND p.status IN ('done', 'split', 'checking')
        """,
        (crawl_id, parent_id),
    )
    return [(int(r), int(s)) for r, s in cur.fetchall()]


def pass_counts(cur: Any, crawl_id: int) -> dict[str, int]:
    cur.execute("SELECT status, count(*) FROM crawl_slice_passes WHERE crawl_id = %s GROUP BY 1", (crawl_id,))
    return {status: int(n) for status, n in cur.fetchall()}


def slicing_state(cur: Any, crawl_id: int) -> dict[str, Any] | None:
    cur.execute("SELECT slicing FROM crawl_runs WHERE id = %s", (crawl_id,))
    row = cur.fetchone()
    return row[0] if row else None


def save_slicing_state(cur: Any, crawl_id: int, state: dict[str, Any]) -> None:
    cur.execute("UPDATE crawl_runs SET slicing = %s WHERE id = %s", (Json(state), crawl_id))


def take_recrawl_credit(cur: Any, scope: str, share: float, n_leaves: int) -> int:
    """Add this run's share of the map to the stored credit and take the whole slices it buys."""
    name = f"recrawl_credit:{scope}"
    cur.execute("SELECT (value->>'credit')::float FROM pipeline_state WHERE name = %s FOR UPDATE", (name,))
    row = cur.fetchone()
    credit = (row[0] if row and row[0] is not None else 0.0) + share * n_leaves
    take = min(int(credit), n_leaves)
    cur.execute(
        """
        INSERT INTO pipeline_state (name, value) VALUES (%s, jsonb_build_object('credit', %s::float))
        ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()
        """,
        (name, credit - take),
    )
    return take
