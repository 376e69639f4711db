"""Engines: run a preprocessed batch, return pooled (not yet normalised) features.

Keras itself (any backend: TensorFlow, JAX or PyTorch, on a GPU when there is one, with
optional mixed precision), or on a CPU the same weights exported to ncnn, whose Winograd
convolutions do the 3x3 layers with fewer multiplications. Both agree with the blog
post's per-image reference (`reference.py`) within 1e-4.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Protocol

import numpy as np

from ..core.backend import cpu_count, gpu_available
from ..core.featurespec import EMBEDDING_DIM, FeatureSpec
from ..core.settings import Settings, check_value
from .vgg16 import build_keras_extractor, load_vgg16

log = logging.getLogger(__name__)


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
    check_value("extract_engine", requested)
    if requested != "auto":
        if requested == "ncnn" and not ncnn_ok:
            raise RuntimeError("similarity_extract_engine=ncnn but the ncnn package is not installed")
        return requested
    if gpu or precision != "float32" or not ncnn_ok:
        return "keras"
    return "ncnn"


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
