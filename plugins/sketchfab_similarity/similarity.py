"""Stage 5, refresh_similarity: the exact top-N table, published atomically.

Scores are cosine similarities of unit vectors, i.e. inner products, computed in
row blocks so the N x N matrix never exists in memory. Ties are broken by uid,
so the table is deterministic. The new table replaces the old one inside a single
transaction (MVCC): readers see either the old rows or the new ones, never a mix,
and are never blocked.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import numpy as np

from .db import connect
from .features import EMBEDDING_DIM, FeatureSpec
from .progress import Progress
from .settings import Settings

log = logging.getLogger(__name__)

STATE_KEY = "similarity"
BLOCK_ROWS = 1024


@dataclass
class RefreshStats:
    models: int = 0
    rows: int = 0
    skipped_unchanged: bool = False
    feature_version: str = ""


def top_n_neighbours(
    matrix: np.ndarray, n: int, block_rows: int = BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """For each row: indices and scores of its n most similar other rows, best first.

    Ties are broken by the lower index; callers sort rows by uid so this means by uid.
    """
    total = matrix.shape[0]
    k = min(n, total - 1)
    if k <= 0:
        return np.zeros((total, 0), np.int64), np.zeros((total, 0), np.float32)
    indices = np.empty((total, k), np.int64)
    scores = np.empty((total, k), np.float32)
    for start in range(0, total, block_rows):
        stop = min(start + block_rows, total)
        sims = matrix[start:stop] @ matrix.T
        rows = np.arange(stop - start)
        sims[rows, rows + start] = -np.inf  # a model is not its own neighbour
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        kth = sims[rows[:, None], part].min(axis=1)
        for r in np.flatnonzero((sims >= kth[:, None]).sum(axis=1) > k):
            # Ties at the cut: take every candidate and let the lower index (uid) win.
            candidates = np.flatnonzero(sims[r] >= kth[r])
            part[r] = candidates[np.lexsort((candidates, -sims[r, candidates]))][:k]
        part_scores = sims[rows[:, None], part]
        order = np.lexsort((part, -part_scores), axis=1)
        indices[start:stop] = np.take_along_axis(part, order, axis=1)
        scores[start:stop] = np.take_along_axis(part_scores, order, axis=1)
    return indices, scores


def load_embeddings(db_url: str, version: str) -> tuple[list[str], np.ndarray]:
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT uid, embedding FROM model_embeddings WHERE feature_version = %s ORDER BY uid", (version,)
        )
        rows = cur.fetchall()
    uids = [r[0] for r in rows]
    matrix = np.array([r[1].to_numpy() for r in rows], dtype=np.float32).reshape(len(rows), EMBEDDING_DIM)
    return uids, matrix


def inputs_fingerprint(db_url: str, version: str, top_n: int) -> str:
    """Changes whenever the set of vectors behind the table (or N) changes."""
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT coalesce(md5(string_agg(uid || ':' || content_hash, ',' ORDER BY uid)), '') "
            "FROM model_embeddings WHERE feature_version = %s",
            (version,),
        )
        (digest,) = cur.fetchone()
    return hashlib.sha256(f"{version}|{top_n}|{digest}".encode()).hexdigest()


def stored_fingerprint(db_url: str) -> str | None:
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute("SELECT value->>'fingerprint' FROM pipeline_state WHERE name = %s", (STATE_KEY,))
        row = cur.fetchone()
    return row[0] if row else None


def publish(
    db_url: str, uids: list[str], indices: np.ndarray, scores: np.ndarray, version: str, fingerprint: str
) -> int:
    """Replace model_similarity in one transaction: readers see old rows or new rows, never neither."""
    buf = io.StringIO()
    k = indices.shape[1]
    for i, uid in enumerate(uids):
        for rank in range(k):
            score = np.format_float_positional(scores[i, rank], unique=True)
            buf.write(f"{uid}\t{rank + 1}\t{uids[indices[i, rank]]}\t{score}\t{version}\n")
    buf.seek(0)
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE staging_similarity (LIKE model_similarity) ON COMMIT DROP")
        cur.copy_expert("COPY staging_similarity FROM STDIN", buf)
        cur.execute("DELETE FROM model_similarity")
        cur.execute("INSERT INTO model_similarity SELECT * FROM staging_similarity")
        cur.execute(
            "INSERT INTO pipeline_state (name, value) VALUES (%s, %s) "
            "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
            (
                STATE_KEY,
                json.dumps({"fingerprint": fingerprint, "feature_version": version, "rows": len(uids) * k}),
            ),
        )
    return len(uids) * k


def refresh_similarity(settings: Settings, full: bool = False, top_n: int | None = None) -> RefreshStats:
    """Rebuild the exact top-N for the current feature version, unless nothing changed."""
    version = FeatureSpec.from_settings(settings).version
    n = top_n or settings.top_n
    stats = RefreshStats(feature_version=version)
    fingerprint = inputs_fingerprint(settings.db_url, version, n)
    if not full and fingerprint == stored_fingerprint(settings.db_url):
        stats.skipped_unchanged = True
        log.info("model_similarity is already up to date for %s", version)
        return stats
    progress = Progress("refresh", unit="models", log=log)
    uids, matrix = load_embeddings(settings.db_url, version)
    indices, scores = top_n_neighbours(matrix, n)
    progress.advance(len(uids))
    stats.models = len(uids)
    stats.rows = publish(settings.db_url, uids, indices, scores, version, fingerprint)
    progress.finish(f"top-{n} for {stats.models} models, {stats.rows} rows published")
    return stats
