"""The refresh split into parallel mapped tasks, run through Airflow itself."""

from __future__ import annotations

import json
import sqlite3

import devenv
import pytest
from fake_sketchfab import Catalog, start_server
from helpers import assert_similarity_is_exact, query
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.integration


def test_refresh_runs_as_three_mapped_parts_and_publishes_once(fresh_db, tmp_path):
    url = make_url(fresh_db)
    catalog = Catalog.generate(24, seed=5)
    with start_server(catalog) as server:
        env = devenv.airflow_env(
            airflow_home=tmp_path / "airflow",
            db_uri=f"postgresql://{url.username}@/{url.database}?host={url.query['host']}",
            api_base_url=server.api_base_url,
            thumbnail_store=tmp_path / "thumbnails",
            thumbnail_hosts=server.media_host,
            weights="random",
            input_size=32,
            extra={"AIRFLOW_VAR_SIMILARITY_TOP_N": "4", "AIRFLOW_VAR_SIMILARITY_REFRESH_PARTS": "3"},
        )
        devenv.migrate_metadata(env)
        devenv.run_dag_once(env)
    with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as meta:
        parts = meta.execute(
            "SELECT map_index, state FROM task_instance WHERE task_id = 'refresh_similarity' ORDER BY map_index"
        ).fetchall()
        events = meta.execute(
            "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
            "WHERE a.name = 'sketchfab_model_similarity'"
        ).fetchall()
    assert parts == [(0, "success"), (1, "success"), (2, "success")]
    assert len(events) == 1, "three parts, one publish, one Asset event"
    change = json.loads(events[0][0])
    assert (change["mode"], change["models"], change["rows"], change["new"]) == ("full", 24, 96, 24), change
    assert assert_similarity_is_exact(fresh_db, 4) == 24 * 4
    state = query(
        fresh_db, "SELECT value->>'mode', (value->>'rows')::int FROM pipeline_state WHERE name = 'similarity'"
    )
    assert state == [("full", 96)]
    assert query(fresh_db, "SELECT count(*) FROM similarity_staging") == [(0,)]
