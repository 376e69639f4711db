"""The pipeline on the CeleryExecutor as docker-compose.yml deploys it, run here as local processes.

docker-compose.yml is read, not copied: every Airflow service of the file (init, api-server,
scheduler, dag-processor, triggerer, the CPU worker and, with the `gpu` profile, the GPU worker)
runs its own command with its own environment, resolved from the variables a user would put in
`.env`; only container addresses and paths become local ones (compose_topology.py). Around them:
Debian's redis-server as the broker, the embedded Postgres for Airflow's metadata and the
similarity database (reached through a socket directory in the connection's host field), and an
S3 bucket on a loopback moto server holding the thumbnails and feature files, reached through
the `similarity_store` Airflow connection. Each service waits for its compose healthcheck, run as
written, before the services that depend on it start.

A user's run through the REST API must then end as a single-process run of the same stages
ends, with extraction on the GPU worker only, even though that worker is SIGKILLed (its whole
process group, as a dying container) while extract_features runs and started again. The one
publish makes one Asset event; a second run with nothing new makes none.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import devenv
import pytest
import requests
from compose_topology import (
    ROOT,
    VENV_BIN,
    Process,
    command,
    environment,
    healthcheck,
    sigterm_interrupts,
    startup_order,
    wait_for,
)
from fake_sketchfab import Catalog, start_server
from helpers import query, snapshot
from sketchfab_similarity import crawl, features, similarity, thumbnails, vectors
from sketchfab_similarity.core import db
from sketchfab_similarity.core.settings import Settings
from webdriver import free_port

pytestmark = pytest.mark.integration

MODELS = 40
BUCKET, KEY, SECRET = "similarity-thumbnails", "AKIATOPOLOGYTEST", "topology-test-secret"
STARTUP_S, RUN_S = 300, 600
CPU_WORKER, GPU_WORKER = "airflow-worker", "airflow-worker-gpu"


def redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        message = "Debian's redis-server is not installed (apt-get install redis-server; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def dotenv(api_base_url: str, media_host: str, db_uri: str, s3_endpoint: str) -> dict[str, str]:
    """What a user puts in `.env` for this deployment: the GPU profile, the shared object store."""
    return {
        "AIRFLOW_JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW_UID": str(os.getuid()),
        "COMPOSE_PROFILES": "gpu",
        "SIMILARITY_GPU_QUEUE": "gpu",
        "SIMILARITY_DB_URI": db_uri,
        "SKETCHFAB_API_URI": api_base_url,
        "SIMILARITY_STORE_URI": f"aws://{KEY}:{SECRET}@/?endpoint_url={quote(s3_endpoint, safe='')}"
        "&region_name=us-east-1",
        "SIMILARITY_THUMBNAIL_STORE": f"s3://similarity_store@{BUCKET}/thumbnails",
        "SIMILARITY_THUMBNAIL_HOSTS": media_host,
        "SIMILARITY_VGG16_WEIGHTS": "random",
        "SIMILARITY_INPUT_SIZE": "32",
        "SIMILARITY_SCHEDULE": "none",
        "AIRFLOW_TASK_HEARTBEAT_TIMEOUT": "30",
    }


def active_services(env: dict[str, str]) -> list[str]:
    from compose_topology import SERVICES

    profiles = set(env.get("COMPOSE_PROFILES", "").split(","))
    names = [
        n for n, s in SERVICES.items() if n.startswith("airflow-") and set(s.get("profiles", [])) <= profiles
    ]
    return startup_order(names)


def local_argv(service: str, user_env: dict[str, str]) -> list[str]:
    """The service's command as the image runs it: bind-mounted paths are the checkout's, and any
    command that is not bash/python goes to `airflow` (the official image's entrypoint)."""
    from compose_topology import SERVICES

    argv = command(service, user_env)
    for mount in SERVICES[service].get("volumes", []):
        source, target = mount.split(":")[:2]
        if source.startswith("./"):
            argv = [a.replace(target, str(ROOT / source[2:])) for a in argv]
    if argv[0] in ("bash", "python"):
        return argv
    if argv[:2] == ["celery", "worker"]:  # two workers on one host: celery@<service>, as in a container
        argv += ["--celery-hostname", f"celery@{service}"]
    return [str(VENV_BIN / "airflow"), *argv]


class Api:
    def __init__(self, base: str, passwords: Path) -> None:
        import json

        self.base = base
        password = json.loads(passwords.read_text())["admin"]
        token = requests.post(
            f"{base}/auth/token", json={"username": "admin", "password": password}, timeout=30
        )
        token.raise_for_status()
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token.json()['access_token']}"

    def call(self, method: str, path: str, **kw) -> dict:
        resp = self.http.request(method, f"{self.base}/api/v2{path}", timeout=60, **kw)
        resp.raise_for_status()
        return resp.json()

    def dag_ready(self) -> bool:
        resp = self.http.get(f"{self.base}/api/v2/dags/{devenv.DAG_ID}", timeout=30)
        return resp.status_code == 200

    def trigger(self) -> str:
        run = self.call("POST", f"/dags/{devenv.DAG_ID}/dagRuns", json={"logical_date": None, "conf": {}})
        return run["dag_run_id"]

    def run_state(self, run_id: str) -> str:
        return self.call("GET", f"/dags/{devenv.DAG_ID}/dagRuns/{run_id}")["state"]

    def task_states(self, run_id: str) -> dict[tuple[str, int], str]:
        tis = self.call("GET", f"/dags/{devenv.DAG_ID}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return {(t["task_id"], t["map_index"]): t["state"] for t in tis["task_instances"]}


def single_process_run(settings: Settings) -> None:
    """The reference: every stage once, in this process, without Airflow, shards or S3."""
    db.apply_schema(settings.db_url)
    window = crawl.incremental_window(settings.db_url, timedelta(minutes=settings.crawl_overlap_minutes))
    crawl.crawl(settings, window, checkpoint_key="reference")
    thumbnails.download_thumbnails(settings)
    extracted = features.extract_features(settings)
    vectors.load_vectors(settings, extracted.files)
    similarity.refresh_similarity(settings)


def test_compose_topology_runs_the_dag_on_celery_workers_and_survives_a_dead_gpu_worker(pg_uri, tmp_path):
    redis_bin = redis_server()
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request

    meta_url, _ = devenv.create_database(pg_uri, "topology_airflow")
    target_url, _ = devenv.create_database(pg_uri, "topology_similarity")
    reference_url, _ = devenv.create_database(pg_uri, "topology_reference")
    socket_dir = pg_uri.split("host=", 1)[1]
    # The similarity_db connection as a user writes it for a socket: the directory in the host field.
    similarity_uri = f"postgresql://postgres@{quote(socket_dir, safe='')}/topology_similarity"

    home = tmp_path / "airflow"
    home.mkdir()
    redis_port, s3_port, api_port, health_port = free_port(), free_port(), free_port(), free_port()
    s3_endpoint = f"http://127.0.0.1:{s3_port}"
    catalog = Catalog.generate(MODELS, seed=13)
    processes: list[Process] = []
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    with sigterm_interrupts(), start_server(catalog) as sketchfab:
        try:
            redis = Process(
                "redis",
                [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(tmp_path)],
                dict(os.environ),
                tmp_path / "redis.log",
                health_argv=["redis-cli", "-p", str(redis_port), "ping"],
            )  # fmt: skip
            processes.append(redis)
            redis.start()
            moto.start()
            s3 = boto3.client(
                "s3",
                endpoint_url=s3_endpoint,
                aws_access_key_id=KEY,
                aws_secret_access_key=SECRET,
                region_name="us-east-1",
            )
            s3.create_bucket(Bucket=BUCKET)

            user_env = dotenv(sketchfab.api_base_url, sketchfab.media_host, similarity_uri, s3_endpoint)
            services = active_services(user_env)
            assert services[0] == "airflow-init" and {CPU_WORKER, GPU_WORKER} <= set(services)
            queues = {w: local_argv(w, user_env) for w in (CPU_WORKER, GPU_WORKER)}
            assert [q[q.index("--queues") + 1] for q in queues.values()] == ["default", "gpu"], queues
            by_name: dict[str, Process] = {}
            for name in services:
                env = service_env(name, user_env, home, meta_url, redis_port, api_port, health_port)
                # Compose interpolates commands and healthchecks from `.env`, not from the service's environment.
                proc = Process(name, local_argv(name, user_env), env, tmp_path / f"{name}.log")
                if "healthcheck" in _service(name):
                    proc.health_argv = local_health(name, user_env, api_port, health_port)
                by_name[name] = proc

            def logs() -> str:
                return "\n".join(f"--- {p.name} ---\n{p.tail(2500)}" for p in processes)

            # airflow-init: chown the mounted paths, migrate the metadata database, size the gpu pool.
            init = by_name.pop("airflow-init")
            done = subprocess.run(
                init.argv, env=init.env, cwd=ROOT, capture_output=True, text=True, timeout=600
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            pools = query(meta_url, "SELECT pool, slots FROM slot_pool WHERE pool = 'gpu'")
            assert pools == [("gpu", 1)], "SIMILARITY_GPU_SLOTS reaches the pool"

            for name, proc in by_name.items():  # in depends_on order; each waits for what it needs
                for dep in _service(name).get("depends_on") or {}:
                    if dep in by_name and by_name[dep].starts:
                        wait_for(f"{dep} to be healthy", STARTUP_S, by_name[dep].healthy, logs, every_s=3)
                processes.append(proc)
                proc.start()
            for name, proc in by_name.items():
                wait_for(f"{name} to be healthy", STARTUP_S, proc.healthy, logs, every_s=3)

            api = Api(f"http://127.0.0.1:{api_port}", home / "passwords.json")
            wait_for("the DAG to be parsed", STARTUP_S, api.dag_ready, logs)
            api.call("PATCH", f"/dags/{devenv.DAG_ID}", json={"is_paused": False})
            run_id = api.trigger()

            # Kill the GPU worker while extract_features runs on it, then bring it back.
            gpu = by_name[GPU_WORKER]

            def extracting() -> bool:
                states = api.task_states(run_id)
                assert api.run_state(run_id) != "failed", f"run failed before extraction: {states}\n{logs()}"
                return any(t == "extract_features" and s == "running" for (t, _), s in states.items())

            wait_for("extract_features to run", RUN_S, extracting, logs, every_s=0.5)
            gpu.kill()
            assert not gpu.alive()
            gpu.start()
            wait_for(f"{GPU_WORKER} to be healthy again", STARTUP_S, gpu.healthy, logs, every_s=3)

            def finished(run: str):
                state = api.run_state(run)
                assert state != "failed", f"run {run} failed: {api.task_states(run)}\n{logs()}"
                return state == "success"

            wait_for("the run to succeed", RUN_S, lambda: finished(run_id), logs, every_s=3)

            # Where each task ran: extraction on the GPU worker only (its first try too), the rest on the CPU one.
            tis = query(
                meta_url,
                "SELECT task_id, map_index, queue, hostname, try_number FROM task_instance WHERE run_id = %s",
                (run_id,),
            )
            history = query(
                meta_url,
                "SELECT task_id, queue, hostname, state FROM task_instance_history WHERE run_id = %s",
                (run_id,),
            )
            extraction = [t for t in tis if t[0] == "extract_features"]
            assert extraction and all(t[2:4] == ("gpu", GPU_WORKER) for t in extraction), extraction
            assert all(t[4] >= 2 for t in extraction), f"the killed try was retried: {extraction}"
            dead = [h for h in history if h[0] == "extract_features"]
            assert dead and all(h[1:3] == ("gpu", GPU_WORKER) and h[3] == "failed" for h in dead), dead
            others = [t for t in tis if t[0] != "extract_features"]
            assert {t[0] for t in others} >= {"crawl_models", "download_thumbnails", "load_vectors"}
            assert all(t[2:4] == ("default", CPU_WORKER) for t in others), others

            # One publish, one Asset event, carrying what changed.
            events = asset_events(meta_url)
            assert len(events) == 1, events
            (models,) = query(target_url, "SELECT count(*) FROM model_embeddings")[0]
            (rows,) = query(target_url, "SELECT count(*) FROM model_similarity")[0]
            assert events[0]["models"] == models > 0 and events[0]["rows"] == rows > 0, events

            # A second run finds nothing new: it succeeds, publishes nothing and makes no event.
            before = snapshot(target_url)
            second = api.trigger()
            wait_for("the second run to succeed", RUN_S, lambda: finished(second), logs, every_s=3)
            assert len(asset_events(meta_url)) == 1, "a run with no change made an Asset event"
            assert snapshot(target_url) == before
            # The thumbnails are in the bucket, not on a local disk. So were the feature files, which
            # the gpu worker wrote and the other worker loaded; load_vectors removed them once loaded.
            keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                    for o in page.get("Contents", [])]  # fmt: skip
            (stored,) = query(
                target_url, "SELECT count(DISTINCT stored_path) FROM model_thumbnails WHERE status = 'ok'"
            )[0]
            assert sum(1 for k in keys if not k.startswith("thumbnails/features/")) == stored > 0
            assert not any(k.startswith("thumbnails/features/") for k in keys), (
                "loaded feature files are removed"
            )

            # The gallery, served by the api-server, reads a thumbnail back from the bucket.
            uid, content_hash = query(
                target_url,
                "SELECT uid, content_hash FROM model_thumbnails WHERE status = 'ok' ORDER BY uid LIMIT 1",
            )[0]
            image = api.http.get(f"{api.base}/similarity-gallery/thumbnails/{uid}", timeout=60)
            assert image.status_code == 200 and hashlib.sha256(image.content).hexdigest() == content_hash
        finally:
            for proc in reversed(processes):
                proc.stop()
            moto.stop()
        leftovers = [p.name for p in processes if _group_exists(p.proc.pid)]
        assert not leftovers, f"processes left running: {leftovers}"

        reference = Settings(
            db_url=reference_url,
            api_base_url=sketchfab.api_base_url,
            thumbnail_store=str(tmp_path / "reference-thumbnails"),
            thumbnail_hosts=(sketchfab.media_host,),
            vgg16_weights="random",
            input_size=32,
            top_n=5,
        )
        single_process_run(reference)
    assert snapshot(target_url) == snapshot(reference_url)


def _service(name: str) -> dict:
    from compose_topology import SERVICES

    return SERVICES[name]


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def asset_events(meta_url: str) -> list[dict]:
    rows = query(
        meta_url,
        "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
        "WHERE a.name = 'sketchfab_model_similarity' ORDER BY e.id",
    )
    return [r[0] for r in rows]


def service_env(
    name: str,
    user_env: dict[str, str],
    home: Path,
    meta_url: str,
    redis_port: int,
    api_port: int,
    health_port: int,
) -> dict[str, str]:
    """The service's compose environment; container addresses and paths replaced by local ones."""
    env = environment(name, user_env)
    meta = meta_url.replace("+psycopg2", "")
    local = {  # each of these must be in the compose file: a renamed key fails here
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta_url,
        "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{meta}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
    }
    missing = set(local) - set(env)
    assert not missing, f"{name}: docker-compose.yml no longer sets {missing}"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    env.update(local)
    mounts = [home / d for d in ("logs", "thumbnails", "auth", "keras")]
    env.update(
        {
            # What the image provides: its paths, our dags/ and plugins/ (bind-mounted there).
            "PATH": os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]),
            "HOME": os.environ.get("HOME", str(home)),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW_INIT_DIRS": " ".join(map(str, mounts)),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "tests")]),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            # What a container has of its own: a hostname, and ports nobody else on the host uses.
            "HOSTNAME": name,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "service_hostname.hostname",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(health_port),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            # Sized for a 2-core machine running seven Airflow processes.
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE": "2",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW": "4",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            # Test-sized pipeline: small lists, quick retries, two download shards, one extraction shard.
            "AIRFLOW_VAR_SIMILARITY_TOP_N": "5",
            "AIRFLOW_VAR_SIMILARITY_RETRY_DELAY_S": "5",
            "AIRFLOW_VAR_SIMILARITY_RUN_WAIT_POKE_S": "5",
            "AIRFLOW_VAR_SIMILARITY_DOWNLOAD_SHARD_SIZE": str(MODELS // 2),
            "AIRFLOW_VAR_SIMILARITY_EXTRACT_SHARD_SIZE": str(MODELS * 2),
        }
    )
    return env


def local_health(name: str, user_env: dict[str, str], api_port: int, health_port: int) -> list[str]:
    """The compose healthcheck, pointed at this service's local ports."""
    argv = healthcheck(name, user_env)
    ports = {"localhost:8080": f"127.0.0.1:{api_port}", "localhost:8974": f"127.0.0.1:{health_port}"}
    for container, local in ports.items():
        argv = [a.replace(container, local) for a in argv]
    return argv
