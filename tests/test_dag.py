"""The DAG as Airflow sees it: contract, schedule, params, scale-out settings; and a run end to end."""

from __future__ import annotations

import json
from datetime import timedelta

import devenv
import pytest
from fake_sketchfab import Catalog, start_server
from helpers import assert_similarity_is_exact, query
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.integration  # Airflow or Keras

CONTRACT_TASKS = [
    "crawl_models",
    "download_thumbnails",
    "extract_features",
    "load_vectors",
    "refresh_similarity",
]
PARAMS = {
    "max_models", "categories", "tags", "min_likes", "top_n", "force_reextract", "full_refresh", "full_recrawl",
}  # fmt: skip


def load_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(devenv.ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags[devenv.DAG_ID]


def import_errors(monkeypatch, **variables: str) -> dict:
    from airflow.dag_processing.dagbag import DagBag

    for name, value in variables.items():
        monkeypatch.setenv(f"AIRFLOW_VAR_{name.upper()}", value)
    return DagBag(dag_folder=str(devenv.ROOT / "dags")).import_errors


def test_contract_tasks_exist_in_order():
    dag = load_dag()
    assert set(CONTRACT_TASKS) <= set(dag.task_ids)
    for upstream, downstream in zip(CONTRACT_TASKS, CONTRACT_TASKS[1:], strict=False):
        assert upstream in dag.get_task(downstream).get_flat_relative_ids(upstream=True), (
            upstream,
            downstream,
        )
    first = [t.task_id for t in dag.tasks if not t.upstream_task_ids]
    assert first == ["start_run"], "every run starts by waiting for its turn"
    last = [t.task_id for t in dag.tasks if not t.downstream_task_ids]
    assert last == ["collect_garbage"], "storage gc (optional) runs after the run is summarised"
    assert dag.get_task("collect_garbage").upstream_task_ids == {"summarize_run"}


def test_downloads_and_extraction_fan_out_over_shards():
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    dag = load_dag()
    for task_id, planner in (
        ("download_thumbnails", "plan_downloads"),
        ("extract_features", "plan_extraction"),
    ):
        task = dag.get_task(task_id)
        assert isinstance(task, MappedOperator), task_id
        assert task.upstream_task_ids == {planner}
    extract = dag.get_task("extract_features")
    assert (extract.pool, extract.queue) == ("gpu", "gpu")
    assert dag.get_task("download_thumbnails").pool == "default_pool"


def test_schedule_catchup_and_one_run_at_a_time():
    from airflow.sdk import CronDataIntervalTimetable

    dag = load_dag()
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable.expression == "0 0 * * *"  # @daily: each run owns one day's data interval
    assert dag.catchup is False and dag.max_active_runs == 1
    gate = dag.get_task("start_run")
    assert gate.mode == "reschedule", "a waiting run holds no worker slot"


def test_schedule_pools_and_queues_come_from_variables(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    for name, value in {
        "similarity_schedule": "@hourly",
        "similarity_catchup": "true",
        "similarity_gpu_pool": "gpus",
        "similarity_gpu_queue": "cuda",
        "similarity_task_retries": "5",
    }.items():
        monkeypatch.setenv(f"AIRFLOW_VAR_{name.upper()}", value)
    dag = DagBag(dag_folder=str(devenv.ROOT / "dags")).dags[devenv.DAG_ID]
    assert dag.timetable.expression == "0 * * * *" and dag.catchup is True
    extract = dag.get_task("extract_features")
    assert (extract.pool, extract.queue, extract.retries) == ("gpus", "cuda", 5)

    monkeypatch.setenv("AIRFLOW_VAR_SIMILARITY_SCHEDULE", "none")
    dag = DagBag(dag_folder=str(devenv.ROOT / "dags")).dags[devenv.DAG_ID]
    assert type(dag.timetable).__name__ == "NullTimetable"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("similarity_schedule", "every day", "similarity_schedule 'every day' is not a cron expression"),
        ("similarity_catchup", "sometimes", "must be true or false"),
        ("similarity_task_retries", "-1", "similarity_task_retries must be >= 0"),
    ],
)
def test_bad_variables_are_import_errors_with_the_reason(monkeypatch, variable, value, message):
    errors = import_errors(monkeypatch, **{variable: value})
    assert errors, "a bad Variable is an import error"  # of every DAG file that reads the Variables
    assert all(message in error for error in errors.values())


