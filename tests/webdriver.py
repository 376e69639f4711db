"""A minimal W3C WebDriver client for headless Chromium (Debian's `chromium` + `chromium-driver`).

Enough for the gallery's browser test: navigate, find, type, click, read, screenshot.
Talks to chromedriver over HTTP on loopback; nothing is downloaded.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element identifier


class WebDriverError(RuntimeError):
    pass


def find_browser() -> tuple[str, str] | None:
    """Paths of chromium and chromedriver, or None if either is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Chromium:
    def __init__(self, chromium: str, chromedriver: str, profile: Path, size: tuple[int, int] = (1280, 1000)):
        port = free_port()
        self._driver = subprocess.Popen(
            [chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._base = f"http://127.0.0.1:{port}"
        self._http = requests.Session()
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._http.get(f"{self._base}/status", timeout=2).json()["value"]["ready"]:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self._driver.kill()
                raise WebDriverError("chromedriver did not become ready in 30 s")
            time.sleep(0.2)
        options = {
            "binary": chromium,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
            ],
        }
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        try:
            self._session = self._call("POST", "/session", caps, session=False)["sessionId"]
        except Exception:
            self._driver.kill()
            raise

    def _call(self, method: str, path: str, body: dict | None = None, session: bool = True) -> Any:
        url = f"{self._base}/session/{self._session}{path}" if session else f"{self._base}{path}"
        resp = self._http.request(method, url, json=body if body is not None else {}, timeout=60)
        value = resp.json().get("value")
        if resp.status_code >= 400 or (isinstance(value, dict) and "error" in value):
            raise WebDriverError(f"{method} {path}: {value.get('error')}: {value.get('message', '')[:300]}")
        return value

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    @property
    def current_url(self) -> str:
        return self._call("GET", "/url")

    def find_all(self, css: str) -> list[str]:
        found = self._call("POST", "/elements", {"using": "css selector", "value": css})
        return [f[ELEMENT_KEY] for f in found]

    def find(self, css: str) -> str:
        return self._call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT_KEY]

    def text(self, element: str) -> str:
        return self._call("GET", f"/element/{element}/text")

    def attribute(self, element: str, name: str) -> str | None:
        return self._call("GET", f"/element/{element}/attribute/{name}")

    def click(self, element: str) -> None:
        self._call("POST", f"/element/{element}/click")

    def type(self, element: str, text: str) -> None:
        self._call("POST", f"/element/{element}/value", {"text": text})

    def execute(self, script: str, *args: Any) -> Any:
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def alert_text(self) -> str | None:
        """The text of an open JavaScript dialog, or None when there is none (the expected case)."""
        try:
            return self._call("GET", "/alert/text")
        except WebDriverError as exc:
            if "no such alert" in str(exc):
                return None
            raise

    def wait_for(self, css: str, timeout_s: float = 15) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.find_all(css)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise WebDriverError(f"no element matches {css!r} after {timeout_s} s at {self.current_url}")
            time.sleep(0.1)

    def wait_for_images(self, timeout_s: float = 30) -> list[bool]:
        """Once every image of the page has finished (loaded or failed): which ones loaded.

        Checking right after the page's text appears raced the image requests still in flight."""
        deadline = time.monotonic() + timeout_s
        while not self.execute("return Array.from(document.images).every(i => i.complete);"):
            if time.monotonic() > deadline:
                raise WebDriverError(f"images still loading after {timeout_s} s at {self.current_url}")
            time.sleep(0.1)
        return self.execute("return Array.from(document.images).map(i => i.naturalWidth > 0);")

    def wait_for_url(self, prefix: str, timeout_s: float = 15) -> str:
        """After a click: wait for the navigation itself, so the old page's elements are not mistaken for the new."""
        deadline = time.monotonic() + timeout_s
        while not (url := self.current_url).startswith(prefix):
            if time.monotonic() > deadline:
                raise WebDriverError(f"still at {url} after {timeout_s} s, expected {prefix}...")
            time.sleep(0.1)
        return url

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))
        return path

    def quit(self) -> None:
        with contextlib.suppress(WebDriverError, requests.RequestException):
            self._call("DELETE", "")
        self._driver.terminate()
        try:
            self._driver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._driver.kill()


@contextlib.contextmanager
def serving(app: Any, prefix: str) -> Iterator[str]:
    """`app` mounted under `prefix` (as in the Airflow API server), uvicorn in a thread on
    127.0.0.1; yields the base URL."""
    import uvicorn
    from fastapi import FastAPI

    root = FastAPI()
    root.mount(prefix, app)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(root, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise WebDriverError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}{prefix}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
