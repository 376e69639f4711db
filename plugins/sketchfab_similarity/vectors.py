"""Stage 4, load_vectors: bulk-load feature files into `model_embeddings`, keep its HNSW index.

Each feature file is one batch and one transaction: its vectors are checked (shape,
finite values, unit norm, one vector per uid, a known model) before anything is
written, sent with a binary COPY into a temporary staging table, and upserted by uid.
Rows whose vector, version and source bytes are unchanged are not touched, so a rerun
leaves the database exactly as it was. A rejected vector is counted with its reason and
the batch goes on without it.

Inserting into a live HNSW graph runs at a few hundred vectors/s, a bulk build several
times faster; so a load that adds or changes a large share of the table
(`hnsw_rebuild_percent`) drops the index first and rebuilds it afterwards with CREATE INDEX
CONCURRENTLY, which never blocks readers. Build parameters (m, ef_construction) come from
settings; a changed value rebuilds the index the same way, and the search-time ef_search is
attached to the SQL search functions.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import psycopg2

from .db import connect, get_engine
from .features import EMBEDDING_DIM
from .progress import Progress
from .settings import Settings
from .thumbnails import ThumbnailStore

log = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-3
HNSW_INDEX = "model_embeddings_hnsw_idx"
SEARCH_FUNCTIONS = ("similar_models_search", "similar_to_vector")
MAX_LISTED_REJECTS = 200
"""Rejected uids listed by name in the stats (all are counted by reason and logged)."""
# Arbitrary constant: one index (re)build at a time.
_INDEX_LOCK_KEY = 0x5F1A_0004
_UID = re.compile(r"^[0-9a-f]{32}$")
_SEP = "\x1f"  # ASCII unit separator: not part of any uid or content hash

PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
PGCOPY_TRAILER = struct.pack("!h", -1)


@dataclass
class LoadStats:
    files: int = 0
    loaded: int = 0
    changed: int = 0
    rejected: int = 0
    reject_reasons: dict[str, str] = field(default_factory=dict)
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    failed_files: dict[str, str] = field(default_factory=dict)
    """Feature files that could not be read, with the reason (their models are extracted again)."""
    index: str = "unchanged"
    seconds: dict[str, float] = field(default_factory=dict)
    """Time per phase: check (which rows change), load (batches), index (HNSW (re)build)."""

    def reject(self, uid: str, reason: str) -> None:
        self.rejected += 1
        kind = reason.split(":", 1)[0]
        self.rejects_by_reason[kind] = self.rejects_by_reason.get(kind, 0) + 1
        if len(self.reject_reasons) < MAX_LISTED_REJECTS:
            self.reject_reasons[uid] = reason
        log.warning("vector for %s rejected: %s", uid, reason)


@dataclass(frozen=True)
class FeatureBatch:
    uids: list[str]
    content_hashes: list[str]
    vectors: np.ndarray
    feature_version: str


def read_feature_file(store: ThumbnailStore, key: str) -> FeatureBatch:
    with np.load(io.BytesIO(store.get(key)), allow_pickle=False) as data:
        return FeatureBatch(
            uids=[str(u) for u in data["uids"]],
            content_hashes=[str(h) for h in data["content_hashes"]],
            vectors=np.asarray(data["vectors"]),
            feature_version=str(data["feature_version"]),
        )


# --- binary COPY -----------------------------------------------------------------------


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


def read_embeddings(db_url: str, version: str) -> tuple[np.ndarray, np.ndarray]:
    """Every (uid, vector) of a feature version, sorted by uid: uids as 'U32', vectors float32.

    Binary COPY: about 2 KB per vector on the wire and no text parsing on either side.
    """
    buf = io.BytesIO()
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.copy_expert(
            cur.mogrify(
                "COPY (SELECT uid, embedding FROM model_embeddings WHERE feature_version = %s) "
                "TO STDOUT (FORMAT binary)",
                (version,),
            ).decode(),
            buf,
        )
    return parse_embedding_copy(buf.getbuffer())


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
    row_dtype = np.dtype(
        [("fields", ">i2"), ("ulen", ">i4"), ("uid", "S32"), ("vlen", ">i4"), ("dim", ">i2"),
         ("unused", ">i2"), ("vec", ">f4", EMBEDDING_DIM)]
    )  # fmt: skip
    rows = fixed_width_rows(data, row_dtype)
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


# --- checks and load -------------------------------------------------------------------


def batch_problems(batch: FeatureBatch) -> list[str | None]:
    """Why each row of a batch must not be stored (None: fine). Vectorised over the batch."""
    count = len(batch.uids)
    vectors = np.asarray(batch.vectors)
    if len(batch.content_hashes) != count:
        return [f"file has {count} uids but {len(batch.content_hashes)} content hashes"] * count
    if vectors.ndim != 2 or vectors.shape != (count, EMBEDDING_DIM):
        return [f"dimension: vectors have shape {vectors.shape}, expected ({count}, {EMBEDDING_DIM})"] * count
    problems: list[str | None] = [None] * count
    values = vectors.astype(np.float64)
    finite = np.isfinite(values).all(axis=1)
    norms = np.linalg.norm(np.where(np.isfinite(values), values, 0.0), axis=1)
    last_row = {uid: i for i, uid in enumerate(batch.uids)}
    for i, uid in enumerate(batch.uids):
        if not _UID.match(uid):
            problems[i] = f"uid: {uid!r} is not 32 lowercase hex digits"
        elif last_row[uid] != i:
            problems[i] = "duplicate: a later row of the same file has another vector for this uid"
        elif not finite[i]:
            problems[i] = "not finite: the vector contains NaN or infinity"
        elif abs(norms[i] - 1.0) > NORM_TOLERANCE:
            problems[i] = f"norm: {norms[i]:.6g} is not 1 (vectors must be L2-normalised)"
    return problems


def load_batch(db_url: str, batch: FeatureBatch, stats: LoadStats) -> None:
    """Check, binary-COPY into staging, upsert changed rows; all in one transaction."""
    problems = batch_problems(batch)
    keep = [i for i, p in enumerate(problems) if p is None]
    for uid, problem in zip(batch.uids, problems, strict=True):
        if problem:
            stats.reject(uid, problem)
    if not keep:
        return
    uids = np.array([batch.uids[i] for i in keep], dtype="S")
    hashes = np.array([batch.content_hashes[i].encode() for i in keep], dtype="S")
    vectors = np.ascontiguousarray(np.asarray(batch.vectors)[keep], dtype=np.float32)
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        # Not waiting for the WAL flush is safe here: a batch lost to a server crash right after
        # its commit has no vector, so extract_features produces it again on the next run.
        cur.execute("SET LOCAL synchronous_commit = off")
        cur.execute(
            "CREATE TEMP TABLE staging_embeddings (uid text, embedding vector(512), content_hash text) "
            "ON COMMIT DROP"
        )
        cur.copy_expert(
            "COPY staging_embeddings (uid, embedding, content_hash) FROM STDIN (FORMAT binary)",
            io.BytesIO(copy_rows([uids, vectors, hashes])),
        )
        cur.execute(
            "DELETE FROM staging_embeddings s "
            "WHERE NOT EXISTS (SELECT 1 FROM sketchfab_models m WHERE m.uid = s.uid) RETURNING s.uid"
        )
        unknown = sorted(r[0] for r in cur.fetchall())
        cur.execute(
            """
            INSERT INTO model_embeddings AS e (uid, embedding, feature_version, content_hash)
            SELECT s.uid, s.embedding, %(version)s, s.content_hash
            FROM staging_embeddings s
            ON CONFLICT (uid) DO UPDATE SET
                embedding = EXCLUDED.embedding,
                feature_version = EXCLUDED.feature_version,
                content_hash = EXCLUDED.content_hash,
                extracted_at = now()
            WHERE (e.feature_version, e.content_hash) IS DISTINCT FROM (EXCLUDED.feature_version, EXCLUDED.content_hash)
               OR e.embedding <> EXCLUDED.embedding
            """,
            {"version": batch.feature_version},
        )
        stats.changed += cur.rowcount
    for uid in unknown:
        stats.reject(uid, "unknown model: no row in sketchfab_models (removed since extraction?)")
    stats.loaded += len(keep) - len(unknown)


def incoming_changes(db_url: str, files: list[tuple[list[str], list[str], str]]) -> tuple[int, int]:
    """(rows the files would add or change, rows in the table): decides the index strategy."""
    by_version: dict[str, tuple[list[str], list[str]]] = {}
    for uids, hashes, version in files:
        into = by_version.setdefault(version, ([], []))
        into[0].extend(uids)
        into[1].extend(hashes)
    changes = 0
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        for version, (uids, hashes) in by_version.items():
            # Two joined strings parse far faster than two 50,000-element array literals.
            cur.execute(
                "SELECT count(*) FROM unnest(string_to_array(%s, %s), string_to_array(%s, %s)) AS i(uid, content_hash) "
                "LEFT JOIN model_embeddings e ON e.uid = i.uid "
                "WHERE e.uid IS NULL OR e.feature_version <> %s OR e.content_hash <> i.content_hash",
                (_SEP.join(uids), _SEP, _SEP.join(hashes), _SEP, version),
            )
            changes += cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM model_embeddings")
        rows = cur.fetchone()[0]
    return int(changes), int(rows)


def feature_file_ids(store: ThumbnailStore, key: str) -> tuple[list[str], list[str], str]:
    """A feature file's uids, content hashes and version, without reading its vectors."""
    with store.fs.open(store.path(key), "rb") as f, np.load(f, allow_pickle=False) as data:
        return data["uids"].tolist(), data["content_hashes"].tolist(), str(data["feature_version"])


