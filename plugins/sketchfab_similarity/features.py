"""Stage 3, extract_features: truncated VGG16 vectors for thumbnails that have none yet.

The model is Keras' own VGG16 without its top, cut at `block5_pool` (or another
512-channel layer) and reduced by global average (or max) pooling to 512 floats,
then L2-normalised: the original blog post's features without flattening 7x7x512
(25,088 dims would not fit a pgvector index). Vectors are written as feature files
in the thumbnail store, one per chunk, and the `load_vectors` stage loads them; a
crash between the two loses nothing.

Weights always come from Keras (ImageNet through its loader and cache, a weights
file, or explicit seeded random filters). They run on one of two engines: Keras
itself (any backend: TensorFlow, JAX or PyTorch, on a GPU when there is one, with
optional mixed precision), or on a CPU the same weights exported to ncnn, whose
Winograd convolutions do the 3x3 layers with fewer multiplications. Both agree with
the blog post's per-image reference (`reference_vectors`) within 1e-4.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from .db import connect
from .images import INTERPOLATIONS, JPEG_DECODES, RESIZE_MODES, decode_for_model, effective_jpeg_decode
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
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
ENGINES = ("auto", "keras", "ncnn")
# keras.applications.vgg16.preprocess_input ("caffe" mode): RGB -> BGR, minus the ImageNet mean.
IMAGENET_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)
PREPROCESSING = "caffe"
CHUNK_SIZE = 2048
IMAGENET_WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_WEIGHTS_URL = (
    f"https://storage.googleapis.com/tensorflow/keras-applications/vgg16/{IMAGENET_WEIGHTS_FILE}"
)


class WeightsUnavailable(RuntimeError):
    """The configured weights cannot be loaded. We never fall back to random weights."""


def _choice(variable: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"Variable {variable} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that changes the vectors; its fingerprint is the feature version."""

    weights: str = "imagenet"
    input_size: int = 224
    layer: str = "block5_pool"
    pooling: str = "avg"
    resize: str = "squash"
    interpolation: str = "bilinear"
    jpeg_decode: str = "reduced"
    precision: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("similarity_feature_layer", self.layer, ALLOWED_LAYERS)
        _choice("similarity_feature_pooling", self.pooling, POOLINGS)
        _choice("similarity_resize_mode", self.resize, RESIZE_MODES)
        _choice("similarity_resize_interpolation", self.interpolation, tuple(INTERPOLATIONS))
        _choice("similarity_jpeg_decode", self.jpeg_decode, JPEG_DECODES)
        _choice("similarity_extract_precision", self.precision, PRECISIONS)
        if self.input_size < 32:
            raise ValueError(f"similarity_input_size must be >= 32 (VGG16's minimum), got {self.input_size}")
        # The version must describe the pixels actually decoded.
        object.__setattr__(self, "jpeg_decode", effective_jpeg_decode(self.interpolation, self.jpeg_decode))

    @classmethod
    def from_settings(cls, settings: Settings) -> FeatureSpec:
        return cls(
            weights=settings.vgg16_weights,
            input_size=settings.input_size,
            layer=settings.feature_layer,
            pooling=settings.feature_pooling,
            resize=settings.resize_mode,
            interpolation=settings.resize_interpolation,
            jpeg_decode=settings.jpeg_decode,
            precision=settings.extract_precision,
            seed=settings.random_seed,
        )

    @property
    def version(self) -> str:
        """Readable and stored with every vector: a change anywhere here means new vectors."""
        decode = f"{self.resize}-{self.interpolation}-{self.jpeg_decode}"
        return (
            f"vgg16:{self.layer}:{self.pooling}:{self.input_size}:{decode}:{PREPROCESSING}:"
            f"{self.precision}:{weights_id(self)}"
        )


