"""Storage garbage collection and the removal of loaded feature files."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import execute, query
from sketchfab_similarity import vectors
from sketchfab_similarity.core.featurespec import FeatureSpec
from sketchfab_similarity.core.store import ArtifactStore, FeatureBatch
from sketchfab_similarity.thumbnails import gc

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
DAY = 24 * 3600


def add_model(db_url: str, uid: str, stored_path: str | None) -> None:
    execute(
        db_url,
        "INSERT INTO sketchfab_models (uid, name, published_at, raw) VALUES (%s, 'm', now(), '{}')",
        (uid,),
    )
    execute(
        db_url,
        "INSERT INTO model_thumbnails (uid, source_url, status, content_hash, stored_path, error) "
        "VALUES (%s, 'http://x/a.jpg', %s, %s, %s, %s)",
        (
            uid,
            "ok" if stored_path else "failed",
            stored_path and stored_path[3:67],
            stored_path,
            None if stored_path else "[permanent] HTTP 404: Not Found",
        ),
    )


def thumbnail(store: ArtifactStore, content: bytes) -> str:
    key = ArtifactStore.key_for(hashlib.sha256(content).hexdigest())
    store.put(key, content)
    return key


def age(store: ArtifactStore, key: str, seconds: float) -> None:
    path = store.path(key)
    then = os.path.getmtime(path) - seconds
    os.utime(path, (then, then))


def test_gc_lists_then_removes_only_old_unreferenced_files(make_settings):
    settings = make_settings()
    store = ArtifactStore(settings.thumbnail_store)
    kept, orphan, young = (thumbnail(store, bytes([i]) * 100) for i in range(3))
    add_model(settings.db_url, "a" * 32, kept)
    add_model(settings.db_url, "b" * 32, None)
    tmp = kept + ".0123.tmp"
    store.fs.pipe_file(store.path(tmp), b"half")
    feature = store.write_features(FeatureBatch(["c" * 32], ["h"], np.ones((1, 512), np.float32), "v1"))
    store.fs.makedirs(store.path("notes"), exist_ok=True)
    store.fs.pipe_file(store.path("notes/readme.txt"), b"not ours")
    for key in (kept, orphan, tmp, feature, "notes/readme.txt"):
        age(store, key, 2 * DAY)

    listed = gc.collect_garbage(settings)  # dry run by default
    assert (listed.orphan_thumbnails, listed.temporary_files, listed.feature_files) == (
        [orphan],
        [tmp],
        [feature],
    )
    assert listed.removed == 0 and all(store.fs.exists(store.path(k)) for k in listed.keys)

    done = gc.collect_garbage(settings, dry_run=False)
    assert done.removed == 3 and not any(store.fs.exists(store.path(k)) for k in listed.keys)
    for key in (kept, young, "notes/readme.txt"):  # referenced, too young to judge, not ours
        assert store.fs.exists(store.path(key)), key
    assert gc.collect_garbage(settings, dry_run=False).removed == 0


def test_gc_command_is_a_dry_run_unless_told(make_settings):
    settings = make_settings()
    store = ArtifactStore(settings.thumbnail_store)
    orphan = thumbnail(store, b"x" * 50)
    age(store, orphan, 2 * DAY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "tools")])}
    cmd = [sys.executable, "-m", "sketchfab_similarity.thumbnails.gc", "--db-url", settings.db_url]
    cmd += ["--store", settings.thumbnail_store]
    dry = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=120)
    assert f"would remove orphan thumbnail: {orphan}" in dry.stdout and store.fs.exists(store.path(orphan))
    wet = subprocess.run([*cmd, "--delete"], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert f"removed orphan thumbnail: {orphan}" in wet.stdout and not store.fs.exists(store.path(orphan))
    assert dry.stdout.splitlines()[-1].endswith("(dry run)") and wet.stdout.splitlines()[-1].endswith(
        "removed"
    )
    again = subprocess.run(
        [*cmd, "--delete"], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert again.stdout.splitlines()[-1] == "0 files, 0 bytes removed"  # nothing left, and not a dry run


def test_loaded_feature_files_are_removed_and_bad_keys_refused_unread(make_settings):
    settings = make_settings()
    store = ArtifactStore(settings.thumbnail_store)
    uids = [f"{i:032x}" for i in range(1, 5)]
    for uid in uids:
        add_model(settings.db_url, uid, None)
    matrix = np.eye(4, 512, dtype=np.float32)
    version = FeatureSpec.from_settings(settings).version
    keys = [
        store.write_features(FeatureBatch(uids[i : i + 2], ["h1", "h2"], matrix[i : i + 2], version))
        for i in (0, 2)
    ]
    hostile = ["../../etc/passwd", "features/x/../../secret.npz", "s3://other-bucket/features/a.npz", 7]
    stats = vectors.load_vectors(settings, [*keys, *hostile], remove_loaded=True)
    assert stats.loaded == 4 and stats.files_removed == 2
    assert sorted(stats.failed_files) == sorted(str(k) for k in hostile)
    assert all("not a feature-file key" in r for r in stats.failed_files.values())
    assert not any(store.fs.exists(store.path(k)) for k in keys)
    assert query(settings.db_url, "SELECT count(*) FROM model_embeddings")[0][0] == 4


@pytest.mark.parametrize("mode", ["off", "dry-run", "delete"])
def test_the_dag_task_follows_the_storage_gc_variable(make_settings, monkeypatch, mode):
    from airflow.sdk.exceptions import AirflowSkipException
    from sketchfab_similarity import tasks

    settings = make_settings(storage_gc=mode, storage_gc_min_age_hours=2)
    monkeypatch.setattr(tasks, "settings_for", lambda context: settings)
    store = ArtifactStore(settings.thumbnail_store)
    kept, orphan, young = (thumbnail(store, bytes([i]) * 100) for i in range(3))
    add_model(settings.db_url, "a" * 32, kept)
    age(store, kept, 3 * 3600)
    age(store, orphan, 3 * 3600)
    age(store, young, 3600)  # younger than the minimum age: never touched
    if mode == "off":
        with pytest.raises(AirflowSkipException, match="similarity_storage_gc"):
            tasks.collect_garbage({})
        result = None
    else:
        result = tasks.collect_garbage({})
        assert result["orphan_thumbnails"] == 1 and result["dry_run"] == (mode == "dry-run")
    left = {f.key for f in store.files()}
    assert left == ({kept, young} if mode == "delete" else {kept, orphan, young}), result
