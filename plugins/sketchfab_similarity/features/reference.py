"""The blog post's way, kept as the yardstick the fast pipeline is tested and benchmarked against.

Per image: `load_img`, `img_to_array`, `preprocess_input`, `model.predict`. Production code
never imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.featurespec import EMBEDDING_DIM, FeatureSpec, l2_normalise
from .vgg16 import load_vgg16


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