def weights_id(spec: FeatureSpec) -> str:
    if spec.weights == "imagenet":
        return f"imagenet@keras-{package_version('keras')}"
    if spec.weights == "random":
        return f"random-zero-mean-he-seed{spec.seed}"
    if not Path(spec.weights).is_file():
        raise WeightsUnavailable(
            f"similarity_vgg16_weights={spec.weights!r} is neither 'imagenet', 'random' nor an existing file"
        )
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


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1, norms)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Keras: backend set-up, weights, the model


def configure_backend() -> None:
    """Before Keras is imported: TensorFlow by default; GPU memory taken as needed, not all at once."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def gpu_available() -> bool:
    """Whether the active Keras backend sees a GPU."""
    configure_backend()
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            with contextlib.suppress(RuntimeError):  # already initialised: the env default applies
                tf.config.experimental.set_memory_growth(gpu, True)
        return bool(gpus)
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    return False


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Build layers under a mixed-precision policy without leaving it set for anyone else."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _seeded_zero_mean_he_init(model: Any, seed: int) -> None:
    """Deterministic random filters from numpy, identical on every Keras backend.

    He-normal kernels with each filter's mean removed and its scale restored: such filters
    answer to edges and texture rather than to flat brightness, so random features still
    tell pictures apart (plain He filters give cosines of ~0.99 between any two images).
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if len(weights) == 2:
            kernel, bias = weights
            std = np.sqrt(2.0 / int(np.prod(kernel.shape[:-1])))
            kernel = rng.normal(0.0, std, kernel.shape)
            kernel -= kernel.mean(axis=(0, 1, 2), keepdims=True)
            kernel *= std / kernel.std(axis=(0, 1, 2), keepdims=True)
            layer.set_weights([kernel.astype(np.float32), np.zeros_like(bias)])


