"""The HNSW index on `model_embeddings` and the search settings of the SQL search functions.

Build parameters (m, ef_construction) and ef_search come from settings, and only from
there: the migrations create no index, `ensure_hnsw_index` does. A changed value rebuilds
the index with CREATE INDEX CONCURRENTLY under a new name and a swap, which never
blocks readers.
"""

from __future__ import annotations

import logging

import psycopg2

from ..core.db import autocommit, connect
from ..core.progress import Progress
from ..core.settings import Settings

log = logging.getLogger(__name__)

HNSW_INDEX = "model_embeddings_hnsw_idx"


SEARCH_FUNCTIONS = ("similar_models_search", "similar_to_vector")


# Arbitrary constant: one index (re)build at a time.
_INDEX_LOCK_KEY = 0x5F1A_0004


def hnsw_index_state(cur) -> tuple[bool, dict[str, str]] | None:
    """(valid, build options) of the HNSW index, or None when there is none."""
    cur.execute(
        "SELECT i.indisvalid, coalesce(c.reloptions, '{}') FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
        "WHERE c.relname = %s AND c.relnamespace = current_schema()::regnamespace",
        (HNSW_INDEX,),
    )
    row = cur.fetchone()
    if row is None:
        return None
    return bool(row[0]), dict(opt.split("=", 1) for opt in row[1])


def drop_hnsw_index(db_url: str) -> None:
    with autocommit(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (_INDEX_LOCK_KEY,))
        try:
            cur.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {HNSW_INDEX}")
        finally:
            cur.execute("SELECT pg_advisory_unlock(%s)", (_INDEX_LOCK_KEY,))


def ensure_hnsw_index(settings: Settings) -> str:
    """Make the HNSW index exist, be valid and have the configured parameters, without
    blocking readers: CREATE INDEX CONCURRENTLY, and for a rebuild a swap under a new name."""
    wanted = {"m": str(settings.hnsw_m), "ef_construction": str(settings.hnsw_ef_construction)}
    options = f"m = {settings.hnsw_m:d}, ef_construction = {settings.hnsw_ef_construction:d}"
    with autocommit(settings.db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (_INDEX_LOCK_KEY,))
        try:
            state = hnsw_index_state(cur)
            if state is not None and state[0] and state[1] == wanted:
                return "unchanged"
            cur.execute("SELECT set_config('maintenance_work_mem', %s, false)", (settings.hnsw_build_memory,))
            progress = Progress("hnsw index", unit="builds", log=log)
            new_name = f"{HNSW_INDEX}_new"
            cur.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {new_name}")
            cur.execute(
                f"CREATE INDEX CONCURRENTLY {new_name if state else HNSW_INDEX} ON model_embeddings "
                f"USING hnsw (embedding vector_cosine_ops) WITH ({options})"
            )
            if state is not None:
                cur.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {HNSW_INDEX}")
                cur.execute(f"ALTER INDEX {new_name} RENAME TO {HNSW_INDEX}")
            cur.execute("RESET maintenance_work_mem")
            what = "built" if state is None else "rebuilt" if state[0] else "rebuilt (was invalid)"
            progress.finish(f"{HNSW_INDEX} {what} with {options}")
            return what
        finally:
            cur.execute("SELECT pg_advisory_unlock(%s)", (_INDEX_LOCK_KEY,))


def configure_search(settings: Settings) -> None:
    """Attach hnsw.ef_search from settings to the SQL search functions (skipped when already set)."""
    wanted = f"hnsw.ef_search={settings.hnsw_ef_search:d}"
    with connect(settings.db_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT p.oid::regprocedure::text, coalesce(p.proconfig, '{}') FROM pg_proc p "
            "WHERE p.proname = ANY(%s) AND p.pronamespace = current_schema()::regnamespace",
            (list(SEARCH_FUNCTIONS),),
        )
        for signature, config in cur.fetchall():
            if wanted in config:
                continue
            try:
                cur.execute("SAVEPOINT ef_search")
                cur.execute(f"ALTER FUNCTION {signature} SET hnsw.ef_search = {settings.hnsw_ef_search:d}")
            except psycopg2.errors.InsufficientPrivilege:
                cur.execute("ROLLBACK TO SAVEPOINT ef_search")
                log.warning("not the owner of %s: hnsw.ef_search stays as installed", signature)
