"""Run-level pieces of the DAG: the run lease, shard plans, combining mapped results, run summaries."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from helpers import query
from sketchfab_similarity import tasks
from sketchfab_similarity.core import runs
from sketchfab_similarity.core.sharding import Shard

DAG = "sketchfab_visual_similarity"


@pytest.mark.parametrize(
    ("pending", "size", "max_shards", "count"),
    [(0, 100, 8, 1), (1, 100, 8, 1), (100, 100, 8, 1), (101, 100, 8, 2), (10_000, 100, 8, 8)],
)
def test_shard_plan_is_sized_by_settings(pending, size, max_shards, count):
    shards = runs.plan_shards(pending, size, max_shards)
    assert shards == Shard.all(count)


def test_combine_adds_counts_concatenates_files_and_merges_reasons():
    parts = [
        {"feature_version": "v1", "files": ["a"], "extracted": 3, "failures": {"u1": "bad"}, "by": {"x": 1}},
        {
            "feature_version": "v1",
            "files": ["b", "c"],
            "extracted": 4,
            "failures": {"u2": "worse"},
            "by": {"x": 2},
        },
    ]
    assert runs.combine(parts) == {
        "feature_version": "v1",
        "files": ["a", "b", "c"],
        "extracted": 7,
        "failures": {"u1": "bad", "u2": "worse"},
        "by": {"x": 3},
    }
    assert parts[0]["files"] == ["a"], "inputs are not modified"
    with pytest.raises(ValueError, match="disagree on 'feature_version'"):
        runs.combine([{"feature_version": "v1"}, {"feature_version": "v2"}])


def states(**by_run: str | None):
    return lambda dag_id, run_id: by_run.get(run_id)


@pytest.mark.integration
def test_run_lease_lets_one_run_work_at_a_time(fresh_db):
    assert runs.try_acquire_run_lease(fresh_db, DAG, "scheduled_1", states()).acquired
    assert runs.try_acquire_run_lease(fresh_db, DAG, "scheduled_1", states()).acquired, "re-entrant"

    waiting = runs.try_acquire_run_lease(fresh_db, DAG, "backfill_1", states(scheduled_1="running"))
    assert not waiting.acquired and "scheduled_1" in waiting.reason
    queued = runs.try_acquire_run_lease(fresh_db, DAG, "backfill_1", states(scheduled_1="queued"))
    assert not queued.acquired

    taken = runs.try_acquire_run_lease(fresh_db, DAG, "backfill_1", states(scheduled_1="failed"))
    assert taken.acquired and "took over" in taken.reason
    gone = runs.try_acquire_run_lease(fresh_db, DAG, "manual_1", states())
    assert gone.acquired and "no longer exists" in gone.reason

    assert not runs.release_run_lease(fresh_db, DAG, "backfill_1"), "only the holder releases"
    assert runs.release_run_lease(fresh_db, DAG, "manual_1")
    free = runs.try_acquire_run_lease(fresh_db, DAG, "backfill_2", states(manual_1="running"))
    assert free.acquired and free.reason == "the lease was free"


@pytest.mark.integration
def test_concurrent_runs_never_both_get_the_lease(fresh_db):
    contenders = [f"backfill_{i}" for i in range(8)]
    barrier = threading.Barrier(len(contenders))
    results: dict[str, bool] = {}

    def contend(run_id: str) -> None:
        barrier.wait()
        everyone_running = states(**{r: "running" for r in contenders})
        results[run_id] = runs.try_acquire_run_lease(fresh_db, DAG, run_id, everyone_running).acquired

    threads = [threading.Thread(target=contend, args=(r,)) for r in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r, won in results.items() if won]
    assert len(winners) == 1
    (holder,) = query(fresh_db, "SELECT value->>'run_id' FROM pipeline_state WHERE name = 'run_lease'")[0]
    assert holder == winners[0]


def test_run_summary_keeps_counts_and_failure_reasons_of_mapped_stages():
    download_shards = [
        {"candidates": 4, "fetched": 3, "failed": 1, "stored_new": 3, "failures_by_reason": {"http 404": 1}},
        {
            "candidates": 2,
            "fetched": 0,
            "failed": 2,
            "stored_new": 0,
            "failures_by_reason": {"http 404": 1, "timeout": 1},
        },
    ]
    load = {
        "feature_version": "v1",
        "loaded": 3,
        "changed": 3,
        "rejected": 1,
        "files": ["f"],
        "rejects_by_reason": {"norm": 1},
        "reject_reasons": {"u9": "norm: 2 is not 1"},
    }
    version, counts = runs.run_counts({"download_thumbnails": download_shards, "load_vectors": load})
    assert version == "v1"
    assert counts == {
        "download_thumbnails": {
            "candidates": 6,
            "fetched": 3,
            "failed": 3,
            "stored_new": 3,
            "failures_by_reason": {"http 404": 2, "timeout": 1},
        },
        "load_vectors": {"loaded": 3, "changed": 3, "rejected": 1, "rejects_by_reason": {"norm": 1}},
    }


@pytest.mark.integration
def test_run_summary_is_replaced_by_a_rerun(fresh_db):
    for upserted in (5, 7):
        runs.record_run(
            fresh_db,
            dag_id=DAG,
            run_id="manual_1",
            run_type="manual",
            data_interval=(None, None),
            feature_version="v1",
            counts={"crawl_models": {"upserted": upserted}},
        )
    rows = query(fresh_db, "SELECT run_id, counts FROM pipeline_runs")
    assert rows == [("manual_1", {"crawl_models": {"upserted": 7}})]
    (latest,) = query(fresh_db, "SELECT latest_run_id FROM pipeline_overview")[0]
    assert latest == "manual_1"


@pytest.mark.integration  # imports Airflow
def test_unknown_conf_keys_fail_the_run_with_the_valid_names():
    from airflow.sdk.exceptions import AirflowFailException

    dag = SimpleNamespace(params={"max_models": None, "top_n": None})
    context = {"dag": dag, "dag_run": SimpleNamespace(conf={"max_model": 5, "top_n": 3})}
    with pytest.raises(AirflowFailException, match="Unknown parameter\\(s\\) 'max_model'.*max_models"):
        tasks.check_conf(context)
    tasks.check_conf({"dag": dag, "dag_run": SimpleNamespace(conf={"top_n": 3})})
    tasks.check_conf({"dag": dag, "dag_run": SimpleNamespace(conf=None)})


@pytest.mark.parametrize(
    ("counts", "failed"),
    [
        ({"download_thumbnails": {"fetched": 0, "failed": 3}}, {"download_thumbnails"}),  # all of few
        ({"download_thumbnails": {"fetched": 1, "failed": 3}}, set()),  # most of few, not all
        ({"download_thumbnails": {"fetched": 9, "failed": 11}}, {"download_thumbnails"}),  # > half of 20
        ({"download_thumbnails": {"fetched": 10, "failed": 10}}, set()),  # exactly half
        ({"download_thumbnails": {"fetched": 97, "failed": 3}}, set()),  # a few bad thumbnails: green
        ({"crawl_models": {"seen": 4, "rejected": 4}}, {"crawl_models"}),
        ({"extract_features": {"extracted": 0, "failed": 2}}, {"extract_features"}),
        ({"load_vectors": {"loaded": 5, "rejected": 30}}, {"load_vectors"}),
        ({"download_thumbnails": {"fetched": 0, "failed": 0}}, set()),  # nothing to do is not failure
        ({"refresh_similarity": {"models": 0, "rows": 0}}, set()),
    ],
)
def test_a_stage_failing_for_too_many_items_fails_the_run(counts, failed):
    assert set(runs.failed_stages(counts, max_share=0.5, min_items=20)) == failed


def test_failed_stage_reasons_carry_the_counts_and_the_reasons():
    counts = {"download_thumbnails": {"fetched": 0, "failed": 3, "failures_by_reason": {"http 404": 3}}}
    assert runs.failed_stages(counts, 0.5, 20) == {"download_thumbnails": "3 of 3 items failed (http 404: 3)"}
    crawl = {"crawl_models": {"seen": 30, "rejected": 30, "reject_reasons": {"uid is not 32": 30}}}
    assert runs.failed_stages(crawl, 0.5, 20)["crawl_models"] == "30 of 30 items failed (uid is not 32: 30)"
    assert runs.failed_stages({"download_thumbnails": {"fetched": 9, "failed": 11}}, 0.6, 20) == {}
    assert runs.failed_stages({"download_thumbnails": {"fetched": 1, "failed": 3}}, 0.5, 4) != {}


def test_a_refresh_that_published_nothing_fails_the_run():
    lost = {"refresh_similarity": {"models": 9, "rows": 0, "published": False, "skipped_unchanged": False}}
    assert "no part published" in runs.failed_stages(lost, 0.5, 20)["refresh_similarity"]
    for ok in (
        {"published": True, "skipped_unchanged": False},
        {"published": False, "skipped_unchanged": True},
    ):
        assert runs.failed_stages({"refresh_similarity": ok}, 0.5, 20) == {}
    parts = [
        {"published": False, "skipped_unchanged": False},
        {"published": True, "skipped_unchanged": False},
    ]
    _, counts = runs.run_counts({"refresh_similarity": parts})
    assert runs.failed_stages(counts, 0.5, 20) == {}, "one part publishing is enough"


@pytest.mark.integration
def test_every_stage_task_rechecks_the_run_lease(fresh_db, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException
    from sketchfab_similarity.core.settings import Settings

    # Should a check be missing, the task would reach out: let that be a closed loopback port,
    # not the real API, so it fails at once and harmlessly.
    nowhere = Settings(db_url=fresh_db, api_base_url="http://127.0.0.1:9", api_retries=0)
    monkeypatch.setattr(tasks, "settings_from_airflow", lambda **_: nowhere)
    old = {"dag_run": SimpleNamespace(dag_id=DAG, run_id="old_run", conf={}), "params": {}}
    assert runs.try_acquire_run_lease(fresh_db, DAG, "old_run", states()).acquired
    assert tasks.leased_settings(old).db_url == fresh_db
    assert runs.try_acquire_run_lease(fresh_db, DAG, "new_run", states(old_run="failed")).acquired
    # A task of the old run, cleared and rerun now, must not write underneath the new run.
    for call in (
        lambda: tasks.crawl_models(old),
        lambda: tasks.plan_downloads(old),
        lambda: tasks.download_thumbnails(old, {"index": 0, "count": 1}),
        lambda: tasks.plan_extraction(old),
        lambda: tasks.extract_features(old, {"index": 0, "count": 1}),
        lambda: tasks.load_vectors(old, {"files": []}),
        lambda: tasks.refresh_similarity({**old, "run_id": "old_run"}, {"index": 0, "count": 1}),
    ):
        with pytest.raises(AirflowFailException, match="'new_run' of .* holds the run lease now"):
            call()
    runs.release_run_lease(fresh_db, DAG, "new_run")
    with pytest.raises(AirflowFailException, match="no run holds the run lease"):
        tasks.crawl_models(old)
    assert query(fresh_db, "SELECT count(*) FROM crawl_runs")[0][0] == 0


def test_only_a_part_that_published_makes_an_asset_event():
    published = {"published": True, "mode": "incremental", "models": 40, "rows": 200, "rows_written": 12,
                 "new": 2, "changed": 1, "removed": 0, "feature_version": "v1", "reason": "new vectors",
                 "seconds": {"plan": 0.1}}  # fmt: skip
    change = tasks.published_change(published)
    assert change == {k: v for k, v in published.items() if k not in ("published", "seconds")}
    assert tasks.published_change({**published, "published": False}) is None, "a part that only computed"
    assert tasks.published_change({"mode": "none", "skipped_unchanged": True, "published": False}) is None
