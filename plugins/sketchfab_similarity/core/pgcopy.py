"""Postgres binary COPY: numpy columns in, fixed-width rows out, and the embedding reader.

Binary COPY moves a 512-d vector as 2 KB with no text formatting or parsing on either
side; the loader writes with `copy_rows`, the refresh reads with `read_embeddings` and
`copy_out_rows`.
"""

from __future__ import annotations

import io
import struct

import numpy as np

from .db import connect
from .featurespec import EMBEDDING_DIM

PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)


PGCOPY_TRAILER = struct.pack("!h", -1)


def copy_rows(columns: list[np.ndarray]) -> bytes:
    """A COPY ... (FORMAT binary) payload from equal-length numpy columns.

    Supported columns: byte strings ('S', text), int32/int64 (integer/bigint), float32 (real) and 2-d
    float32 (one pgvector `vector` per row). When every text value of a column fills its
    width (uids are 32 hex digits by the schema), the whole payload is one structured numpy
    array; otherwise rows are packed one by one.
    """
    rows = len(columns[0])
    fixed = all(c.dtype.kind != "S" or bool(np.all(np.char.str_len(c) == c.dtype.itemsize)) for c in columns)
    if not fixed:
        return _copy_rows_packed(columns)
    dtype: list[tuple] = [("fields", ">i2")]
    for i, col in enumerate(columns):
        if col.dtype.kind == "S":
            dtype += [(f"len{i}", ">i4"), (f"val{i}", col.dtype)]
        elif col.ndim == 2:
            dtype += [
                (f"len{i}", ">i4"),
                (f"dim{i}", ">i2"),
                (f"unused{i}", ">i2"),
                (f"val{i}", ">f4", col.shape[1]),
            ]
        elif col.dtype in (np.int32, np.int64):
            dtype += [(f"len{i}", ">i4"), (f"val{i}", col.dtype.newbyteorder(">"))]
        elif col.dtype == np.float32:
            dtype += [(f"len{i}", ">i4"), (f"val{i}", ">f4")]
        else:
            raise TypeError(f"unsupported COPY column type {col.dtype} (ndim {col.ndim})")
    out = np.empty(rows, dtype=dtype)
    out["fields"] = len(columns)
    for i, col in enumerate(columns):
        if col.ndim == 2:
            out[f"len{i}"] = 4 + 4 * col.shape[1]
            out[f"dim{i}"] = col.shape[1]
            out[f"unused{i}"] = 0
        else:
            out[f"len{i}"] = col.dtype.itemsize
        out[f"val{i}"] = col
    return PGCOPY_HEADER + out.tobytes() + PGCOPY_TRAILER


def _copy_rows_packed(columns: list[np.ndarray]) -> bytes:
    big = [c if c.dtype.kind == "S" else c.astype(c.dtype.newbyteorder(">")) for c in columns]
    parts = [PGCOPY_HEADER]
    count = struct.pack("!h", len(columns))
    for r in range(len(columns[0])):
        parts.append(count)
        for col in big:
            if col.dtype.kind == "S":
                value = bytes(col[r])
            elif col.ndim == 2:
                value = struct.pack("!hh", col.shape[1], 0) + col[r].tobytes()
            else:
                value = col[r : r + 1].tobytes()  # a slice keeps the big-endian order, a scalar would not
            parts.append(struct.pack("!i", len(value)))
            parts.append(value)
    parts.append(PGCOPY_TRAILER)
    return b"".join(parts)


EMBEDDING_ROW = np.dtype(
    [("fields", ">i2"), ("ulen", ">i4"), ("uid", "S32"), ("vlen", ">i4"), ("dim", ">i2"),
     ("unused", ">i2"), ("vec", ">f4", EMBEDDING_DIM)]
)  # fmt: skip
"""One (uid, embedding) row of a binary COPY: 32-character uids (the schema's pattern), 512-d vectors."""
SINK_FLUSH = 32 << 20
"""Bytes of COPY data a `RowSink` gathers before parsing them into its arrays."""


def read_embeddings(db_url: str, version: str) -> tuple[np.ndarray, np.ndarray]:
    """Every (uid, vector) of a feature version, sorted by uid: uids as 'U32', vectors float32.

    Binary COPY, about 2 KB per vector on the wire and no text parsing on either side, parsed
    as it arrives into arrays sized by a count taken in the same snapshot: the vectors are held
    once (4 bytes per value), never as a whole COPY buffer next to the matrix (at a million
    models that buffer alone is 2 GB).
    """
    copy_sql = "COPY (SELECT uid, embedding FROM model_embeddings WHERE feature_version = %s) TO STDOUT (FORMAT binary)"
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # the count and the COPY agree
        cur.execute("SELECT count(*) FROM model_embeddings WHERE feature_version = %s", (version,))
        sink = RowSink(cur.fetchone()[0])
        cur.copy_expert(cur.mogrify(copy_sql, (version,)).decode(), sink)
        if sink.finish():
            return sink.uids.astype("U32"), sink.matrix
        del sink  # an unexpected row layout: read it again the general way
        buf = io.BytesIO()
        cur.copy_expert(cur.mogrify(copy_sql, (version,)).decode(), buf)
    return parse_embedding_copy(buf.getbuffer())


