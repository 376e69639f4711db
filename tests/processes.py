"""Child processes of the test run: find them, stop whole trees, and check that none is left.

The test process is made a child subreaper (Linux), so a process whose parent exits (an Airflow
scheduler's LocalExecutor workers, a daemonised server) is re-parented to the test run instead
of init: nothing a test starts can hide from `descendants()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess

import psutil

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_zombies() -> None:
    """Collect exited orphans re-parented to us (they would otherwise stay as zombies)."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)


def descendants() -> list[psutil.Process]:
    reap_zombies()
    out = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
    return out


def is_session_postgres(proc: psutil.Process) -> bool:
    """The embedded Postgres shared by the whole session (stopped when the session ends)."""
    with contextlib.suppress(psutil.Error):
        return proc.name() in ("postgres", "postmaster")
    return False


def still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The ones that have not exited meanwhile: a process that ends by itself while it is being
    listed (a Postgres backend whose connection just closed) is not a leak."""
    out = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.cmdline()  # raises if it is gone by now
                out.append(proc)
    return out


def describe(procs: list[psutil.Process]) -> str:
    lines = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            lines.append(f"  pid {proc.pid}: {' '.join(proc.cmdline())[:200] or proc.name()}")
    return "\n".join(lines)


def kill_all(procs: list[psutil.Process], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after `grace_s` (an Airflow scheduler ignores SIGTERM)."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    reap_zombies()


def stop_tree(proc: subprocess.Popen, first_signal: int = signal.SIGINT, grace_s: float = 60.0) -> None:
    """Stop a process and everything it started, whatever session or group they moved to.

    The tree is listed before the first signal (orphans lose their link to it once their parent
    exits); `first_signal` goes to the process group, then every survivor gets SIGTERM and SIGKILL.
    """
    tree: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, first_signal)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    kill_all([p for p in tree if p.is_running()], grace_s=10.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
