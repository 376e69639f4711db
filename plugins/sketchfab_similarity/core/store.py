"""The artifact store: content-addressed thumbnails and the feature files between extract and load.

A local path or any fsspec URL (file://, s3://, memory://, ...). The feature-file
format (an .npz of uids, content hashes, float32 vectors and the feature version) is
written and read here and nowhere else.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    from .settings import Settings


class ArtifactStore:
    """Content-addressed files under a local path or any fsspec URL (file://, s3://, memory://, ...).

    Keys are `<first two hex digits>/<sha256>.<ext>` (git's object layout): at most 256
    directories, so a local store creates each directory once and never again.
    """

    EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        """`storage_options` are fsspec's (credentials, endpoint): see `store_options_from_connection`."""
        self.fs, self.root = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
        self.root = self.root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)
        self._made_dirs: set[str] = set()

    @classmethod
    def for_settings(cls, settings: Settings) -> ArtifactStore:
        return cls(settings.thumbnail_store, settings.thumbnail_store_options)

    @classmethod
    def key_for(cls, content_hash: str, image_format: str = "JPEG") -> str:
        return f"{content_hash[:2]}/{content_hash}.{cls.EXTENSIONS.get(image_format, 'img')}"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes) -> bool:
        """Write once; returns False when the content was already stored. Atomic via rename."""
        path = self.path(key)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        parent = path.rsplit("/", 1)[0]
        if self._local:  # plain system calls: fsspec's layers cost more than the write itself
            if os.path.exists(path):
                return False
            if parent not in self._made_dirs:
                os.makedirs(parent, exist_ok=True)
                self._made_dirs.add(parent)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return True
        if self.fs.exists(path):
            return False
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)
        return True

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    # --- feature files ---------------------------------------------------------------------

    def write_features(self, batch: FeatureBatch) -> str:
        """Store a feature file under its deterministic key (rerun work overwrites the same file)."""
        key = batch.key()
        buf = io.BytesIO()
        np.savez(
            buf,
            uids=np.array(batch.uids),
            content_hashes=np.array(batch.content_hashes),
            vectors=np.asarray(batch.vectors, dtype=np.float32),
            feature_version=np.array(batch.feature_version),
        )
        path = self.path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, buf.getvalue())
        return key

    def read_features(self, key: str) -> FeatureBatch:
        with np.load(io.BytesIO(self.get(key)), allow_pickle=False) as data:
            return FeatureBatch(
                uids=[str(u) for u in data["uids"]],
                content_hashes=[str(h) for h in data["content_hashes"]],
                vectors=np.asarray(data["vectors"]),
                feature_version=str(data["feature_version"]),
            )

    def feature_ids(self, key: str) -> tuple[list[str], list[str], str]:
        """A feature file's uids, content hashes and version, without reading its vectors."""
        with self.fs.open(self.path(key), "rb") as f, np.load(f, allow_pickle=False) as data:
            return data["uids"].tolist(), data["content_hashes"].tolist(), str(data["feature_version"])


@dataclass(frozen=True)
class FeatureBatch:
    uids: list[str]
    content_hashes: list[str]
    vectors: np.ndarray
    feature_version: str

    def key(self) -> str:
        """Deterministic name from the version and the exact inputs: the same work rerun overwrites it."""
        digest = hashlib.sha256(self.feature_version.encode())
        for uid, content_hash in zip(self.uids, self.content_hashes, strict=True):
            digest.update(f"{uid}:{content_hash};".encode())
        version_dir = hashlib.sha256(self.feature_version.encode()).hexdigest()[:16]
        return f"features/{version_dir}/{digest.hexdigest()[:32]}.npz"
