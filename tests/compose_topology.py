"""docker-compose.yml's Airflow services as local processes: same commands, same environment.

Compose's `${NAME:-default}` interpolation is resolved against the variables a user would
put in `.env`; only what names another container (database, broker and API server
addresses, container paths) is replaced by its local equivalent, and each replaced key
must exist in the compose file, so a renamed setting fails the test instead of being
silently dropped. Every process runs in its own process group (its "container") and
`stop()` kills the whole group, as `docker compose down` would.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
VENV_BIN = Path(sys.executable).parent
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z0-9_]+)(?:(:?[-?])([^}]*))?\}")


class MissingVariable(KeyError):
    pass


def interpolate(value: str, dotenv: Mapping[str, str]) -> str:
    """Compose's interpolation: `${X}`, `${X:-default}`, `${X-default}`, `${X:?error}`, `$$` -> `$`."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        value = dotenv.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is not None:
            return value
        if op and op.endswith("?"):
            raise MissingVariable(f"{name}: {arg}")
        return arg if op else ""

    return _VARIABLE.sub(one, str(value))


def command(service: str, dotenv: Mapping[str, str]) -> list[str]:
    cmd = SERVICES[service].get("command", [])
    items = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    return [interpolate(str(x), dotenv) for x in items]


def environment(service: str, dotenv: Mapping[str, str]) -> dict[str, str]:
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate("" if v is None else str(v), dotenv) for k, v in env.items()}


def healthcheck(service: str, dotenv: Mapping[str, str]) -> list[str]:
    """The healthcheck's argv (CMD-SHELL runs under sh -c, as in a container)."""
    test = [interpolate(str(x), dotenv) for x in SERVICES[service]["healthcheck"]["test"]]
    return ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]


def startup_order(services: list[str]) -> list[str]:
    """`services` in depends_on order (dependencies outside the list are provided by the test)."""
    done: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        for dep in SERVICES[name].get("depends_on") or {}:
            if dep in services:
                visit(dep)
        done.append(name)

    for name in services:
        visit(name)
    return done


@dataclass
class Process:
    """One service: its argv and environment, running in its own process group."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    health_argv: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.starts += 1
        with self.log.open("a") as out:
            out.write(f"\n=== start {self.starts}: {shlex.join(self.argv)}\n")
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}\n{self.tail()}")
        if not self.health_argv:
            return True
        try:
            done = subprocess.run(
                self.health_argv, env=self.env, cwd=ROOT, capture_output=True, timeout=120, check=False
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def kill(self) -> None:
        """SIGKILL the whole group at once: a container (or its machine) dying, nothing shut down cleanly."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the group, SIGKILL for whatever is left after `grace_s`."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        with contextlib.suppress(
            ProcessLookupError
        ):  # the group may outlive its leader (forked pool workers, task processes)
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a CI timeout, `kill`) raises KeyboardInterrupt, so the test's cleanup still stops
    every process it started; Python's default would end the interpreter without running it."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for(what: str, timeout_s: float, check: Callable[[], Any], explain: Callable[[], str], every_s=2.0):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{explain()}")
        time.sleep(every_s)