def load_vectors(settings: Settings, keys: list[str]) -> LoadStats:
    """Load the feature files written by extract_features (keys relative to the thumbnail store)."""
    stats = LoadStats()
    store = ThumbnailStore(settings.thumbnail_store)
    clock = time.perf_counter()
    readable = []
    for key in keys:
        try:
            readable.append((key, feature_file_ids(store, key)))
        except Exception as exc:  # a damaged file must not stop the others
            stats.failed_files[key] = f"{type(exc).__name__}: {exc}"[:500]
            log.error("feature file %s cannot be read, skipped: %s", key, stats.failed_files[key])
    keys = [key for key, _ in readable]
    changes, rows = incoming_changes(settings.db_url, [ids for _, ids in readable]) if keys else (0, 0)
    bulk = changes > 0 and changes * 100 > settings.hnsw_rebuild_percent * (rows + changes)
    if bulk:
        log.info(
            "%d of %d vectors new or changed: dropping %s for the load", changes, rows + changes, HNSW_INDEX
        )
        drop_hnsw_index(settings.db_url)
    clock = lap(stats.seconds, "check", clock)
    progress = Progress("load", total=len(keys), unit="files", log=log)
    try:
        for key in keys:
            load_batch(settings.db_url, read_feature_file(store, key), stats)
            stats.files += 1
            progress.advance()
    finally:
        clock = lap(stats.seconds, "load", clock)
        stats.index = ensure_hnsw_index(settings)
        configure_search(settings)
        lap(stats.seconds, "index", clock)
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.rejects_by_reason.items()))
    progress.finish(
        f"{stats.loaded} vectors loaded ({stats.changed} changed), {stats.rejected} rejected, "
        f"{len(stats.failed_files)} unreadable files"
        + (f" ({reasons})" if reasons else "")
        + f"; index {stats.index}; "
        + ", ".join(f"{k} {v:.2f}s" for k, v in stats.seconds.items())
    )
    return stats


