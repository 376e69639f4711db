"""Keras' VGG16 without its top, with the weights the spec names, cut and pooled to 512 floats.

Weights always come from Keras: ImageNet through its loader and cache, a weights file,
or explicit seeded random filters for tests and offline demos. It never falls back to
random weights by itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..core.backend import configure_backend
from ..core.featurespec import FeatureSpec, WeightsUnavailable, weights_id

IMAGENET_WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


IMAGENET_WEIGHTS_URL = (
    f"https://storage.googleapis.com/tensorflow/keras-applications/vgg16/{IMAGENET_WEIGHTS_FILE}"
)


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
