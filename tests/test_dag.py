"""The DAG as Airflow sees it: imports cleanly, keeps the contract, runs end to end through Airflow."""

from __future__ import annotations

import json

import devenv
import pytest
from fake_sketchfab import Catalog, start_server
from helpers import assert_similarity_is_exact, query
from sqlalchemy.engine import make_url

CONTRACT_TASKS = [
    "crawl_models",
    "download_thumbnails",
    "extract_features",
    "load_vectors",
    "refresh_similarity",
]


def load_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(devenv.ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags[devenv.DAG_ID]


def test_dag_imports_with_contract_ids_in_order():
    dag = load_dag()
    assert dag is not None
    assert sorted(dag.task_ids) == sorted(CONTRACT_TASKS)
    for upstream, downstream in zip(CONTRACT_TASKS, CONTRACT_TASKS[1:], strict=False):
        assert downstream in dag.get_task(upstream).downstream_task_ids
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert {
        "max_models",
        "categories",
        "tags",
        "min_likes",
        "top_n",
        "force_reextract",
        "full_refresh",
    } <= set(dag.params)


def test_plugins_folder_loads_without_import_errors(monkeypatch):
    from airflow import plugins_manager

    monkeypatch.setattr(plugins_manager.settings, "PLUGINS_FOLDER", str(devenv.ROOT / "plugins"))
    plugins_manager._get_plugins.cache_clear()
    plugins_manager._get_plugins()
    assert plugins_manager.get_import_errors() == {}


def libpq_uri(db_url: str) -> str:
    url = make_url(db_url)
    return f"postgresql://{url.username}@/{url.database}?host={url.query['host']}"


def snapshot(db_url: str) -> dict[str, list[tuple]]:
    return {
        "models": query(db_url, "SELECT uid, name, raw::text FROM sketchfab_models ORDER BY uid"),
        "thumbs": query(
            db_url, "SELECT uid, status, content_hash, attempts FROM model_thumbnails ORDER BY uid"
        ),
        "vectors": query(
            db_url, "SELECT uid, embedding::text, extracted_at FROM model_embeddings ORDER BY uid"
        ),
        "similar": query(db_url, "SELECT * FROM model_similarity ORDER BY uid, rank"),
    }


@pytest.mark.integration
def test_whole_dag_through_airflow_twice(fresh_db, tmp_path):
    catalog = Catalog.generate(30, seed=7)
    with start_server(catalog) as server:
        env = devenv.airflow_env(
            airflow_home=tmp_path / "airflow",
            db_uri=libpq_uri(fresh_db),
            api_base_url=server.api_base_url,
            thumbnail_store=tmp_path / "thumbnails",
            thumbnail_hosts=server.media_host,
            weights="random",
            input_size=32,
            extra={"AIRFLOW_VAR_SIMILARITY_TOP_N": "7"},
        )
        devenv.migrate_metadata(env)
        devenv.run_dag_once(env)
        counts = query(
            fresh_db,
            "SELECT (SELECT count(*) FROM sketchfab_models), (SELECT count(*) FROM model_thumbnails "
            "WHERE status = 'ok'), (SELECT count(*) FROM model_embeddings), (SELECT count(*) FROM model_similarity)",
        )[0]
        assert counts == (30, 30, 30, 30 * 7)
        assert assert_similarity_is_exact(fresh_db, 7) == 210
        before = snapshot(fresh_db)

        devenv.run_dag_once(env, conf=json.dumps({"top_n": None}))
        assert snapshot(fresh_db) == before
        assert devenv.dag_run_states(env) == ["success", "success"]
