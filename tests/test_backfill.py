"""`make airflow` for real, then a backfill through it, compared with one long run over the same window.

Starts `tools/standalone.py` (airflow standalone: api-server, scheduler with the
LocalExecutor, dag-processor, triggerer) against a fresh database and a Sketchfab-compatible
server on loopback, and checks what users meet: the health endpoint, the login file, the
gallery in the navigation and behind the login, the trigger API rejecting bad params, and
finally `airflow backfill create` over three days. The backfill's three runs are allowed to
start together; the run lease must make them take turns, and the database they leave must
equal the one a single run over the whole window produces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import devenv
import pytest
import requests
from fake_sketchfab import Catalog, start_server
from helpers import query, snapshot
from processes import stop_tree
from sketchfab_similarity import crawl, features, similarity, thumbnails, vectors
from sketchfab_similarity.core import db
from sketchfab_similarity.core.settings import Settings
from webdriver import free_port

pytestmark = pytest.mark.integration

FROM, TO = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 3, tzinfo=UTC)
WINDOW_END = TO + timedelta(days=1)  # the last daily run's data interval ends a day after its logical date
STARTUP_S, RUN_S, BACKFILL_S = 240, 300, 600


def wait_until(what: str, timeout_s: float, check, log: Path, every_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-6000:] if log.exists() else ""
            pytest.fail(
                f"timed out after {timeout_s}s waiting for {what}\n--- standalone log tail ---\n{tail}"
            )
        time.sleep(every_s)


class Airflow:
    """The REST API of the running standalone, signed in as admin."""

    def __init__(self, base: str, home: Path) -> None:
        self.base = base
        password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        resp = requests.post(
            f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=30
        )
        resp.raise_for_status()
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"

    def get(self, path: str, **params) -> dict:
        resp = self.http.get(f"{self.base}{path}", params=params, timeout=30)
        resp.raise_for_status()
        return resp.json()

    def runs(self) -> list[dict]:
        return self.get(f"/api/v2/dags/{devenv.DAG_ID}/dagRuns", limit=100)["dag_runs"]

    def task_instances(self, run_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{devenv.DAG_ID}/dagRuns/{run_id}/taskInstances", limit=100)[
            "task_instances"
        ]


def healthy(base: str) -> bool:
    try:
        health = requests.get(f"{base}/api/v2/monitor/health", timeout=5).json()
    except (requests.RequestException, ValueError):
        return False
    return all(health.get(c, {}).get("status") == "healthy" for c in ("metadatabase", "scheduler"))


def one_long_run(settings: Settings) -> None:
    """The reference: every stage once, over the whole window, without Airflow or shards."""
    db.apply_schema(settings.db_url)
    crawl.crawl(settings, crawl.CrawlWindow(since=FROM, until=WINDOW_END, incremental=False))
    thumbnails.download_thumbnails(settings)
    extracted = features.extract_features(settings)
    vectors.load_vectors(settings, extracted.files)
    similarity.refresh_similarity(settings)


def test_make_airflow_serves_the_ui_gallery_and_runs_a_backfill(pg_uri, tmp_path):
    backfill_db, backfill_uri = devenv.create_database(pg_uri, "backfill_target")
    reference_db, _ = devenv.create_database(pg_uri, "backfill_reference")
    home, log = tmp_path / "airflow", tmp_path / "standalone.log"
    port = free_port()
    base = f"http://localhost:{port}"
    # Every port the standalone listens on is a free one: the log servers' fixed defaults (8793,
    # 8794) collide with any other Airflow on the machine, and a scheduler or triggerer that cannot
    # bind them dies and the run never becomes healthy.
    ports = {
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
    }
    # An empty catalog at first: the scheduled run that starts as soon as the DAG is live finds nothing.
    catalog = Catalog.generate(0, seed=5, base=datetime(2025, 12, 31, 12), spacing=timedelta(hours=3))
    tuning = {
        "AIRFLOW_VAR_SIMILARITY_TOP_N": "5",
        "AIRFLOW_VAR_SIMILARITY_RUN_WAIT_POKE_S": "10",
        "AIRFLOW_VAR_SIMILARITY_RETRY_DELAY_S": "5",
        "AIRFLOW_VAR_SIMILARITY_DOWNLOAD_SHARD_SIZE": "8",
        "AIRFLOW_VAR_SIMILARITY_EXTRACT_SHARD_SIZE": "10",
        "AIRFLOW__CORE__PARALLELISM": "4",
        **ports,
    }
    with start_server(catalog) as server:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(devenv.ROOT / "tools" / "standalone.py"),
                "--port",
                str(port),
                "--airflow-home",
                str(home),
                "--db-uri",
                backfill_uri,
                "--sketchfab-url",
                server.api_base_url,
                "--thumbnail-hosts",
                server.media_host,
                "--thumbnails",
                str(tmp_path / "thumbnails"),
                "--weights",
                "random",
                "--input-size",
                "32",
            ],  # fmt: skip
            env={**os.environ, **tuning},
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(
                "the Airflow UI to be healthy", STARTUP_S, lambda: proc.poll() is None and healthy(base), log
            )
            api = Airflow(base, home)
            # Healthy is not parsed: the dag-processor may still be importing the DAG files.
            wait_until(
                "the DAG to be parsed",
                STARTUP_S,
                lambda: api.http.get(f"{base}/api/v2/dags/{devenv.DAG_ID}", timeout=30).status_code == 200,
                log,
            )

            # The gallery: in the navigation, behind the login, served by the API server.
            plugins = api.get("/api/v2/plugins")["plugins"]
            views = [v for p in plugins for v in p["external_views"]]
            assert {"name": "Similarity gallery", "href": "/similarity-gallery/"}.items() <= views[0].items()
            anonymous = requests.get(f"{base}/similarity-gallery/", allow_redirects=False, timeout=30)
            assert anonymous.status_code == 303 and "/auth/login" in anonymous.headers["location"]
            assert api.http.get(f"{base}/similarity-gallery/", timeout=30).status_code == 200

            # The trigger form posts here: bad params are refused with the reason, and no run is created.
            for conf, reason in (
                ({"min_likes": -5}, "min_likes: -5 is less than the minimum of 0"),
                ({"categories": "Cars & Vehicles"}, "categories: 'Cars & Vehicles' does not match"),
            ):
                resp = api.http.post(
                    f"{base}/api/v2/dags/{devenv.DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf}
                )
                assert resp.status_code == 400 and reason in resp.json()["detail"], resp.text

            # The DAG is live: its first scheduled run starts at once and finds the (empty) catalog.
            def scheduled_run_done() -> bool:
                states = [r["state"] for r in api.runs() if r["run_type"] == "scheduled"]
                assert "failed" not in states, f"the scheduled run failed\n{log.read_text()[-4000:]}"
                return states == ["success"]

            wait_until("the first scheduled run to succeed", RUN_S, scheduled_run_done, log)
            assert all(r["run_type"] == "scheduled" for r in api.runs()), "bad triggers created no run"

            server.publish(56)
            published = [m.published_at.replace(tzinfo=UTC) for m in server.catalog.models]
            assert min(published) < FROM and max(published) >= WINDOW_END, (
                "models on both sides of the window"
            )
            env = devenv.airflow_env(
                airflow_home=home,
                db_uri=backfill_uri,
                api_base_url=server.api_base_url,
                thumbnail_store=tmp_path / "thumbnails",
                thumbnail_hosts=server.media_host,
                weights="random",
                input_size=32,
                extra=tuning,
            )
            create_backfill(env)

            def backfill_runs() -> list[dict]:
                return [r for r in api.runs() if r["run_type"] == "backfill"]

            def finished() -> list[dict] | None:
                found = backfill_runs()
                failed = [r["dag_run_id"] for r in found if r["state"] == "failed"]
                assert not failed, f"backfill runs failed: {failed}\n{log.read_text()[-4000:]}"
                return found if len(found) == 3 and all(r["state"] == "success" for r in found) else None

            done = wait_until("the backfill's three runs to succeed", BACKFILL_S, finished, log, every_s=5)
            intervals = sorted((r["data_interval_start"], r["data_interval_end"]) for r in done)
            assert [(s[:10], e[:10]) for s, e in intervals] == [
                ("2026-01-01", "2026-01-02"),
                ("2026-01-02", "2026-01-03"),
                ("2026-01-03", "2026-01-04"),
            ]

            # The three runs were live together, but their work never overlapped: the lease made them take turns.
            spans = []
            for run in done:
                tis = {(t["task_id"], t["map_index"]): t for t in api.task_instances(run["dag_run_id"])}
                spans.append(
                    (tis[("crawl_models", -1)]["start_date"], tis[("summarize_run", -1)]["end_date"])
                )
                assert sum(1 for task_id, _ in tis if task_id == "download_thumbnails") >= 2, (
                    "downloads fanned out"
                )
            spans.sort()
            for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
                assert end <= start, f"two runs worked at the same time: {spans}"
        finally:
            # The whole tree, pass or fail: the scheduler ignores SIGTERM and its LocalExecutor
            # workers leave the process group, so a group signal alone left them running.
            stop_tree(proc, signal.SIGINT, grace_s=60)

        settings = Settings(
            db_url=reference_db,
            api_base_url=server.api_base_url,
            thumbnail_store=str(tmp_path / "reference-thumbnails"),
            thumbnail_hosts=(server.media_host,),
            vgg16_weights="random",
            input_size=32,
            top_n=5,
        )
        one_long_run(settings)

    in_window = sorted(
        m.uid for m in server.catalog.models if FROM <= m.published_at.replace(tzinfo=UTC) < WINDOW_END
    )
    assert [r[0] for r in query(backfill_db, "SELECT uid FROM sketchfab_models ORDER BY uid")] == in_window
    assert snapshot(backfill_db) == snapshot(reference_db)
    summaries = query(backfill_db, "SELECT run_type, counts FROM pipeline_runs WHERE run_type = 'backfill'")
    assert sum(c["crawl_models"]["upserted"] for _, c in summaries) == len(in_window)


def create_backfill(env: dict[str, str], attempts: int = 5) -> None:
    """`airflow backfill create`, again when SQLite refused its write at once.

    The standalone keeps Airflow's metadata in SQLite, which has one writer at a time: a CLI
    transaction that read before the scheduler wrote gets SQLITE_BUSY without waiting (a busy
    timeout cannot help there) and rolls back whole. Any other failure fails the test at once.
    """
    args = ["backfill", "create", "--dag-id", devenv.DAG_ID, "--from-date", FROM.date().isoformat(),
            "--to-date", TO.date().isoformat(), "--max-active-runs", "3"]  # fmt: skip
    for attempt in range(1, attempts + 1):
        bin_dir = Path(sys.executable).parent
        result = subprocess.run(
            [str(bin_dir / "airflow"), *args], env=env, cwd=devenv.ROOT, capture_output=True, text=True
        )
        if result.returncode == 0:
            return
        output = result.stdout + result.stderr
        assert "database is locked" in output and attempt < attempts, output[-4000:]
        time.sleep(1)  # let the scheduler's write finish
