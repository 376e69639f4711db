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
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    from .settings import Settings

FEATURE_KEY = re.compile(r"features/[0-9a-f]{16}/[0-9a-f]{32}\.npz")
"""What FeatureBatch.key() produces; keys arriving through XCom must match before they are read."""
THUMBNAIL_KEY = re.compile(r"[0-9a-f]{2}/[0-9a-f]{64}\.(jpg|png|webp|img)")
"""What ArtifactStore.key_for() produces."""


@dataclass(frozen=True)
class StoredFile:
    key: str
    size: int
    mtime: float | None
    """Seconds since the epoch; None where the filesystem does not say."""


def _fsync_dir(path: str) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TransientReadError(OSError):
    """The store could not be read just now (an I/O error, a network blip): not bad content."""


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
        """Write once; returns False when the same content is already stored. Atomic via rename.

        A file already at the key is checked (size, then SHA-256 against `data`) and replaced
        when it differs: a truncated or corrupt file left by a crash or a bad disk is repaired by
        the next download instead of failing extraction forever. Local files are fsynced before
        the rename, so a crash never leaves a complete-looking name over incomplete bytes.
        """
        path = self.path(key)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        parent = path.rsplit("/", 1)[0]
        if self._local:  # plain system calls: fsspec's layers cost more than the write itself
            if self._local_matches(path, data):
                return False
            if parent not in self._made_dirs:
                os.makedirs(parent, exist_ok=True)
                self._made_dirs.add(parent)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(parent)
            return True
        if self.fs.exists(path) and self._remote_matches(path, data):
            return False
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)
        return True

    @staticmethod
    def _local_matches(path: str, data: bytes) -> bool:
        try:
            if os.stat(path).st_size != len(data):
                return False
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
        except FileNotFoundError:
            return False

    def _remote_matches(self, path: str, data: bytes) -> bool:
        if self.fs.size(path) != len(data):
            return False
        return hashlib.sha256(self.fs.cat_file(path)).digest() == hashlib.sha256(data).digest()

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def delete(self, key: str) -> None:
        """Remove one file; a file that is already gone is fine."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(key))

    def files(self) -> Iterator[StoredFile]:
        """Every file under the root, with its key (path relative to the root), size and mtime."""
        if not self.fs.exists(self.root):
            return
        for path, info in self.fs.find(self.root, detail=True).items():
            key = path[len(self.root) :].lstrip("/") if path.startswith(self.root) else path
            mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
            if hasattr(mtime, "timestamp"):
                mtime = mtime.timestamp()
            yield StoredFile(key, int(info.get("size") or 0), float(mtime) if mtime is not None else None)

    def read(self, key: str) -> bytes:
        """`get`, with failures to read (other than a missing file) raised as TransientReadError."""
        try:
            return self.get(key)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise TransientReadError(f"{type(exc).__name__}: {exc}") from exc

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