def test_parsing_reads_only_the_variables_that_shape_the_dag(monkeypatch):
    """A task-time Variable with a bad value cannot break parsing: the parse never reads it."""
    assert import_errors(monkeypatch, similarity_download_shard_size="0", similarity_top_n="none") == {}


def test_task_ids_are_defined_once():
    from sketchfab_similarity.core.runs import STAGES, SUMMARY_FIELDS

    assert list(STAGES) == CONTRACT_TASKS
    assert list(SUMMARY_FIELDS) == CONTRACT_TASKS


def test_retries_back_off_exponentially_and_tasks_time_out():
    dag = load_dag()
    for task in dag.tasks:
        assert task.retries == 3, task.task_id
        assert task.retry_exponential_backoff == 2.0, task.task_id
        assert task.retry_delay == timedelta(minutes=1)
        assert task.max_retry_delay == timedelta(minutes=30)
        assert task.execution_timeout == timedelta(hours=6), task.task_id


def test_every_task_says_what_it_does():
    dag = load_dag()
    for task in dag.tasks:
        doc = (task.doc_md or "").strip()
        assert len(doc) > 40, f"{task.task_id} has no doc_md"
        assert not doc.startswith("    "), f"{task.task_id}: doc_md would render as a code block"


def test_refresh_updates_the_similarity_asset():
    dag = load_dag()
    outlets = dag.get_task("refresh_similarity").outlets
    assert [a.name for a in outlets] == ["sketchfab_model_similarity_publish"], (
        "an alias: events only on publish"
    )


def resolve(conf: dict) -> dict:
    """Validate a run's conf the way the API server does for the trigger form and backfills."""
    from airflow.serialization.serialized_objects import DagSerialization

    served = DagSerialization.from_dict(DagSerialization.to_dict(load_dag()))
    return served.params.deep_merge(conf).validate()


@pytest.mark.parametrize(
    "conf",
    [
        {},
        {"max_models": 50, "categories": "cars-vehicles", "tags": ["lowpoly", "game_ready", "3d"]},
        {"min_likes": 10, "top_n": 1000, "force_reextract": True, "full_refresh": True},
        {"max_models": None, "categories": None, "top_n": None, "tags": []},
    ],
)
def test_good_params_are_accepted(conf):
    resolved = resolve(conf)
    assert set(resolved) == PARAMS
    for key, value in conf.items():
        assert resolved[key] == value


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"max_models": 0}, "max_models: 0 is less than the minimum of 1"),
        ({"max_models": "ten"}, "max_models: 'ten' is not of type 'null', 'integer'"),
        ({"min_likes": -1}, "min_likes: -1 is less than the minimum of 0"),
        ({"top_n": 5000}, "top_n: 5000 is greater than the maximum of 1000"),
        ({"categories": "Cars & Vehicles"}, "categories: 'Cars & Vehicles' does not match"),
        ({"tags": ["ok", "no spaces"]}, "tags: 'no spaces' does not match"),
        ({"tags": "lowpoly"}, "tags: 'lowpoly' is not of type 'array'"),
        ({"tags": ["a", "a"]}, "has non-unique elements"),
        ({"force_reextract": "yes"}, "force_reextract: 'yes' is not of type 'boolean'"),
    ],
)
def test_bad_params_are_rejected_with_the_reason(conf, message):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError) as excinfo:
        resolve(conf)
    assert message in str(excinfo.value)


def test_params_have_titles_and_descriptions_for_the_trigger_form():
    params = load_dag().params
    assert set(params) == PARAMS
    for name in PARAMS:
        schema = params.get_param(name).schema
        assert schema.get("title") and len(params.get_param(name).description or "") > 20, name


def test_readme_documents_every_variable_and_param():
    from sketchfab_similarity.core.settings import VARIABLES

    rows = [line for line in (devenv.ROOT / "README.md").read_text().splitlines() if line.startswith("| `")]
    documented = {line.split("`")[1] for line in rows}
    assert set(VARIABLES) - documented == set(), "Variables missing from the README's Configuration"
    assert PARAMS - documented == set(), "params missing from the README's parameter table"


