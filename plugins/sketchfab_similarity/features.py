"""Stage 3, extract_features: truncated VGG16 vectors for thumbnails that have none yet.

The model is Keras' own VGG16 without its top, cut at `block5_pool` and reduced by
global average pooling to 512 floats, then L2-normalised, as in the original blog
post but without flattening 7x7x512 (25,088 dims would not fit a pgvector index).
Vectors are written as feature files in the thumbnail store, one per chunk, and
the `load_vectors` stage loads them; a crash between the two loses nothing.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .db import connect
from .images import RESIZE_MODES, decode_for_model
from .progress import Progress
from .settings import Settings
from .sharding import WHOLE, Shard
from .thumbnails import ThumbnailStore

log = logging.getLogger(__name__)

EMBEDDING_DIM = 512
# Layers whose output has 512 channels, so the pooled vector fits the vector(512) column.
ALLOWED_LAYERS = ("block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
                  "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool")  # fmt: skip
POOLINGS = ("avg", "max")
# keras.applications.vgg16.preprocess_input ("caffe" mode): RGB -> BGR, minus the ImageNet mean.
IMAGENET_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)
PREPROCESSING = "caffe"
CHUNK_SIZE = 2048
IMAGENET_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
)


class WeightsUnavailable(RuntimeError):
    """The configured weights cannot be loaded. We never fall back to random weights."""


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that changes the vectors; its fingerprint is the feature version."""

    weights: str = "imagenet"
    input_size: int = 224
    layer: str = "block5_pool"
    pooling: str = "avg"
    resize: str = "squash"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layer not in ALLOWED_LAYERS:
            raise ValueError(f"layer must be one of {ALLOWED_LAYERS} (512 channels), got {self.layer!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> FeatureSpec:
        return cls(weights=settings.vgg16_weights, input_size=settings.input_size, seed=settings.random_seed)

    @property
    def version(self) -> str:
        return f"vgg16:{self.layer}:{self.pooling}:{self.input_size}:{self.resize}:{PREPROCESSING}:{weights_id(self)}"


def weights_id(spec: FeatureSpec) -> str:
    if spec.weights == "imagenet":
        return f"imagenet@keras-{package_version('keras')}"
    if spec.weights == "random":
        return f"random-he-seed{spec.seed}"
    return f"file-sha256-{_file_sha256(spec.weights, os.stat(spec.weights).st_mtime_ns)[:16]}"


@cache
def _file_sha256(path: str, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocess(batch: np.ndarray) -> np.ndarray:
    """Exactly keras.applications.vgg16.preprocess_input, without needing a framework."""
    return batch[..., ::-1] - IMAGENET_BGR_MEAN


def _seeded_he_init(model: Any, seed: int) -> None:
    """Deterministic He-normal weights from numpy, identical on every Keras backend."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if len(weights) == 2:
            kernel, bias = weights
            fan_in = int(np.prod(kernel.shape[:-1]))
            layer.set_weights([
                rng.normal(0.0, np.sqrt(2.0 / fan_in), kernel.shape).astype(np.float32),
                np.zeros_like(bias),
            ])  # fmt: skip


def build_extractor(spec: FeatureSpec) -> Any:
    """Keras VGG16 (no top) cut at spec.layer with global pooling: image batch -> (n, 512)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    from keras.applications import vgg16

    shape = (spec.input_size, spec.input_size, 3)
    if spec.weights == "imagenet":
        try:
            base = vgg16.VGG16(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as exc:
            raise WeightsUnavailable(
                f"Could not load the ImageNet VGG16 weights through Keras ({type(exc).__name__}: {exc}). "
                f"With no network access, download {IMAGENET_WEIGHTS_URL} elsewhere and either put it in "
                f"~/.keras/models/ or set the Variable similarity_vgg16_weights to its path. "
                f"Use similarity_vgg16_weights=random only for tests and offline demos."
            ) from exc
    elif spec.weights == "random":
        base = vgg16.VGG16(include_top=False, weights=None, input_shape=shape)
        _seeded_he_init(base, spec.seed)
    else:
        if not Path(spec.weights).is_file():
            raise WeightsUnavailable(f"similarity_vgg16_weights={spec.weights!r} is not a file")
        try:
            base = vgg16.VGG16(include_top=False, weights=spec.weights, input_shape=shape)
        except Exception as exc:
            raise WeightsUnavailable(
                f"Could not load VGG16 weights from {spec.weights}: {exc}. Expected the no-top VGG16 as a "
                f"Keras .weights.h5 or the legacy vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
            ) from exc
    pool = (
        keras.layers.GlobalAveragePooling2D() if spec.pooling == "avg" else keras.layers.GlobalMaxPooling2D()
    )
    return keras.Model(base.inputs, pool(base.get_layer(spec.layer).output), name=f"vgg16_{spec.layer}")


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1, norms)).astype(np.float32)


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
    files: list[str] = field(default_factory=list)
    extracted: int = 0
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)


