"""Versioned migrations: each file once, under a lock_timeout, and no lock at all when nothing is new."""

from __future__ import annotations

import contextlib
import shutil
import threading
from datetime import timedelta

import psycopg2
import pytest
from fake_sketchfab import Catalog, start_server
from helpers import execute, query
from sketchfab_similarity import crawl, features, similarity, thumbnails, vectors
from sketchfab_similarity.core import db
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.integration


def connect(db_url: str, **options: str):
    url = make_url(db_url)
    conn = psycopg2.connect(dbname=url.database, user=url.username, host=url.query["host"])
    with conn.cursor() as cur:
        for name, value in options.items():
            cur.execute(f"SET {name} = %s", (value,))
    conn.commit()
    return conn


def applied_versions(db_url: str) -> list[str]:
    return [r[0] for r in query(db_url, "SELECT version FROM schema_migrations ORDER BY version")]


def function_config(db_url: str) -> list:
    return query(
        db_url,
        "SELECT proname, proconfig FROM pg_proc WHERE proname IN ('similar_models', 'similar_to_vector')",
    )


def test_each_file_is_applied_once_and_a_database_from_before_versions_is_adopted(fresh_db):
    files = [p.stem for p in db.schema_files()]
    assert applied_versions(fresh_db) == files
    assert db.apply_schema(fresh_db) == [], "nothing new: nothing applied"
    execute(fresh_db, "DROP TABLE schema_migrations")  # a database migrated before versions existed
    assert db.apply_schema(fresh_db) == [p.name for p in db.schema_files()]
    assert applied_versions(fresh_db) == files
    assert db.apply_schema(fresh_db) == []


def test_the_schema_step_keeps_the_tuned_ef_search(fresh_db):
    execute(fresh_db, "ALTER FUNCTION similar_models(text, integer) SET hnsw.ef_search = 64")
    db.apply_schema(fresh_db)
    (config,) = [c for name, c in function_config(fresh_db) if name == "similar_models"]
    assert config == ["hnsw.ef_search=64"]


def test_a_new_migration_gives_up_on_a_held_table_instead_of_queueing_readers(fresh_db, tmp_path):
    sql_dir = tmp_path / "sql"
    shutil.copytree(db.SQL_DIR, sql_dir)
    (sql_dir / "199_probe.sql").write_text(
        "ALTER TABLE sketchfab_models ADD COLUMN IF NOT EXISTS probe int;\n"
    )
    # The server ends the reader's transaction after 20 s: a migration without lock_timeout would wait
    # that long and then not raise, failing the test instead of hanging it.
    reader = connect(fresh_db, idle_in_transaction_session_timeout="20s")
    try:
        with reader.cursor() as cur:
            cur.execute("SELECT count(*) FROM sketchfab_models")  # holds its lock until the transaction ends
        with pytest.raises(RuntimeError, match=r"199_probe.sql waited more than 0.2s for a table lock"):
            db.apply_schema(fresh_db, sql_dir, lock_timeout_s=0.2)
        other = connect(fresh_db, statement_timeout="5s")
        with other.cursor() as cur:
            cur.execute("SELECT count(*) FROM similar_models('0123456789abcdef0123456789abcdef')")
            assert cur.fetchone() == (0,)
        other.close()
    finally:
        with contextlib.suppress(psycopg2.Error):
            reader.rollback()
        reader.close()
    assert db.apply_schema(fresh_db, sql_dir) == ["199_probe.sql"]
    assert db.apply_schema(fresh_db, sql_dir) == []


def run_stages(settings) -> None:
    """The stages as the DAG runs them, including the schema step of start_run and crawl_models."""
    db.apply_schema(settings.db_url)
    db.apply_schema(settings.db_url)
    crawl.crawl(settings, crawl.incremental_window(settings.db_url, timedelta(hours=1)))
    thumbnails.download_thumbnails(settings)
    extracted = features.extract_features(settings)
    vectors.load_vectors(settings, extracted.files)
    similarity.refresh_similarity(settings)


def test_a_reader_holding_a_transaction_for_the_whole_run_blocks_nothing(make_settings):
    catalog = Catalog.generate(24, seed=40)
    with start_server(catalog) as server:
        settings = make_settings(
            api_base_url=server.api_base_url, thumbnail_hosts=(server.media_host,), top_n=4
        )
        run_stages(settings)
        uid = catalog.models[0].uid
        server.publish(6)

        reader = connect(settings.db_url)
        with reader.cursor() as cur:  # an open transaction holding both tables readers use
            cur.execute("SELECT count(*) FROM model_similarity")
            cur.execute("SELECT count(*) FROM sketchfab_models")
        errors: list[BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                run_stages(settings)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
            finally:
                done.set()

        worker = threading.Thread(target=run)
        worker.start()
        client = connect(settings.db_url, statement_timeout="5s")
        answered = 0
        try:
            while not done.is_set():
                with client.cursor() as cur:  # a call stuck behind a lock is cancelled: the test fails
                    cur.execute("SELECT count(*) FROM similar_models(%s, 4)", (uid,))
                    assert cur.fetchone() == (4,)
                client.commit()
                answered += 1
                done.wait(0.05)
        finally:
            reader.rollback()  # let a blocked run finish whatever happened
            worker.join()
            reader.close()
            client.close()
    assert not errors, errors
    assert answered >= 1
    assert query(settings.db_url, "SELECT count(*) FROM model_similarity")[0][0] == 30 * 4


def test_the_embedded_server_takes_its_settings_before_it_starts(tmp_path):
    """The scale benchmark sizes shared_buffers this way; a setting that did not take would make
    its query figures those of Postgres' 128 MB default without saying so."""
    import devenv

    data = tmp_path / "pg"
    uri = devenv.start_postgres(data, {"shared_buffers": "48MB", "work_mem": "7MB"})
    try:
        conn = psycopg2.connect(uri)
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('shared_buffers'), current_setting('work_mem')")
            assert cur.fetchone() == ("48MB", "7MB")
        conn.close()
    finally:
        devenv.stop_postgres(data)
    conf = (data / "postgresql.conf").read_text()
    assert conf.count(devenv.SERVER_SETTINGS_FILE) == 1