def load_vgg16(spec: FeatureSpec) -> Any:
    """Keras applications VGG16 without its top, with the weights spec.weights names."""
    configure_backend()
    from keras.applications import vgg16

    shape = (spec.input_size, spec.input_size, 3)
    if spec.weights == "imagenet":
        try:
            return vgg16.VGG16(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as exc:
            raise WeightsUnavailable(
                f"Could not load the ImageNet VGG16 weights through Keras ({type(exc).__name__}: {exc}). "
                f"Without network access, download {IMAGENET_WEIGHTS_URL} elsewhere and either put it "
                f"in $KERAS_HOME/models/ (default ~/.keras/models/) on every worker, or set the Variable "
                f"similarity_vgg16_weights to its path. similarity_vgg16_weights=random is for tests "
                f"and offline demos only."
            ) from exc
    if spec.weights == "random":
        base = vgg16.VGG16(include_top=False, weights=None, input_shape=shape)
        _seeded_zero_mean_he_init(base, spec.seed)
        return base
    weights_id(spec)  # a clear error for a missing file
    try:
        return vgg16.VGG16(include_top=False, weights=spec.weights, input_shape=shape)
    except Exception as exc:
        raise WeightsUnavailable(
            f"Could not load VGG16 weights from {spec.weights}: {exc}. Expected the no-top VGG16 as a "
            f"Keras .weights.h5 or the legacy {IMAGENET_WEIGHTS_FILE}"
        ) from exc


def build_keras_extractor(spec: FeatureSpec) -> Any:
    """VGG16 cut at spec.layer with global pooling: preprocessed batch -> (n, 512) float32."""
    import keras

    with dtype_policy(spec.precision):
        base = load_vgg16(spec)
        # Pooling and the output stay float32 under mixed precision.
        pool_class = (
            keras.layers.GlobalAveragePooling2D if spec.pooling == "avg" else keras.layers.GlobalMaxPooling2D
        )
        pooled = pool_class(dtype="float32")(base.get_layer(spec.layer).output)
    return keras.Model(base.input, pooled, name=f"vgg16_{spec.layer}_{spec.pooling}")


# ---------------------------------------------------------------------------------------------
# The blog post's way, kept as the reference the fast pipeline is tested against


def reference_model(spec: FeatureSpec) -> Any:
    """The post's model: VGG16(include_top=False) cut at spec.layer, returning the feature map."""
    import keras

    base = load_vgg16(spec)
    return keras.Model(base.input, base.get_layer(spec.layer).output)


def reference_vectors(paths: Sequence[str | Path], spec: FeatureSpec, model: Any = None) -> np.ndarray:
    """Per image: load_img, img_to_array, preprocess_input, model.predict; then the same
    pooling and normalisation as the pipeline. Slow on purpose: it is the yardstick."""
    import keras
    from keras.applications import vgg16

    model = model if model is not None else reference_model(spec)
    pooled = []
    for path in paths:
        img = keras.utils.load_img(
            path,
            target_size=(spec.input_size, spec.input_size),
            interpolation=spec.interpolation,
            keep_aspect_ratio=spec.resize == "center_crop",
        )
        x = np.expand_dims(keras.utils.img_to_array(img), axis=0)
        feature_map = model.predict(vgg16.preprocess_input(x), verbose=0)
        pooled.append(
            feature_map.mean(axis=(1, 2)) if spec.pooling == "avg" else feature_map.max(axis=(1, 2))
        )
    return l2_normalise(np.concatenate(pooled)) if pooled else np.zeros((0, EMBEDDING_DIM), np.float32)


# ---------------------------------------------------------------------------------------------
# Engines: run a preprocessed batch, return pooled (not yet normalised) features


class Engine(Protocol):
    name: str
    batch_size: int

    def embed(self, batch: np.ndarray) -> np.ndarray: ...


class KerasEngine:
    """The Keras model on whatever the backend runs on; batches are padded to one shape so
    compiled backends (XLA, torch) trace once."""

    name = "keras"

    def __init__(self, spec: FeatureSpec, batch_size: int) -> None:
        self.model = build_keras_extractor(spec)
        self.batch_size = batch_size

    def embed(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if n < self.batch_size:
            batch = np.concatenate([batch, np.zeros((self.batch_size - n, *batch.shape[1:]), batch.dtype)])
        return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)[:n]


def vgg16_to_ncnn(base: Any, spec: FeatureSpec) -> tuple[str, bytes]:
    """The same weights as an ncnn graph (param text, weights blob), cut and pooled like the Keras one."""
    import keras

    lines = [f"Input data 0 1 data 0={spec.input_size} 1={spec.input_size} 2=3"]
    blobs = bytearray()
    bottom = "data"
    for layer in base.layers[1:]:
        if isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            ok = (layer.kernel_size, layer.strides, layer.padding) == ((3, 3), (1, 1), "same")
            if not ok or layer.activation is not keras.activations.relu:
                raise ValueError(f"{layer.name} is not a VGG16 3x3/1 same-padded ReLU convolution")
            oihw = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype="<f4")
            blobs += struct.pack("<I", 0) + oihw.tobytes() + bias.astype("<f4").tobytes()
            lines.append(
                f"Convolution {layer.name} 1 1 {bottom} {layer.name} 0={kernel.shape[3]} 1=3 3=1 4=1 5=1 "
                f"6={kernel.size} 9=1"
            )
        elif isinstance(layer, keras.layers.MaxPooling2D):  # 2x2/2, floor like Keras' "valid"
            lines.append(f"Pooling {layer.name} 1 1 {bottom} {layer.name} 0=0 1=2 2=2 5=1")
        else:
            raise ValueError(f"unexpected layer {layer.name} in VGG16")
        bottom = layer.name
        if layer.name == spec.layer:
            break
    lines.append(f"Pooling global 1 1 {bottom} output 0={0 if spec.pooling == 'max' else 1} 4=1")
    param = f"7767517\n{len(lines)} {len(lines)}\n" + "\n".join(lines) + "\n"
    return param, bytes(blobs)