class RowSink:
    """The file a COPY ... TO writes into: fixed-width (uid, embedding) rows parsed into
    preallocated arrays every SINK_FLUSH bytes. `finish` sorts them by uid (in place) and says
    whether every row had the expected layout."""

    def __init__(self, count: int) -> None:
        self.uids = np.empty(count, "S32")
        self.matrix = np.empty((count, EMBEDDING_DIM), np.float32)
        self.filled = 0
        self.pending = bytearray()
        self.started = False
        self.ok = True

    def write(self, data: bytes) -> None:
        self.pending += data
        if len(self.pending) >= SINK_FLUSH:
            self.flush()

    def flush(self) -> None:
        start = 0
        if not self.started:
            if len(self.pending) < len(PGCOPY_HEADER):
                return
            self.ok &= bytes(self.pending[: len(PGCOPY_HEADER)]) == PGCOPY_HEADER
            self.started, start = True, len(PGCOPY_HEADER)
        count = (len(self.pending) - start) // EMBEDDING_ROW.itemsize
        if self.ok and count:
            rows = np.frombuffer(self.pending, EMBEDDING_ROW, count, start)
            good = (
                self.filled + count <= len(self.uids)
                and np.all(rows["fields"] == 2)
                and np.all(rows["ulen"] == 32)
                and np.all(rows["vlen"] == 4 + 4 * EMBEDDING_DIM)
            )
            if good:
                self.uids[self.filled : self.filled + count] = rows["uid"]
                self.matrix[self.filled : self.filled + count] = rows["vec"]  # big-endian to native
                self.filled += count
            self.ok &= bool(good)
            del rows  # release the buffer before resizing it
        del self.pending[: start + count * EMBEDDING_ROW.itemsize]

    def finish(self) -> bool:
        self.flush()
        if not (self.ok and self.filled == len(self.uids) and bytes(self.pending) == PGCOPY_TRAILER):
            return False
        order = np.argsort(self.uids, kind="stable")
        permute_rows(self.matrix, order)
        self.uids = self.uids[order]
        return True


def permute_rows(matrix: np.ndarray, order: np.ndarray) -> None:
    """matrix[:] = matrix[order] in place (following the permutation's cycles), without a second
    matrix: rows already in place (a table loaded in uid order) cost nothing."""
    moved = np.flatnonzero(order != np.arange(len(order)))
    if not len(moved):
        return
    done = np.zeros(len(order), bool)
    held = np.empty(matrix.shape[1:], matrix.dtype)
    order_list = order.tolist()
    for start in moved.tolist():
        if done[start]:
            continue
        held[...] = matrix[start]
        at = start
        while True:
            done[at] = True
            source = order_list[at]
            if source == start:
                matrix[at] = held
                break
            matrix[at] = matrix[source]
            at = source


def fixed_width_rows(data: memoryview | bytes, dtype: np.dtype) -> np.ndarray | None:
    """The rows of a binary COPY ... TO as a record array of `dtype` (no copy), or None when the
    body does not divide into such rows (a variable-width field is not the width `dtype` says)."""
    body = memoryview(data)[len(PGCOPY_HEADER) : len(data) - len(PGCOPY_TRAILER)]
    return np.frombuffer(body, dtype=dtype) if len(body) % dtype.itemsize == 0 else None


def copy_out_rows(cur, sql: str, dtype: np.dtype) -> np.ndarray | None:
    """Run a `COPY (...) TO STDOUT (FORMAT binary)` and read it with `fixed_width_rows`."""
    buf = io.BytesIO()
    cur.copy_expert(sql, buf)
    return fixed_width_rows(buf.getbuffer(), dtype)


def parse_embedding_copy(data: memoryview | bytes) -> tuple[np.ndarray, np.ndarray]:
    """(uids, vectors) of a binary COPY of (uid, embedding), sorted by uid."""
    body = memoryview(data)[len(PGCOPY_HEADER) : len(data) - len(PGCOPY_TRAILER)]
    rows = fixed_width_rows(data, EMBEDDING_ROW)
    if rows is not None and (
        np.all(rows["fields"] == 2)
        and np.all(rows["ulen"] == 32)
        and np.all(rows["vlen"] == 4 + 4 * EMBEDDING_DIM)
    ):
        order = np.argsort(rows["uid"], kind="stable")
        matrix = rows["vec"][order]  # one copy, still big-endian; swapped in place below
        return rows["uid"][order].astype("U32"), matrix.byteswap(inplace=True).view(np.float32)
    uids, vectors, pos = [], [], 0
    while pos < len(body):
        (ulen,) = struct.unpack_from("!i", body, pos + 2)
        uids.append(bytes(body[pos + 6 : pos + 6 + ulen]).decode())
        pos += 6 + ulen
        (vlen, dim) = struct.unpack_from("!ih", body, pos)
        vectors.append(np.frombuffer(body, ">f4", dim, pos + 8))
        pos += 4 + vlen
    order = np.argsort(np.array(uids, dtype=str), kind="stable")
    matrix = np.array(vectors, dtype=np.float32).reshape(len(uids), EMBEDDING_DIM)
    return np.array(uids, dtype=str)[order], matrix[order]
