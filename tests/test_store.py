"""ArtifactStore: a corrupt file at a key is repaired by the next put; read errors are transient."""

from __future__ import annotations

import hashlib
import os

import pytest
from sketchfab_similarity.core.store import ArtifactStore, TransientReadError
from sketchfab_similarity.features.extract import mark_unreadable

DATA = b"\xff\xd8" + bytes(range(256)) * 40 + b"\xff\xd9"
KEY = ArtifactStore.key_for(hashlib.sha256(DATA).hexdigest())


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield ArtifactStore(str(tmp_path / "store"))
        return
    root = f"memory://store-{os.getpid()}-{id(request)}"
    yield ArtifactStore(root)
    ArtifactStore(root).fs.rm(root, recursive=True)


def test_put_writes_once_and_keeps_an_intact_file(store):
    assert store.put(KEY, DATA) is True
    assert store.put(KEY, DATA) is False
    assert store.get(KEY) == DATA


@pytest.mark.parametrize("damage", [lambda d: d[: len(d) // 2], lambda d: d[:-1] + b"\x00", lambda d: b""])
def test_a_truncated_or_corrupt_stored_file_is_replaced(store, damage):
    store.put(KEY, DATA)
    store.fs.pipe_file(store.path(KEY), damage(DATA))  # a crash or a bad disk left these bytes
    assert store.put(KEY, DATA) is True, "the download repairs the file"
    assert store.get(KEY) == DATA


def test_local_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path / "store"))
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    store.put(KEY, DATA)
    assert events[:2] == ["fsync", "replace"]
    assert not [p for p in (tmp_path / "store").rglob("*.tmp")]


def test_a_read_error_is_transient_and_a_missing_file_is_not(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(FileNotFoundError):
        store.read(KEY)
    store.put(KEY, DATA)

    def blip(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store.fs, "cat_file", blip)
    with pytest.raises(TransientReadError, match="Input/output error"):
        store.read(KEY)


def test_a_transient_read_failure_does_not_discard_the_thumbnail(monkeypatch):
    calls: list[list[str]] = []

    class FakeCursor:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, sql, params):
            calls.append(list(params))

    class FakeConn:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def cursor(self):
            return FakeCursor()

    from sketchfab_similarity.features import extract

    monkeypatch.setattr(extract, "connect", lambda url: FakeConn())
    mark_unreadable("db", {"u1": "TransientReadError: OSError: [Errno 5] Input/output error"})
    assert calls == []
    mark_unreadable("db", {"u1": "TransientReadError: blip", "u2": "UnidentifiedImageError: not an image"})
    assert [c[1] for c in calls] == ["u2"]
