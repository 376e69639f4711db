"""The suite's own guard against leaked processes: nothing a test starts may outlive it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import processes
import psutil
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
STUBBORN = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "time.sleep(600)\n"
)


def wait_for_descendants(root: int, count: int) -> list[psutil.Process]:
    """Until `root` has `count` descendants (the children announce nothing else we could wait on)."""
    for _ in range(600):
        found = psutil.Process(root).children(recursive=True)
        if len(found) >= count:
            return found
        psutil.wait_procs([], timeout=0.05)
    raise AssertionError(f"pid {root} never had {count} descendants")


def test_stop_tree_kills_workers_that_left_the_group_and_ignore_signals():
    # A "scheduler" ignoring SIGINT/SIGTERM, with a "worker" in its own session doing the same.
    script = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', {STUBBORN!r}], start_new_session=True)\n" + STUBBORN
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    tree = [psutil.Process(proc.pid), *wait_for_descendants(proc.pid, 1)]
    processes.stop_tree(proc, grace_s=1.0)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert proc.returncode is not None


def test_an_orphan_is_still_found_and_killed():
    assert processes.become_subreaper()
    subprocess.run(["sh", "-c", "sleep 600 & exit 0"], check=True)  # the sleep's parent is gone
    orphans = [p for p in processes.descendants() if p.name() == "sleep"]
    assert len(orphans) == 1 and orphans[0].ppid() == os.getpid(), "re-parented to the test run"
    processes.kill_all(orphans, grace_s=1.0)
    assert not [p for p in processes.descendants() if p.name() == "sleep"]


def test_a_test_that_leaks_a_process_fails_and_the_process_is_killed(tmp_path):
    for name in ("conftest.py", "processes.py"):
        shutil.copy(ROOT / "tests" / name, tmp_path / name)
    (tmp_path / "test_leaky.py").write_text(
        textwrap.dedent(
            """
            import subprocess

            import pytest

            pytestmark = pytest.mark.integration  # starts processes

            def test_leaks():
                subprocess.run(["sh", "-c", "sleep 613 & exit 0"], check=True)

            def test_clean():
                subprocess.run(["true"], check=True)
            """
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "tools"), str(tmp_path)]),
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1, run.stdout
    assert "2 passed, 1 error" in run.stdout, run.stdout  # the leak is an error of the leaking test
    assert "ERROR test_leaky.py::test_leaks - Failed: the test left processes running" in run.stdout
    assert "sleep 613" in run.stdout, "the leftover is named"
    assert not [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[-1:] == ["613"]]
