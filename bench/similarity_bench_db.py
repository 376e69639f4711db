"""Shared set-up for the vectors/similarity benchmarks: a throw-away embedded Postgres, data, tables."""

from __future__ import annotations

import ctypes
import glob
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import devenv
import numpy as np
import psycopg2
from sketchfab_similarity.core import db
from sketchfab_similarity.core.settings import Settings


@contextmanager
def temp_database(server_settings: dict[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """(SQLAlchemy URL, socket directory) of a fresh embedded Postgres with the schema, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="sketchfab-bench-"))
    data = root / "pg"
    uri = devenv.start_postgres(data, server_settings)
    try:
        url = devenv.sqlalchemy_url(uri)
        db.apply_schema(url)
        yield url, uri.split("host=", 1)[1]
    finally:
        devenv.stop_postgres(data)
        shutil.rmtree(root, ignore_errors=True)


def settings_for(db_url: str, store: str = "", **overrides) -> Settings:
    return Settings(
        db_url=db_url, thumbnail_store=store or tempfile.mkdtemp(prefix="bench-store-"), **overrides
    )


@contextmanager
def connect(socket_dir: str) -> Iterator:
    """An autocommit connection: every statement commits (VACUUM and CONCURRENTLY work too)."""
    conn = psycopg2.connect(dbname="postgres", user="postgres", host=socket_dir)
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


def random_unit(count: int, seed: int, dim: int = 512) -> np.ndarray:
    out = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def model_uids(count: int, offset: int = 0) -> list[str]:
    """32-hex uids that are easy to generate in SQL too: lpad(to_hex(i), 32, '0')."""
    return [f"{i:032x}" for i in range(offset, offset + count)]


def add_models(socket_dir: str, uids: list[str], thumbnails: bool = False) -> None:
    rows = "".join(f"{u}\tmodel {u}\t2026-01-01\t{{}}\thttps://sketchfab.com/3d-models/{u}\n" for u in uids)
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.copy_expert(
            "COPY sketchfab_models (uid, name, published_at, raw, viewer_url) FROM STDIN", io.StringIO(rows)
        )
        if thumbnails:
            cur.execute(
                "INSERT INTO model_thumbnails (uid, source_url, content_hash, stored_path, status) "
                "SELECT uid, 'https://media.sketchfab.com/' || uid || '.jpeg', uid, uid, 'ok' FROM sketchfab_models"
            )


def openblas_kernels() -> str:
    """Which OpenBLAS kernel numpy (and FAISS, if installed) picked: the figures depend on it."""
    names = []
    for package, pattern, symbol in (
        ("numpy", "numpy.libs/libscipy_openblas*.so", "scipy_openblas_get_corename64_"),
        ("faiss", "faiss_cpu.libs/libopenblas*.so", "openblas_get_corename"),
    ):
        try:
            module = __import__(package)
            path = glob.glob(str(Path(module.__path__[0]).parent / pattern))[0]
            fn = getattr(ctypes.CDLL(path), symbol)
            fn.restype = ctypes.c_char_p
            names.append(f"{package}: {fn().decode()}")
        except (ImportError, IndexError, AttributeError, OSError):
            names.append(f"{package}: n/a")
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return ", ".join(names) + (f" (OPENBLAS_CORETYPE={forced})" if forced else " (auto-detected)")


def fmt(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
