"""The evaluation DAG: contract id, scheduled on the pipeline's Asset, and a run through Airflow itself."""

from __future__ import annotations

import devenv
import pytest
from fake_sketchfab import Catalog, start_server
from helpers import query
from sketchfab_similarity import crawl, features, similarity, thumbnails, vectors
from sqlalchemy.engine import make_url

EVAL_DAG_ID = "sketchfab_similarity_evaluation"


def dags() -> dict:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(devenv.ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags


def pipeline_dag_module():
    """The pipeline's DAG file as a module, for the Asset it defines (its task's outlet is an alias of it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pipeline_dag", devenv.ROOT / "dags" / "sketchfab_visual_similarity.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration  # imports Airflow
def test_evaluation_dag_is_scheduled_on_the_similarity_asset():
    from airflow.sdk import Asset

    found = dags()
    dag = found[EVAL_DAG_ID]
    assert dag.task_ids == ["evaluate_similarity"]
    assets = list(dag.timetable.asset_condition.objects)
    assert [a.name for a in assets] == ["sketchfab_model_similarity"]
    published = pipeline_dag_module().SIMILARITY_TABLE
    assert isinstance(published, Asset)
    (scheduled,) = assets
    assert (scheduled.name, scheduled.uri, scheduled.group, scheduled.extra) == (
        published.name,
        published.uri,
        published.group,
        published.extra,
    ), "the evaluation listens to exactly the Asset the refresh updates"
    assert dag.max_active_runs == 1 and dag.catchup is False
    task = dag.get_task("evaluate_similarity")
    assert len((task.doc_md or "").strip()) > 40


@pytest.mark.integration
def test_evaluation_dag_run_through_airflow(make_settings, tmp_path):
    catalog = Catalog.generate(16, seed=9)
    with start_server(catalog) as server:
        settings = make_settings(
            api_base_url=server.api_base_url, thumbnail_hosts=(server.media_host,), top_n=4
        )
        crawl.crawl(settings, crawl.CrawlWindow())
        thumbnails.download_thumbnails(settings)
        extracted = features.extract_features(settings)
        vectors.load_vectors(settings, extracted.files)
        similarity.refresh_similarity(settings)
        url = make_url(settings.db_url)
        env = devenv.airflow_env(
            airflow_home=tmp_path / "airflow",
            db_uri=f"postgresql://{url.username}@/{url.database}?host={url.query['host']}",
            api_base_url=server.api_base_url,
            thumbnail_store=settings.thumbnail_store,
            thumbnail_hosts=server.media_host,
            weights="random",
            input_size=32,
        )
        devenv.airflow(["db", "migrate"], env)
        devenv.airflow(["dags", "test", EVAL_DAG_ID], env)
    rows = query(settings.db_url, "SELECT run_id, models, precision_at_10 FROM similarity_quality")
    assert len(rows) == 1
    run_id, models, p10 = rows[0]
    assert run_id.startswith("manual__") and models == 16
    assert p10 is None, "top_n 4 lists have no precision@10"
    (p1, p5) = query(
        settings.db_url,
        "SELECT metrics->'methods'->'published'->'precision'->>'1', "
        "metrics->'methods'->'published'->'precision'->>'5' FROM similarity_quality",
    )[0]
    assert 0.0 <= float(p1) <= 1.0 and p5 is None


@pytest.mark.integration
def test_nothing_published_skips_the_task_with_the_reason(fresh_db, monkeypatch):
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowSkipException
    from sketchfab_similarity import tasks

    url = make_url(fresh_db)
    monkeypatch.setenv(
        "AIRFLOW_CONN_SIMILARITY_DB", f"postgresql://{url.username}@/{url.database}?host={url.query['host']}"
    )
    with pytest.raises(AirflowSkipException, match="model_similarity is empty"):
        tasks.evaluate_similarity({"dag_run": SimpleNamespace(run_id="manual__x")})
    assert query(fresh_db, "SELECT count(*) FROM similarity_quality") == [(0,)]
