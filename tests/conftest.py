"""Shared fixtures: a real embedded Postgres (one server, a fresh database per test) and real HTTP."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

# Airflow reads its home at import time: keep tests away from ~/airflow.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import devenv  # noqa: E402
import processes  # noqa: E402
from sketchfab_similarity.core import db  # noqa: E402
from sketchfab_similarity.core.settings import Settings  # noqa: E402

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """libpq URI of an embedded PostgreSQL with pgvector, started once per test session."""
    data_dir = tmp_path_factory.mktemp("pg") / "data"
    uri = devenv.start_postgres(data_dir)
    yield uri
    devenv.stop_postgres(data_dir)


@pytest.fixture
def fresh_db(pg_uri: str) -> Iterator[str]:
    """SQLAlchemy URL of a new, empty database with the schema applied."""
    url, _ = devenv.create_database(pg_uri, f"test_{os.getpid()}_{next(_db_counter)}")
    db.apply_schema(url)
    yield url
    db.get_engine(url).dispose()  # give its pooled connections back; the server allows only so many


@pytest.fixture
def make_settings(fresh_db: str, tmp_path: Path):
    """Settings for a stage test: fresh database, temporary store, small random-weight VGG16."""

    def make(**overrides) -> Settings:
        values = dict(
            db_url=fresh_db,
            thumbnail_store=str(tmp_path / "store"),
            thumbnail_hosts=("localhost",),
            vgg16_weights="random",
            input_size=32,
            top_n=5,
            download_workers=4,
        )
        values.update(overrides)
        return Settings(**values)

    return make


def pytest_configure(config: pytest.Config) -> None:
    # Orphans of anything a test starts are re-parented to this process, so none can escape the checks.
    config.stash[_SUBREAPER] = processes.become_subreaper()
    # The guard below relies on this marker; declared here too for a conftest used on its own.
    config.addinivalue_line(
        "markers", "integration: uses real Postgres, HTTP, TensorFlow or Airflow (slower)"
    )


_SUBREAPER = pytest.StashKey[bool]()
_LEFT_BEHIND = pytest.StashKey[list]()


@pytest.fixture(autouse=True)
def no_processes_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every process a test starts is stopped when the test ends, pass or fail.

    Leftovers (other than the session's shared Postgres) are killed (SIGTERM, then SIGKILL) and
    fail the test that left them, so a leak is fixed where it starts.
    """
    before = {p.pid for p in processes.descendants()}
    yield
    left = processes.still_running(
        [p for p in processes.descendants() if p.pid not in before and not processes.is_session_postgres(p)]
    )
    if left:
        listing = processes.describe(left)
        processes.kill_all(left)
        request.config.stash.setdefault(_LEFT_BEHIND, []).append(f"{request.node.nodeid}:\n{listing}")
        pytest.fail(f"the test left processes running (now killed):\n{listing}", pytrace=False)


def listening_sockets() -> list[str]:
    """Addresses this process listens on (the embedded Postgres is another process)."""
    return [
        f"{c.laddr.ip}:{c.laddr.port}"
        for c in psutil.Process().net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    ]


SERVING_FIXTURES: set[str] = set()
"""Fixtures whose setup began listening on a socket in this process (a loopback server)."""


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
    if fixturedef.scope == "function":  # set up under the guard below, whose listen() records it
        return (yield)
    before = set(listening_sockets())
    try:
        return (yield)
    finally:
        if set(listening_sockets()) - before:
            SERVING_FIXTURES.add(fixturedef.argname)


HEAVY_MODULES = ("tensorflow", "keras", "airflow.models", "selenium")
"""Imports that make a test slow: a test that brings one in must be marked integration."""


@pytest.fixture(autouse=True)
def integration_marker_is_honest(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """A test without the `integration` marker starts no process, listens on no socket, uses no
    database and imports nothing heavy, so `make test-fast` is what it says."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    used: list[str] = []
    if "pg_uri" in request.fixturenames:
        used.append("the embedded Postgres (fixture pg_uri)")
    real_execute_child, real_listen = subprocess.Popen._execute_child, socket.socket.listen

    def execute_child(self, args, *rest, **kwargs):
        used.append(f"a subprocess ({args if isinstance(args, str) else ' '.join(map(str, args))[:80]})")
        return real_execute_child(self, args, *rest, **kwargs)

    def listen(self, *args):
        used.append(f"a listening socket ({self.getsockname()})")
        return real_listen(self, *args)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", execute_child)
    monkeypatch.setattr(socket.socket, "listen", listen)
    before = {name for name in HEAVY_MODULES if name in sys.modules}
    serving = sorted(SERVING_FIXTURES.intersection(request.fixturenames))
    if serving:
        used.append(f"a server that fixture {', '.join(serving)} started")
    yield
    used += [f"an import of {name}" for name in HEAVY_MODULES if name in sys.modules and name not in before]
    if used:
        pytest.fail(f"not marked integration, but uses {'; '.join(used)}", pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any child process outlives it (the shared Postgres is stopped by then)."""
    # A server stopped a moment ago may still be exiting (its stop returned once it stopped
    # accepting connections): give what is left a few seconds before calling it a leak.
    _, alive = psutil.wait_procs(processes.descendants(), timeout=10)
    left = processes.still_running(alive)
    if left:
        listing = processes.describe(left)
        processes.kill_all(left)
        session.config.stash.setdefault(_LEFT_BEHIND, []).append(f"at the end of the session:\n{listing}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    for entry in config.stash.get(_LEFT_BEHIND, []):
        terminalreporter.write_line(f"processes left running by {entry}", red=True)
