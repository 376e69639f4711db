"""The feature spec: everything that changes a vector, and the version string that fingerprints it.

Shared by extraction (which computes vectors), loading (which checks their dimension) and the
refresh (which rebuilds when the version changes). The vector dimension is defined here once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .images import INTERPOLATIONS, JPEG_DECODES, RESIZE_MODES, effective_jpeg_decode

if TYPE_CHECKING:
    from .settings import Settings

EMBEDDING_DIM = 512


# Layers whose output has 512 channels, so the pooled vector fits the vector(512) column.
ALLOWED_LAYERS = ("block4_conv1", "block4_conv2", "block4_conv3", "block4_pool",
                  "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool")  # fmt: skip


POOLINGS = ("avg", "max")


PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


# keras.applications.vgg16.preprocess_input ("caffe" mode): RGB -> BGR, minus the ImageNet mean.
IMAGENET_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)


PREPROCESSING = "caffe"


class WeightsUnavailable(RuntimeError):
    """The configured weights cannot be loaded. We never fall back to random weights."""


def check_choice(variable: str, value: str, allowed: Sequence[str]) -> None:
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
        check_choice("similarity_feature_layer", self.layer, ALLOWED_LAYERS)
        check_choice("similarity_feature_pooling", self.pooling, POOLINGS)
        check_choice("similarity_resize_mode", self.resize, RESIZE_MODES)
        check_choice("similarity_resize_interpolation", self.interpolation, tuple(INTERPOLATIONS))
        check_choice("similarity_jpeg_decode", self.jpeg_decode, JPEG_DECODES)
        check_choice("similarity_extract_precision", self.precision, PRECISIONS)
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
