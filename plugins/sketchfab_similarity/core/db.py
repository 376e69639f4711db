"""Database access: engine, versioned schema migrations and raw psycopg2 connections.

SQLAlchemy gives URL handling and pooling; stages use the raw psycopg2
connection underneath for COPY and `execute_values`, which SQLAlchemy does not wrap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import psycopg2.errors
import sqlalchemy as sa

log = logging.getLogger(__name__)

SQL_DIR = Path(os.environ.get("SIMILARITY_SQL_DIR", Path(__file__).resolve().parents[3] / "sql"))

# Arbitrary constant: serialises schema migration between concurrent tasks.
_SCHEMA_LOCK_KEY = 0x5F1A_0001


@cache
def get_engine(db_url: str) -> sa.Engine:
    """One pooled engine per database URL and process."""
    if not db_url:
        raise ValueError("No database URL: set the similarity_db connection")
    return sa.create_engine(db_url, pool_pre_ping=True, pool_size=4, max_overflow=8)


def schema_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    files = sorted(sql_dir.glob("[0-9][0-9][0-9]_*.sql"))
    if not files:
        raise FileNotFoundError(f"No numbered .sql files in {sql_dir} (set SIMILARITY_SQL_DIR)")
    return files


MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
"""Which numbered files are applied. Created here, not in a migration: it records the migrations."""


def _applied(cur: Any) -> dict[str, str] | None:
    """Applied versions and their checksums; None when the table does not exist yet."""
    cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not cur.fetchone()[0]:
        return None
    cur.execute("SELECT version, checksum FROM schema_migrations")
    return dict(cur.fetchall())


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def apply_schema(db_url: str, sql_dir: Path = SQL_DIR, lock_timeout_s: float = 5.0) -> list[str]:
    """Apply each numbered migration that is not applied yet, once, in order; return their names.

    A run with nothing new reads `schema_migrations` and takes no lock at all, so readers of
    `model_similarity` and `sketchfab_models` never queue behind the schema step. A new migration
    runs in its own transaction under `lock_timeout`: if a reader holds a table it must alter, the
    migration gives up after `lock_timeout_s` (the task fails and is retried) instead of making
    every new query wait behind its lock. Files are idempotent, so a database created before
    versions were recorded has each file applied once more and recorded.
    """
    files = schema_files(sql_dir)
    with connect(db_url) as conn, conn.cursor() as cur:
        applied = _applied(cur)
    if applied is not None and all(p.stem in applied for p in files):
        _warn_changed(files, applied)
        return []
    done = []
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))  # one migrator at a time
        if _applied(cur) is None:
            cur.execute(MIGRATIONS_TABLE)
        conn.commit()  # the advisory lock ends here; each migration below takes it again
    for path in files:
        with connect(db_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
            cur.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (path.stem,))
            if cur.fetchone():
                continue
            cur.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'")
            try:
                cur.execute(path.read_text())
            except psycopg2.errors.LockNotAvailable:
                raise RuntimeError(
                    f"Migration {path.name} waited more than {lock_timeout_s}s for a table lock (a long "
                    "transaction is reading or writing it); it was not applied and will be retried"
                ) from None
            cur.execute(
                "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                (path.stem, _checksum(path)),
            )
            done.append(path.name)
    return done


def _warn_changed(files: list[Path], applied: dict[str, str]) -> None:
    """Migrations are applied once: a file edited afterwards is not re-run, so say so."""
    for path in files:
        if applied.get(path.stem) not in (None, _checksum(path)):
            log.warning(
                "%s changed after it was applied; it is not applied again (add a new file)", path.name
            )


@contextmanager
def connect(db_url: str) -> Iterator:
    """A raw psycopg2 connection in one transaction: committed on success, rolled back on error.

    Vectors travel as binary COPY (`pgcopy`) or as text, so no pgvector type adapter is registered."""
    raw = get_engine(db_url).raw_connection()
    try:
        conn = raw.driver_connection
        yield conn
        conn.commit()
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()


def state_value(cur: Any, name: str) -> dict:
    """A `pipeline_state` value ({} when there is none yet)."""
    cur.execute("SELECT value FROM pipeline_state WHERE name = %s", (name,))
    row = cur.fetchone()
    return row[0] if row else {}


def set_state_value(cur: Any, name: str, value: dict) -> None:
    """Set a `pipeline_state` value, replacing the one there (in the caller's transaction)."""
    cur.execute(
        "INSERT INTO pipeline_state (name, value) VALUES (%s, %s) "
        "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
        (name, json.dumps(value)),
    )


@contextmanager
def autocommit(db_url: str) -> Iterator:
    """A pooled connection in autocommit mode (CREATE/DROP INDEX CONCURRENTLY need it)."""
    raw = get_engine(db_url).raw_connection()
    conn = raw.driver_connection
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.autocommit = False
        raw.close()