def lap(seconds: dict[str, float], phase: str, since: float) -> float:
    now = time.perf_counter()
    seconds[phase] = round(now - since, 3)
    return now


# --- HNSW index and search settings ------------------------------------------------------


@contextmanager
def autocommit(db_url: str) -> Iterator:
    """A pooled connection in autocommit mode (CREATE/DROP INDEX CONCURRENTLY need it)."""
    raw = get_engine(db_url).raw_connection()
    conn = raw.driver_connection
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.autocommit = False
        raw.close()


def hnsw_index_state(cur) -> tuple[bool, dict[str, str]] | None:
    """(valid, build options) of the HNSW index, or None when there is none."""
    cur.execute(
        "SELECT i.indisvalid, coalesce(c.reloptions, '{}') FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
        "WHERE c.relname = %s AND c.relnamespace = current_schema()::regnamespace",
        (HNSW_INDEX,),
    )
    row = cur.fetchone()
    if row is None:
        return None
    return bool(row[0]), dict(opt.split("=", 1) for opt in row[1])


def drop_hnsw_index(db_url: str) -> None:
    with autocommit(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (_INDEX_LOCK_KEY,))
        try:
            cur.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {HNSW_INDEX}")
        finally:
            cur.execute("SELECT pg_advisory_unlock(%s)", (_INDEX_LOCK_KEY,))


