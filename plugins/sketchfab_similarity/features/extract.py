"""Stage 3, extract_features: truncated VGG16 vectors for thumbnails that have none yet.

The model (`vgg16.py`) is Keras' own VGG16 without its top, cut at `block5_pool` (or
another 512-channel layer) and reduced by global average (or max) pooling to 512 floats,
then L2-normalised: the original blog post's features without flattening 7x7x512 (25,088
dims would not fit a pgvector index). It runs on an engine (`engines.py`) while images
decode on threads. Vectors are written as feature files in the artifact store, one per
chunk, and the `load_vectors` stage loads them; a crash between the two loses nothing.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from ..core.backend import cpu_count
from ..core.db import connect
from ..core.featurespec import EMBEDDING_DIM, FeatureSpec, l2_normalise, preprocess
from ..core.images import decode_for_model
from ..core.progress import Progress
from ..core.settings import Settings, default_value
from ..core.sharding import WHOLE, Shard
from ..core.store import ArtifactStore, FeatureBatch
from .engines import Engine, make_engine

log = logging.getLogger(__name__)

CHUNK_SIZE = 2048


T = TypeVar("T")


R = TypeVar("R")


def ordered_prefetch_map(
    fn: Callable[[T], R], items: Sequence[T], pool: ThreadPoolExecutor, window: int
) -> Iterator[Future[R]]:
    """Like pool.map, but keeps at most `window` items in flight so memory stays bounded."""
    queue: deque[Future[R]] = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= window:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


@dataclass(frozen=True)
class PendingImage:
    uid: str
    stored_path: str
    content_hash: str


@dataclass
class ExtractResult:
    feature_version: str
    engine: str = ""
    device: str = ""
    files: list[str] = field(default_factory=list)
    extracted: int = 0
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)


def pending_query(shard: Shard) -> str:
    """Good thumbnails of this shard with no vector for this version and these bytes (a uid range
    the "C" indexes serve, so a shard reads only its own rows)."""
    return f"""
        SELECT t.uid, t.stored_path, t.content_hash
        FROM model_thumbnails t
        LEFT JOIN model_embeddings e ON e.uid = t.uid AND {shard.sql_predicate("e.uid")}
        WHERE t.status = 'ok' AND {shard.sql_predicate("t.uid")}
          AND (%(force)s OR e.uid IS NULL OR e.feature_version <> %(version)s
               OR e.content_hash <> t.content_hash)
        ORDER BY t.uid
    """  # noqa: S608 (the predicate is built from two integers)


def pending_extractions(
    db_url: str, version: str, force: bool = False, shard: Shard = WHOLE
) -> list[PendingImage]:
    """Good thumbnails with no vector for this feature version and these exact bytes."""
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute(pending_query(shard), {"force": force, "version": version})
        return [PendingImage(*row) for row in cur.fetchall()]


def mark_unreadable(db_url: str, failures: dict[str, str]) -> None:
    """A stored file that cannot be read is re-downloaded on the next run (transient)."""
    if not failures:
        return
    with connect(db_url) as conn, conn.cursor() as cur:
        for uid, reason in failures.items():
            cur.execute(
                "UPDATE model_thumbnails SET status = 'failed', error = %s, content_hash = NULL, "
                "stored_path = NULL WHERE uid = %s",
                (f"[transient] extract: {reason}", uid),
            )


class FeatureExtractor:
    """An engine plus the decode pipeline. Build once, call on many images."""

    def __init__(
        self,
        spec: FeatureSpec,
        engine: Engine,
        workers: int = default_value("decode_workers"),
        max_pixels: int = default_value("max_image_pixels"),
    ) -> None:
        self.spec = spec
        self.engine = engine
        self.workers = workers or cpu_count()
        self.max_pixels = max_pixels

    def prepare(self, data: bytes) -> np.ndarray:
        """Bytes -> preprocessed (s, s, 3) float32, on a decode thread (Pillow and numpy release the GIL)."""
        spec = self.spec
        pixels = decode_for_model(
            data, spec.input_size, spec.resize, spec.interpolation, spec.jpeg_decode, self.max_pixels
        )
        return preprocess(pixels)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed (n, s, s, 3) -> (n, 512) unit vectors."""
        return l2_normalise(self.engine.embed(batch))

    def run(
        self,
        items: Sequence[PendingImage],
        read: Callable[[PendingImage], bytes],
        progress: Progress | None = None,
    ) -> tuple[list[PendingImage], np.ndarray, dict[str, str]]:
        """Decode on threads while the engine runs; a bad image is a failure, not a crash."""
        batch_size = self.engine.batch_size
        done: list[PendingImage] = []
        vectors: list[np.ndarray] = []
        failures: dict[str, str] = {}
        batch_items: list[PendingImage] = []
        batch_arrays: list[np.ndarray] = []

        def flush() -> None:
            if not batch_arrays:
                return
            embedded = self.embed(np.stack(batch_arrays))
            usable = np.linalg.norm(embedded, axis=1) > 0.5  # all-zero activations have no direction
            for item, ok in zip(batch_items, usable, strict=True):
                if not ok:
                    failures[item.uid] = "the image gives an all-zero feature vector"
            vectors.append(embedded[usable])
            done.extend(it for it, ok in zip(batch_items, usable, strict=True) if ok)
            if progress:
                progress.advance(len(batch_items))
            batch_items.clear()
            batch_arrays.clear()

        def load(item: PendingImage) -> np.ndarray:
            return self.prepare(read(item))

        with ThreadPoolExecutor(self.workers) as pool:
            futures = ordered_prefetch_map(load, items, pool, window=2 * batch_size)
            for item, future in zip(items, futures, strict=True):
                try:
                    batch_arrays.append(future.result())
                    batch_items.append(item)
                except Exception as exc:
                    failures[item.uid] = f"{type(exc).__name__}: {exc}"[:500]
                    if progress:
                        progress.advance()
                if len(batch_arrays) >= batch_size:
                    flush()
            flush()
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, EMBEDDING_DIM), np.float32)
        return done, matrix, failures


