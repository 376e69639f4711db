"""Stage 4, load_vectors: bulk-load feature files into `model_embeddings`, keep its HNSW index.

Each feature file is one batch and one transaction: its vectors are checked (shape,
finite values, unit norm, one vector per uid, a known model) before anything is
written, sent with a binary COPY into a temporary staging table, and upserted by uid.
Rows whose vector, version and source bytes are unchanged are not touched, so a rerun
leaves the database exactly as it was. A rejected vector is counted with its reason and
the batch goes on without it.

Inserting into a live HNSW graph runs at a few hundred vectors/s, a bulk build several
times faster; so a load that adds or changes a large share of the table
(`hnsw_rebuild_percent`) drops the index first and rebuilds it afterwards (`hnsw.py`).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..core.db import connect
from ..core.featurespec import EMBEDDING_DIM
from ..core.pgcopy import copy_rows
from ..core.progress import Progress, lap
from ..core.settings import Settings
from ..core.store import ArtifactStore, FeatureBatch
from ..core.uids import is_uid
from .hnsw import HNSW_INDEX, configure_search, drop_hnsw_index, ensure_hnsw_index

log = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-3
MAX_LISTED_REJECTS = 200
"""Rejected uids listed by name in the stats (all are counted by reason and logged)."""
_SEP = "\x1f"  # ASCII unit separator: not part of any uid or content hash


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
        if not is_uid(uid):
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
    with connect(db_url) as conn, conn.cursor() as cur:
        # Not waiting for the WAL flush is safe here: a batch lost to a server crash right after
        # its commit has no vector, so extract_features produces it again on the next run.
        cur.execute("SET LOCAL synchronous_commit = off")
        cur.execute(
            f"CREATE TEMP TABLE staging_embeddings (uid text, embedding vector({EMBEDDING_DIM}), content_hash text) "
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
    with connect(db_url) as conn, conn.cursor() as cur:
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


def load_vectors(settings: Settings, keys: list[str]) -> LoadStats:
    """Load the feature files written by extract_features (keys relative to the thumbnail store)."""
    stats = LoadStats()
    store = ArtifactStore.for_settings(settings)
    clock = time.perf_counter()
    readable = []
    for key in keys:
        try:
            readable.append((key, store.feature_ids(key)))
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
            load_batch(settings.db_url, store.read_features(key), stats)
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


# --- HNSW index and search settings ------------------------------------------------------