def pending_extractions(
    db_url: str, version: str, force: bool = False, shard: Shard = WHOLE
) -> list[PendingImage]:
    """Good thumbnails with no vector for this feature version and these exact bytes."""
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute(
            """
            SELECT t.uid, t.stored_path, t.content_hash
            FROM model_thumbnails t LEFT JOIN model_embeddings e ON e.uid = t.uid
            WHERE t.status = 'ok'
              AND (%(force)s OR e.uid IS NULL OR e.feature_version <> %(version)s
                   OR e.content_hash <> t.content_hash)
            ORDER BY t.uid
            """,
            {"force": force, "version": version},
        )
        return [PendingImage(*row) for row in cur.fetchall() if shard.contains(row[0])]


def mark_unreadable(db_url: str, failures: dict[str, str]) -> None:
    """A stored file that cannot be read is re-downloaded on the next run (transient)."""
    if not failures:
        return
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        for uid, reason in failures.items():
            cur.execute(
                "UPDATE model_thumbnails SET status = 'failed', error = %s, content_hash = NULL, "
                "stored_path = NULL WHERE uid = %s",
                (f"[transient] extract: {reason}", uid),
            )


class FeatureExtractor:
    """A loaded model plus the decode pipeline. Build once, call on many images."""

    def __init__(self, spec: FeatureSpec, batch_size: int = 32, workers: int | None = None) -> None:
        self.spec = spec
        self.batch_size = batch_size
        self.workers = workers or max(2, os.cpu_count() or 2)
        self.model = build_extractor(spec)

    def decode(self, data: bytes) -> np.ndarray:
        return decode_for_model(data, self.spec.input_size, self.spec.resize)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(n, s, s, 3) float32 RGB 0..255 -> (n, 512) unit vectors."""
        raw = self.model.predict_on_batch(preprocess(images))
        return l2_normalise(np.asarray(raw, dtype=np.float32))

    def run(
        self,
        items: Sequence[PendingImage],
        read: Callable[[PendingImage], bytes],
        progress: Progress | None = None,
    ) -> tuple[list[PendingImage], np.ndarray, dict[str, str]]:
        """Decode on threads while the model runs; a bad image is a failure, not a crash."""
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
            return self.decode(read(item))

        with ThreadPoolExecutor(self.workers) as pool:
            futures = ordered_prefetch_map(load, items, pool, window=2 * self.batch_size)
            for item, future in zip(items, futures, strict=True):
                try:
                    batch_arrays.append(future.result())
                    batch_items.append(item)
                except Exception as exc:
                    failures[item.uid] = f"{type(exc).__name__}: {exc}"[:500]
                if len(batch_arrays) >= self.batch_size:
                    flush()
            flush()
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, EMBEDDING_DIM), np.float32)
        return done, matrix, failures


def feature_file_key(version: str, items: Sequence[PendingImage]) -> str:
    """Deterministic name: the same work rerun overwrites the same file."""
    digest = hashlib.sha256(version.encode())
    for it in items:
        digest.update(f"{it.uid}:{it.content_hash};".encode())
    version_dir = hashlib.sha256(version.encode()).hexdigest()[:16]
    return f"features/{version_dir}/{digest.hexdigest()[:32]}.npz"


def write_feature_file(store: ThumbnailStore, key: str, version: str, items: Sequence[PendingImage],
                       vectors: np.ndarray) -> str:  # fmt: skip
    buf = io.BytesIO()
    np.savez(
        buf,
        uids=np.array([i.uid for i in items]),
        content_hashes=np.array([i.content_hash for i in items]),
        vectors=vectors.astype(np.float32),
        feature_version=np.array(version),
    )
    path = store.path(key)
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(path, buf.getvalue())
    return key


def extract_features(
    settings: Settings, force: bool = False, spec: FeatureSpec | None = None, shard: Shard = WHOLE
) -> ExtractResult:
    """Extract vectors for every pending thumbnail (of this shard); returns the feature files to load."""
    spec = spec or FeatureSpec.from_settings(settings)
    result = ExtractResult(feature_version=spec.version)
    pending = pending_extractions(settings.db_url, spec.version, force, shard=shard)
    log.info("feature version %s: %d thumbnails to extract", spec.version, len(pending))
    if not pending:
        return result
    if spec.weights == "random":
        log.warning("Using RANDOM (seeded) VGG16 weights: vectors are for tests and offline demos only")
    extractor = FeatureExtractor(spec, batch_size=settings.extract_batch_size)
    store = ThumbnailStore(settings.thumbnail_store)
    progress = Progress("extract", total=len(pending), unit="images", log=log)
    for start in range(0, len(pending), CHUNK_SIZE):
        chunk = pending[start : start + CHUNK_SIZE]
        done, vectors, failures = extractor.run(chunk, lambda it: store.get(it.stored_path), progress)
        if done:
            result.files.append(
                write_feature_file(store, feature_file_key(spec.version, done), spec.version, done, vectors)
            )
        mark_unreadable(settings.db_url, failures)
        result.extracted += len(done)
        result.failed += len(failures)
        result.failures.update(failures)
    progress.finish(f"{result.extracted} vectors in {len(result.files)} files, {result.failed} failed")
    return result
