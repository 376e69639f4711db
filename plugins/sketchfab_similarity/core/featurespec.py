"""The feature spec: everything that changes a vector, and the version string that fingerprints it.

Shared by extraction (which computes vectors), loading (which checks their dimension) and the
refresh (which rebuilds when the version changes). The vector dimension is defined here once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cache
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np

from .images import effective_jpeg_decode
from .settings import Settings, check_value, default_value

EMBEDDING_DIM = 512
SPEC_SETTINGS = {
    "weights": "vgg16_weights", "input_size": "input_size", "layer": "feature_layer",
    "pooling": "feature_pooling", "resize": "resize_mode", "interpolation": "resize_interpolation",
    "jpeg_decode": "jpeg_decode", "precision": "extract_precision", "seed": "random_seed",
}  # fmt: skip
"""FeatureSpec attribute -> the Settings field it comes from (defaults and checks are the field's)."""


# keras.applications.vgg16.preprocess_input ("caffe" mode): RGB -> BGR, minus the ImageNet mean.
IMAGENET_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)


PREPROCESSING = "caffe"


class WeightsUnavailable(RuntimeError):
    """The configured weights cannot be loaded. We never fall back to random weights."""


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that changes the vectors; its fingerprint is the feature version."""

    weights: str = default_value("vgg16_weights")
    input_size: int = default_value("input_size")
    layer: str = default_value("feature_layer")
    pooling: str = default_value("feature_pooling")
    resize: str = default_value("resize_mode")
    interpolation: str = default_value("resize_interpolation")
    jpeg_decode: str = default_value("jpeg_decode")
    precision: str = default_value("extract_precision")
    seed: int = default_value("random_seed")

    def __post_init__(self) -> None:
        for attr, setting_name in SPEC_SETTINGS.items():
            check_value(setting_name, getattr(self, attr))
        # The version must describe the pixels actually decoded.
        object.__setattr__(self, "jpeg_decode", effective_jpeg_decode(self.interpolation, self.jpeg_decode))

    @classmethod
    def from_settings(cls, settings: Settings) -> FeatureSpec:
        return cls(**{attr: getattr(settings, name) for attr, name in SPEC_SETTINGS.items()})

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