class NcnnEngine:
    """ncnn on the CPU, float32, one image at a time on every core (its batch is the image)."""

    name = "ncnn"

    def __init__(self, spec: FeatureSpec, batch_size: int, threads: int) -> None:
        import ncnn

        if spec.precision != "float32":
            raise ValueError("the ncnn engine runs float32 only; use similarity_extract_engine=keras")
        param, weights = vgg16_to_ncnn(load_vgg16(spec), spec)
        self._ncnn = ncnn
        self.net = ncnn.Net()
        self.net.opt.num_threads = threads
        self.net.opt.use_fp16_storage = self.net.opt.use_fp16_arithmetic = False
        self.net.opt.use_bf16_storage = self.net.opt.use_int8_inference = False
        # F(6,3) Winograd gains little over F(4,3) on VGG16 and rounds more.
        self.net.opt.use_winograd63_convolution = False
        if self.net.load_param_mem(param) != 0:
            raise RuntimeError("ncnn could not parse the exported VGG16 graph")
        self._weights = weights  # ncnn may read the blob in place: keep it alive with the net
        self.net.load_model_mem(weights)
        self.batch_size = batch_size

    def embed(self, batch: np.ndarray) -> np.ndarray:
        out = np.empty((len(batch), EMBEDDING_DIM), np.float32)
        for i, image in enumerate(batch):
            chw = np.ascontiguousarray(
                image.transpose(2, 0, 1), dtype=np.float32
            )  # kept alive: Mat borrows it
            extractor = self.net.create_extractor()
            extractor.input("data", self._ncnn.Mat(chw))
            status, result = extractor.extract("output")
            if status != 0:
                raise RuntimeError(f"ncnn inference failed with status {status}")
            out[i] = np.asarray(result).reshape(-1)
        return out


def ncnn_installed() -> bool:
    try:
        import ncnn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_engine(requested: str, precision: str, gpu: bool, ncnn_ok: bool) -> str:
    """auto: Keras where it has a GPU or mixed precision is asked for, ncnn on a CPU."""
    _choice("similarity_extract_engine", requested, ENGINES)
    if requested != "auto":
        if requested == "ncnn" and not ncnn_ok:
            raise RuntimeError("similarity_extract_engine=ncnn but the ncnn package is not installed")
        return requested
    if gpu or precision != "float32" or not ncnn_ok:
        return "keras"
    return "ncnn"


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_engine(spec: FeatureSpec, settings: Settings) -> tuple[Engine, str]:
    """The engine for this worker, and the device it runs on."""
    gpu = gpu_available()
    engine = choose_engine(settings.extract_engine, spec.precision, gpu, ncnn_installed())
    device = "gpu" if gpu and engine == "keras" else "cpu"
    if spec.precision != "float32" and device == "cpu":
        log.warning("mixed precision (%s) on a CPU: it runs, but it is meant for GPUs", spec.precision)
    batch_size = settings.gpu_batch_size if device == "gpu" else settings.extract_batch_size
    if engine == "ncnn":
        return NcnnEngine(spec, batch_size, threads=cpu_count()), device
    return KerasEngine(spec, batch_size), device


# ---------------------------------------------------------------------------------------------
# The pipeline: decode on threads while the engine runs, in bounded memory


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
    """An engine plus the decode pipeline. Build once, call on many images."""

    def __init__(
        self, spec: FeatureSpec, engine: Engine, workers: int = 0, max_pixels: int = 40_000_000
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
    """Extract vectors for every pending thumbnail of this shard; returns the feature files to load."""
    spec = spec or FeatureSpec.from_settings(settings)
    result = ExtractResult(feature_version=spec.version)
    pending = pending_extractions(settings.db_url, spec.version, force, shard)
    log.info("feature version %s: %d thumbnails to extract (shard %s)", spec.version, len(pending), shard)
    if not pending:
        return result
    if spec.weights == "random":
        log.warning("Using RANDOM (seeded) VGG16 weights: vectors are for tests and offline demos only")
    extractor, result.device = make_extractor(spec, settings)
    result.engine = extractor.engine.name
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
