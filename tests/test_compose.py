"""docker-compose.yml and the Dockerfile, checked for consistency (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from sketchfab_similarity.core.settings import API_CONN_ID, DB_CONN_ID, VARIABLES, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
AIRFLOW_SERVICES = {name: s for name, s in SERVICES.items() if name.startswith("airflow-")}
DOCKERFILE = (ROOT / "Dockerfile").read_text()
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(:?[-?])?([^}]*)\}")


def command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else list(cmd)


def default_of(value: str) -> str:
    """A compose value with `${NAME:-default}` replaced by its default."""
    return INTERPOLATION.sub(lambda m: m.group(3) if m.group(2) == ":-" else "", value)


def requirement(name: str) -> str:
    line = next(x for x in (ROOT / "requirements.txt").read_text().splitlines() if x.startswith(f"{name}=="))
    return line.split("==")[1]


def test_every_image_is_pinned():
    for name, service in SERVICES.items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"
    for base in re.findall(r"^FROM\s+(\S+)", DOCKERFILE, flags=re.MULTILINE):
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", base) or base == "base", (
            f"Dockerfile FROM {base} not pinned"
        )


def test_the_image_matches_the_pinned_dependencies():
    assert f"apache/airflow:{requirement('apache-airflow')}-python3.11" in DOCKERFILE
    assert f"tensorflow[and-cuda]=={requirement('tensorflow')}" in DOCKERFILE
    targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", DOCKERFILE, flags=re.MULTILINE))
    for name, service in SERVICES.items():
        if "build" in service:
            assert service["build"]["target"] in targets, name
    assert SERVICES["airflow-worker-gpu"]["build"]["target"] == "gpu"


def test_airflow_components_are_all_there():
    commands = {name: command(s) for name, s in AIRFLOW_SERVICES.items()}
    for component in ("api-server", "scheduler", "dag-processor", "triggerer"):
        assert [component] in commands.values(), component
    assert SERVICES["postgres"]["image"].startswith("pgvector/pgvector:")
    assert SERVICES["redis"]["image"].startswith("redis:")


def test_executor_is_celery_with_a_documented_local_switch():
    env = AIRFLOW_SERVICES["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "${AIRFLOW_EXECUTOR:-CeleryExecutor}"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    workers = sorted(n for n, s in AIRFLOW_SERVICES.items() if command(s)[:2] == ["celery", "worker"])
    assert workers == ["airflow-worker", "airflow-worker-gpu"]
    switch = "AIRFLOW_EXECUTOR=LocalExecutor docker compose up -d " + " ".join(
        f"--scale {w}=0" for w in workers
    )
    assert switch in (ROOT / "docker-compose.yml").read_text()
    assert switch in (ROOT / "README.md").read_text()


def test_gpu_worker_reserves_a_device_and_serves_the_gpu_queue():
    gpu = SERVICES["airflow-worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    cmd = command(gpu)
    queue = gpu["environment"]["AIRFLOW_VAR_SIMILARITY_GPU_QUEUE"]
    assert cmd[cmd.index("--queues") + 1] == queue == Settings().gpu_queue
    assert cmd[cmd.index("--concurrency") + 1] == "1"
    cpu = command(SERVICES["airflow-worker"])
    assert cpu[cpu.index("--queues") + 1] == "default"
    init = (ROOT / "deploy" / "airflow-init.sh").read_text()
    assert 'pools set "${AIRFLOW_VAR_SIMILARITY_GPU_POOL:-gpu}"' in init


def test_connections_and_variables_match_the_contract():
    for name, service in AIRFLOW_SERVICES.items():
        env = service["environment"]
        conns = {k.removeprefix("AIRFLOW_CONN_").lower() for k in env if k.startswith("AIRFLOW_CONN_")}
        assert conns == {API_CONN_ID, DB_CONN_ID}, name
        variables = {k.removeprefix("AIRFLOW_VAR_").lower() for k in env if k.startswith("AIRFLOW_VAR_")}
        assert variables <= set(VARIABLES), f"{name}: unknown Variables {variables - set(VARIABLES)}"
        assert {
            "similarity_thumbnail_store",
            "similarity_thumbnail_hosts",
            "similarity_vgg16_weights",
            "similarity_input_size",
        } <= variables, name


def test_every_interpolation_has_a_default_or_a_clear_error():
    text = (ROOT / "docker-compose.yml").read_text()
    found = INTERPOLATION.findall(text)
    assert found
    for name, op, rest in found:
        assert op in (":-", ":?"), f"${{{name}}} has neither a default nor an error message"
        if op == ":?":
            assert len(rest) > 10, f"${{{name}}} needs a message that says what to set"


def test_volumes_are_declared_used_and_shared():
    declared = set(COMPOSE["volumes"])
    used = set()
    for name, service in SERVICES.items():
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"
    store = AIRFLOW_SERVICES["airflow-worker"]["environment"]["AIRFLOW_VAR_SIMILARITY_THUMBNAIL_STORE"]
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-worker", "airflow-worker-gpu"):
        assert f"thumbnails:{store}" in SERVICES[name]["volumes"], (
            f"{name} does not share the thumbnail store"
        )
    assert "postgres-data:/var/lib/postgresql" in SERVICES["postgres"]["volumes"]


def test_dependencies_exist_and_wait_for_health():
    for name, service in SERVICES.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in SERVICES and dependency != name, f"{name} -> {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], f"{dependency} has no healthcheck"
            else:
                assert condition["condition"] == "service_completed_successfully"
                assert SERVICES[dependency].get("restart") == "no", dependency
    assert "healthcheck" in SERVICES["postgres"]


def test_databases_and_urls_point_at_services():
    env = AIRFLOW_SERVICES["airflow-apiserver"]["environment"]
    similarity_uri = default_of(env["AIRFLOW_CONN_SIMILARITY_DB"])
    database = similarity_uri.rsplit("/", 1)[1]
    assert "@postgres:5432/" in similarity_uri
    assert f"CREATE DATABASE {database};" in (ROOT / "deploy" / "postgres-init.sh").read_text()
    assert f"-d {database}" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert "@postgres:5432/airflow" in default_of(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert "8080:8080" in SERVICES["airflow-apiserver"]["ports"]


@pytest.mark.parametrize("script", ["postgres-init.sh", "airflow-init.sh"])
def test_deploy_scripts_are_executable_and_strict(script):
    path = ROOT / "deploy" / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    assert "set -e" in path.read_text()
