"""Feature extraction: feature version, engine policy, weights sources, mixed precision, the stage."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from fake_sketchfab import Catalog, start_server
from helpers import query
from PIL import Image
from sketchfab_similarity import crawl, features, thumbnails, vectors
from sketchfab_similarity.core import backend, featurespec
from sketchfab_similarity.core.featurespec import FeatureSpec, WeightsUnavailable
from sketchfab_similarity.core.images import decode_for_model
from sketchfab_similarity.core.settings import Settings
from sketchfab_similarity.core.sharding import Shard
from sketchfab_similarity.core.store import ArtifactStore
from sketchfab_similarity.features import engines, vgg16
from sketchfab_similarity.features.engines import KerasEngine, choose_engine
from sketchfab_similarity.features.extract import FeatureExtractor, ordered_prefetch_map

PHOTOS = Path(__file__).parent / "data" / "photos"


# --- feature version ---------------------------------------------------------------------------


def test_every_setting_that_changes_vectors_changes_the_version():
    base = FeatureSpec(weights="random", input_size=64)
    variants = [
        replace(base, layer="block4_pool"),
        replace(base, pooling="max"),
        replace(base, input_size=96),
        replace(base, resize="center_crop"),
        replace(base, interpolation="bicubic"),
        replace(base, jpeg_decode="full"),
        replace(base, precision="mixed_float16"),
        replace(base, seed=1),
        replace(base, weights="imagenet"),
    ]
    versions = {v.version for v in variants} | {base.version}
    assert len(versions) == len(variants) + 1
    assert base.version == FeatureSpec(weights="random", input_size=64).version  # stable


def test_nearest_always_decodes_in_full_and_the_version_says_so():
    spec = FeatureSpec(interpolation="nearest", jpeg_decode="reduced")
    assert spec.jpeg_decode == "full" and "nearest-full" in spec.version
    assert spec.version == FeatureSpec(interpolation="nearest", jpeg_decode="full").version


def test_weights_file_version_follows_its_content(tmp_path):
    path = tmp_path / "w.weights.h5"
    path.write_bytes(b"one")
    first = FeatureSpec(weights=str(path)).version
    path.write_bytes(b"two")
    os.utime(path, ns=(1, 1))
    assert FeatureSpec(weights=str(path)).version != first
    with pytest.raises(WeightsUnavailable, match="neither 'imagenet', 'random' nor an existing file"):
        _ = FeatureSpec(weights=str(tmp_path / "missing.h5")).version


@pytest.mark.parametrize(
    ("field", "value", "variable"),
    [
        ("layer", "block3_pool", "similarity_feature_layer"),
        ("pooling", "sum", "similarity_feature_pooling"),
        ("resize", "pad", "similarity_resize_mode"),
        ("interpolation", "area", "similarity_resize_interpolation"),
        ("jpeg_decode", "fast", "similarity_jpeg_decode"),
        ("precision", "float16", "similarity_extract_precision"),
    ],
)
def test_bad_values_name_the_variable(field, value, variable):
    with pytest.raises(ValueError, match=f"Variable {variable} must be one of"):
        FeatureSpec(**{field: value})


def test_settings_reach_the_spec():
    settings = Settings(
        feature_layer="block4_conv3", feature_pooling="max", resize_mode="center_crop",
        resize_interpolation="lanczos", jpeg_decode="full", extract_precision="mixed_bfloat16",
        vgg16_weights="random", random_seed=7, input_size=96,
    )  # fmt: skip
    assert FeatureSpec.from_settings(settings) == FeatureSpec(
        weights="random", input_size=96, layer="block4_conv3", pooling="max", resize="center_crop",
        interpolation="lanczos", jpeg_decode="full", precision="mixed_bfloat16", seed=7,
    )  # fmt: skip


# --- engine and precision policy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "precision", "gpu", "ncnn_ok", "expected"),
    [
        ("auto", "float32", False, True, "ncnn"),  # CPU: Winograd engine
        ("auto", "float32", True, True, "keras"),  # GPU: Keras on the GPU
        ("auto", "mixed_float16", False, True, "keras"),  # mixed precision is a Keras policy
        ("auto", "float32", False, False, "keras"),  # no ncnn installed
        ("keras", "float32", False, True, "keras"),
        ("ncnn", "float32", True, True, "ncnn"),
    ],
)
def test_engine_choice(requested, precision, gpu, ncnn_ok, expected):
    assert choose_engine(requested, precision, gpu, ncnn_ok) == expected


def test_engine_choice_errors():
    with pytest.raises(RuntimeError, match="ncnn package is not installed"):
        choose_engine("ncnn", "float32", False, False)
    with pytest.raises(ValueError, match="similarity_extract_engine"):
        choose_engine("onnx", "float32", False, True)


def test_backend_defaults_keep_tensorflow_and_grow_gpu_memory(monkeypatch):
    for name in ("KERAS_BACKEND", "TF_FORCE_GPU_ALLOW_GROWTH", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KERAS_BACKEND", "jax")  # a user's choice wins
    backend.configure_backend()
    assert os.environ["KERAS_BACKEND"] == "jax"
    assert os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


def test_prefetch_keeps_memory_bounded():
    in_flight, peak, lock = 0, 0, threading.Lock()

    def work(i: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.001)
        return i

    with ThreadPoolExecutor(8) as pool:
        results = []
        for future in ordered_prefetch_map(work, range(200), pool, window=5):
            results.append(future.result())
            with lock:
                in_flight -= 1
    assert results == list(range(200)) and peak <= 5


# --- weights, precision: real Keras --------------------------------------------------------------


def photo_batch(spec: FeatureSpec) -> np.ndarray:
    return np.stack(
        [
            featurespec.preprocess(decode_for_model(p.read_bytes(), spec.input_size))
            for p in sorted(PHOTOS.glob("*.jpg"))
        ]
    )


@pytest.mark.integration
def test_weights_files_in_both_keras_formats_give_the_same_vectors(tmp_path):
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    spec = FeatureSpec(weights="random", input_size=64, seed=3)
    base = vgg16.load_vgg16(spec)
    keras_file = tmp_path / "vgg16_notop.weights.h5"
    base.save_weights(keras_file)
    legacy_file = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(legacy_file, "w") as f:  # the layout of the file Keras distributes
        save_weights_to_hdf5_group(f, base)
    batch = photo_batch(spec)
    expected = KerasEngine(spec, 8).embed(batch)
    for path in (keras_file, legacy_file):
        from_file = replace(spec, weights=str(path))
        assert from_file.version != spec.version and "file-sha256-" in from_file.version
        assert np.array_equal(KerasEngine(from_file, 8).embed(batch), expected), path.name
    not_weights = tmp_path / "notes.weights.h5"
    not_weights.write_bytes(b"not hdf5")
    with pytest.raises(WeightsUnavailable, match="Expected the no-top VGG16"):
        vgg16.load_vgg16(replace(spec, weights=str(not_weights)))


@pytest.mark.integration
def test_imagenet_without_network_or_cache_fails_with_instructions(tmp_path):
    """Keras' real loader, an empty cache and a proxy that refuses: never random, always a way out."""
    code = (
        "from sketchfab_similarity.core.featurespec import FeatureSpec\nfrom sketchfab_similarity.features.vgg16 import load_vgg16\n"
        "load_vgg16(FeatureSpec(weights='imagenet', input_size=32))\n"
    )
    env = {
        **os.environ,
        "KERAS_HOME": str(tmp_path / "keras"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "PYTHONPATH": str(Path(__file__).parent.parent / "plugins"),
    }
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "WeightsUnavailable" in run.stderr
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in run.stderr
    assert "similarity_vgg16_weights" in run.stderr and "models/" in run.stderr


@pytest.mark.integration
def test_mixed_precision_runs_and_leaves_the_global_policy_alone():
    import keras

    spec = FeatureSpec(weights="random", input_size=64)
    batch = photo_batch(spec)
    full = KerasEngine(spec, 8)
    mixed = KerasEngine(replace(spec, precision="mixed_bfloat16"), 8)
    assert keras.config.dtype_policy().name == "float32"
    conv = mixed.model.get_layer("block1_conv1")
    assert conv.compute_dtype == "bfloat16" and conv.variable_dtype == "float32"
    a = featurespec.l2_normalise(full.embed(batch))
    b = featurespec.l2_normalise(mixed.embed(batch))
    assert b.dtype == np.float32
    cosines = (a * b).sum(axis=1)
    assert cosines.min() > 0.99 and not np.array_equal(a, b), cosines


# --- the stage: real Postgres, real HTTP, real engines ---------------------------------------------


def crawl_and_download(settings) -> None:
    crawl.crawl(settings, crawl.incremental_window(settings.db_url, timedelta(hours=1)))
    thumbnails.download_thumbnails(settings)


@pytest.mark.integration
def test_bad_files_are_recorded_and_the_batch_goes_on(make_settings):
    catalog = Catalog.generate(12, seed=11)
    with start_server(catalog) as server:
        settings = make_settings(
            api_base_url=server.api_base_url, thumbnail_hosts=(server.media_host,), extract_batch_size=4
        )
        crawl_and_download(settings)
    rows = query(
        settings.db_url, "SELECT uid, stored_path FROM model_thumbnails WHERE status = 'ok' ORDER BY uid"
    )
    store = ArtifactStore(settings.thumbnail_store)
    vanished, corrupt = rows[0], rows[1]
    Path(store.path(vanished[1])).unlink()
    data = Path(store.path(corrupt[1])).read_bytes()
    Path(store.path(corrupt[1])).write_bytes(data[: len(data) // 3])

    result = features.extract_features(settings)
    assert result.extracted == len(rows) - 2 and result.failed == 2
    assert "FileNotFoundError" in result.failures[vanished[0]]
    assert "truncated or corrupt" in result.failures[corrupt[0]]
    recorded = dict(query(settings.db_url, "SELECT uid, error FROM model_thumbnails WHERE status = 'failed'"))
    assert set(recorded) == {vanished[0], corrupt[0]}
    assert all(e.startswith("[transient] extract:") for e in recorded.values())

    vectors.load_vectors(settings, result.files)
    again = features.extract_features(settings)
    assert again.extracted == 0 and again.failed == 0


@pytest.mark.integration
def test_shards_split_the_work_and_version_or_force_redo_it(make_settings):
    catalog = Catalog.generate(16, seed=12)
    with start_server(catalog) as server:
        settings = make_settings(api_base_url=server.api_base_url, thumbnail_hosts=(server.media_host,))
        crawl_and_download(settings)
    shards = [features.extract_features(settings, shard=s) for s in Shard.all(3)]
    assert sum(r.extracted for r in shards) == 16
    assert {r.engine for r in shards} == {"ncnn"} and {r.device for r in shards} == {"cpu"}
    for r in shards:
        vectors.load_vectors(settings, r.files)
    assert features.extract_features(settings).extracted == 0
    assert features.extract_features(settings, force=True).extracted == 16
    # A different pooling is a new feature version: everything is pending again, nothing is mixed.
    max_pooled = replace(settings, feature_pooling="max")
    result = features.extract_features(max_pooled)
    assert result.extracted == 16 and result.feature_version != shards[0].feature_version
    vectors.load_vectors(max_pooled, result.files)
    assert query(settings.db_url, "SELECT DISTINCT feature_version FROM model_embeddings") == [
        (result.feature_version,)
    ]


@pytest.mark.integration
def test_engines_agree_through_the_stage(make_settings, tmp_path):
    """The same thumbnails through both engines give the same vectors (the version ignores the engine)."""
    images = []
    for i, photo in enumerate(sorted(PHOTOS.glob("*.jpg"))):
        buf = io.BytesIO()
        Image.open(photo).save(buf, "PNG" if i % 2 else "JPEG")
        images.append(buf.getvalue())
    spec = FeatureSpec(weights="random", input_size=64)
    out = {}
    for engine in ("ncnn", "keras"):
        built, _ = engines.make_engine(spec, Settings(extract_engine=engine, extract_batch_size=3))
        items = [features.PendingImage(f"{i:032x}", str(i), "") for i in range(len(images))]
        done, matrix, failures = FeatureExtractor(spec, built).run(
            items, lambda it: images[int(it.stored_path)]
        )
        assert not failures and len(done) == len(images)
        out[engine] = matrix
    assert np.abs(out["ncnn"] - out["keras"]).max() < 1e-4
