"""Stage 4, load_vectors: bulk-load feature files into `model_embeddings`.

Each file is checked (dimension, finite values, unit norm) before anything is
written, COPYed into a temporary staging table, and upserted by uid in one
transaction. Rows whose vector, version and source bytes are unchanged are not
touched, so a rerun leaves the database exactly as it was.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import numpy as np

from .db import connect
from .features import EMBEDDING_DIM
from .progress import Progress
from .settings import Settings
from .thumbnails import ThumbnailStore

log = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-3


@dataclass
class LoadStats:
    files: int = 0
    loaded: int = 0
    changed: int = 0
    rejected: int = 0
    reject_reasons: dict[str, str] = field(default_factory=dict)


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


def vector_problem(vector: np.ndarray) -> str | None:
    """Why a vector must not be stored, or None if it is fine."""
    if vector.shape != (EMBEDDING_DIM,):
        return f"dimension {vector.shape} is not ({EMBEDDING_DIM},)"
    if not np.all(np.isfinite(vector)):
        return "contains NaN or infinity"
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        return f"norm {norm:.4f} is not 1"
    return None


def vector_literal(vector: np.ndarray) -> str:
    """pgvector's text form; repr-exact float32 so a reload compares equal."""
    return "[" + ",".join(np.format_float_positional(x, unique=True, trim="-") for x in vector) + "]"


def load_batch(db_url: str, batch: FeatureBatch, stats: LoadStats) -> None:
    """Validate, COPY into staging, upsert changed rows; all in one transaction."""
    vectors = batch.vectors.reshape(len(batch.uids), -1) if len(batch.uids) else batch.vectors
    lines = []
    for uid, content_hash, vector in zip(batch.uids, batch.content_hashes, vectors, strict=True):
        problem = vector_problem(vector)
        if problem:
            stats.rejected += 1
            stats.reject_reasons[uid] = problem
            log.warning("vector for %s rejected: %s", uid, problem)
            continue
        lines.append(f"{uid}\t{vector_literal(vector)}\t{batch.feature_version}\t{content_hash}\n")
    if not lines:
        return
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE staging_embeddings (uid text, embedding vector(512), feature_version text, "
            "content_hash text) ON COMMIT DROP"
        )
        cur.copy_expert(
            "COPY staging_embeddings (uid, embedding, feature_version, content_hash) FROM STDIN",
            io.StringIO("".join(lines)),
        )
        cur.execute(
            """
            INSERT INTO model_embeddings AS e (uid, embedding, feature_version, content_hash)
            SELECT s.uid, s.embedding, s.feature_version, s.content_hash
            FROM staging_embeddings s JOIN sketchfab_models m ON m.uid = s.uid
            ON CONFLICT (uid) DO UPDATE SET
                embedding = EXCLUDED.embedding,
                feature_version = EXCLUDED.feature_version,
                content_hash = EXCLUDED.content_hash,
                extracted_at = now()
            WHERE (e.feature_version, e.content_hash) IS DISTINCT FROM (EXCLUDED.feature_version, EXCLUDED.content_hash)
               OR e.embedding <> EXCLUDED.embedding
            """
        )
        stats.changed += cur.rowcount
    stats.loaded += len(lines)


def load_vectors(settings: Settings, keys: list[str]) -> LoadStats:
    """Load the feature files written by extract_features (keys relative to the thumbnail store)."""
    stats = LoadStats()
    store = ThumbnailStore(settings.thumbnail_store)
    progress = Progress("load", total=len(keys), unit="files", log=log)
    for key in keys:
        load_batch(settings.db_url, read_feature_file(store, key), stats)
        stats.files += 1
        progress.advance()
    progress.finish(f"{stats.loaded} vectors loaded ({stats.changed} changed), {stats.rejected} rejected")
    return stats