def ensure_hnsw_index(settings: Settings) -> str:
    """Make the HNSW index exist, be valid and have the configured parameters, without
    blocking readers: CREATE INDEX CONCURRENTLY, and for a rebuild a swap under a new name."""
    wanted = {"m": str(settings.hnsw_m), "ef_construction": str(settings.hnsw_ef_construction)}
    options = f"m = {settings.hnsw_m:d}, ef_construction = {settings.hnsw_ef_construction:d}"
    with autocommit(settings.db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (_INDEX_LOCK_KEY,))
        try:
            state = hnsw_index_state(cur)
            if state is not None and state[0] and state[1] == wanted:
                return "unchanged"
            cur.execute("SELECT set_config('maintenance_work_mem', %s, false)", (settings.hnsw_build_memory,))
            progress = Progress("hnsw index", unit="builds", log=log)
            new_name = f"{HNSW_INDEX}_new"
            cur.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {new_name}")
            cur.execute(
                f"CREATE INDEX CONCURRENTLY {new_name if state else HNSW_INDEX} ON model_embeddings "
                f"USING hnsw (embedding vector_cosine_ops) WITH ({options})"
            )
            if state is not None:
                cur.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {HNSW_INDEX}")
                cur.execute(f"ALTER INDEX {new_name} RENAME TO {HNSW_INDEX}")
            cur.execute("RESET maintenance_work_mem")
            what = "built" if state is None else "rebuilt" if state[0] else "rebuilt (was invalid)"
            progress.finish(f"{HNSW_INDEX} {what} with {options}")
            return what
        finally:
            cur.execute("SELECT pg_advisory_unlock(%s)", (_INDEX_LOCK_KEY,))


def configure_search(settings: Settings) -> None:
    """Attach hnsw.ef_search from settings to the SQL search functions (skipped when already set)."""
    wanted = f"hnsw.ef_search={settings.hnsw_ef_search:d}"
    with connect(settings.db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT p.oid::regprocedure::text, coalesce(p.proconfig, '{}') FROM pg_proc p "
            "WHERE p.proname = ANY(%s) AND p.pronamespace = current_schema()::regnamespace",
            (list(SEARCH_FUNCTIONS),),
        )
        for signature, config in cur.fetchall():
            if wanted in config:
                continue
            try:
                cur.execute("SAVEPOINT ef_search")
                cur.execute(f"ALTER FUNCTION {signature} SET hnsw.ef_search = {settings.hnsw_ef_search:d}")
            except psycopg2.errors.InsufficientPrivilege:
                cur.execute("ROLLBACK TO SAVEPOINT ef_search")
                log.warning("not the owner of %s: hnsw.ef_search stays as installed", signature)
