"""Database access: engine, schema migration and raw psycopg2 connections.

SQLAlchemy gives URL handling and pooling; stages use the raw psycopg2
connection underneath for COPY and `execute_values`, which SQLAlchemy does not wrap.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import sqlalchemy as sa

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


def apply_schema(db_url: str, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply every numbered DDL file in order. Each file is idempotent, so this is safe to rerun."""
    applied = []
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
        for path in schema_files(sql_dir):
            cur.execute(path.read_text())
            applied.append(path.name)
    return applied


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