def test_plugins_folder_loads_without_import_errors(monkeypatch):
    from airflow import plugins_manager

    monkeypatch.setattr(plugins_manager.settings, "PLUGINS_FOLDER", str(devenv.ROOT / "plugins"))
    plugins_manager._get_plugins.cache_clear()
    plugins_manager._get_plugins()
    assert plugins_manager.get_import_errors() == {}


def mapped_task_count(env: dict[str, str], task_id: str) -> int:
    """How many mapped instances the latest run created, read from Airflow's metadata database."""
    import sqlite3
    from pathlib import Path

    with sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db") as conn:
        (run_id,) = conn.execute(
            "SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (devenv.DAG_ID,)
        ).fetchone()
        (count,) = conn.execute(
            "SELECT count(*) FROM task_instance WHERE dag_id = ? AND run_id = ? AND task_id = ? AND map_index >= 0",
            (devenv.DAG_ID, run_id, task_id),
        ).fetchone()
    return count


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
            extra={
                "AIRFLOW_VAR_SIMILARITY_TOP_N": "7",
                # Small shards, so the run really fans out: 30 models -> 3 download and 2 extraction tasks.
                "AIRFLOW_VAR_SIMILARITY_DOWNLOAD_SHARD_SIZE": "10",
                "AIRFLOW_VAR_SIMILARITY_EXTRACT_SHARD_SIZE": "16",
            },
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
        (summary,) = query(fresh_db, "SELECT counts FROM pipeline_runs")[0]
        assert summary["crawl_models"]["upserted"] == 30
        assert summary["download_thumbnails"]["fetched"] == 30
        assert summary["extract_features"]["extracted"] == 30
        assert summary["refresh_similarity"]["rows"] == 210
        assert mapped_task_count(env, "download_thumbnails") == 3
        assert mapped_task_count(env, "extract_features") == 2
        before = snapshot(fresh_db)

        # A full re-crawl through the trigger's Param re-reads every model and changes nothing.
        devenv.run_dag_once(env, conf=json.dumps({"top_n": None, "full_recrawl": True}))
        assert snapshot(fresh_db) == before
        assert devenv.dag_run_states(env) == ["success", "success"]
        assert len(query(fresh_db, "SELECT * FROM pipeline_runs")) == 2
        (latest,) = query(fresh_db, "SELECT counts FROM pipeline_runs ORDER BY finished_at DESC LIMIT 1")[0]
        assert latest["crawl_models"]["upserted"] == 30 and latest["crawl_models"]["deleted"] == 0


def test_runs_that_misspell_a_param_or_achieve_nothing_fail(fresh_db, tmp_path):
    """A typo in the conf fails the run before any stage; a run whose every download fails (a host
    outside the allow-list) fails in summarize_run with the counts, after recording them."""
    catalog = Catalog.generate(6, seed=8)
    with start_server(catalog) as server:
        env = devenv.airflow_env(
            airflow_home=tmp_path / "airflow",
            db_uri=libpq_uri(fresh_db),
            api_base_url=server.api_base_url,
            thumbnail_store=tmp_path / "thumbnails",
            thumbnail_hosts="media.blocked.invalid",
            weights="random",
            input_size=32,
        )
        devenv.migrate_metadata(env)
        devenv.airflow(
            ["dags", "test", devenv.DAG_ID, "--conf", json.dumps({"max_model": 3})], env, check=False
        )
        assert devenv.dag_run_states(env) == ["failed"]
        assert query(fresh_db, "SELECT count(*) FROM crawl_runs")[0][0] == 0, "no stage ran"

        devenv.airflow(["dags", "test", devenv.DAG_ID], env, check=False)
        assert devenv.dag_run_states(env) == ["failed", "failed"]
    (summary,) = query(fresh_db, "SELECT counts FROM pipeline_runs")[0]
    assert summary["crawl_models"]["upserted"] == 6
    assert summary["failed_stages"]["download_thumbnails"].startswith("6 of 6 items failed")
    assert query(fresh_db, "SELECT count(*) FROM model_thumbnails WHERE status = 'failed'")[0][0] == 6