def make_extractor(spec: FeatureSpec, settings: Settings) -> tuple[FeatureExtractor, str]:
    engine, device = make_engine(spec, settings)
    extractor = FeatureExtractor(spec, engine, settings.decode_workers, settings.max_image_pixels)
    log.info(
        "extract engine %s on %s (keras backend %s), batch %d, %d decode threads",
        engine.name, device, os.environ.get("KERAS_BACKEND"), engine.batch_size, extractor.workers,
    )  # fmt: skip
    return extractor, device


def extract_features(settings: Settings, force: bool = False, shard: Shard = WHOLE) -> ExtractResult:
    """Extract vectors for every pending thumbnail of this shard; returns the feature files to load."""
    spec = FeatureSpec.from_settings(settings)
    result = ExtractResult(feature_version=spec.version)
    pending = pending_extractions(settings.db_url, spec.version, force, shard)
    log.info("feature version %s: %d thumbnails to extract (shard %s)", spec.version, len(pending), shard)
    if not pending:
        return result
    if spec.weights == "random":
        log.warning("Using RANDOM (seeded) VGG16 weights: vectors are for tests and offline demos only")
    extractor, result.device = make_extractor(spec, settings)
    result.engine = extractor.engine.name
    store = ArtifactStore.for_settings(settings)
    progress = Progress("extract", total=len(pending), unit="images", log=log)
    for start in range(0, len(pending), CHUNK_SIZE):
        chunk = pending[start : start + CHUNK_SIZE]
        done, vectors, failures = extractor.run(chunk, lambda it: store.get(it.stored_path), progress)
        if done:
            batch = FeatureBatch(
                uids=[it.uid for it in done],
                content_hashes=[it.content_hash for it in done],
                vectors=vectors,
                feature_version=spec.version,
            )
            result.files.append(store.write_features(batch))
        mark_unreadable(settings.db_url, failures)
        result.extracted += len(done)
        result.failed += len(failures)
        result.failures.update(failures)
    progress.finish(f"{result.extracted} vectors in {len(result.files)} files, {result.failed} failed")
    return result
