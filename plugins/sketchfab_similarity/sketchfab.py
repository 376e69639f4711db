"""Sketchfab Data API v3 client: paging, auth, throttling and retries.

Retries and `Retry-After` handling come from urllib3's `Retry` (battle-tested,
jittered exponential backoff) rather than a hand-written loop; this module adds
what urllib3 cannot know: the cap on `Retry-After`, pacing on
`X-RateLimit-Remaining`, the same-host rule for `next`, and envelope checks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class SketchfabAPIError(RuntimeError):
    """The API answered, but not with something we can use. The message says what and where."""


class CappedRetry(Retry):
    """urllib3 Retry that never sleeps longer than `retry_after_cap` for one Retry-After."""

    retry_after_cap: float = 120.0

    def get_retry_after(self, response: Any) -> float | None:
        value = super().get_retry_after(response)
        return None if value is None else min(value, self.retry_after_cap)

    def new(self, **kw: Any) -> CappedRetry:
        new = super().new(**kw)
        new.retry_after_cap = self.retry_after_cap
        return new


def build_session(
    *,
    retries: int = 6,
    backoff_factor: float = 0.5,
    retry_after_cap: float = 120.0,
    pool_size: int = 16,
    statuses: frozenset[int] = RETRY_STATUSES,
) -> requests.Session:
    """A pooled Session retrying GETs on connection errors, 429 and 5xx with jittered backoff."""
    retry = CappedRetry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        status_forcelist=statuses,
        allowed_methods=frozenset({"GET"}),
        backoff_factor=backoff_factor,
        backoff_jitter=backoff_factor,
        backoff_max=60.0,
        respect_retry_after_header=True,
        raise_on_status=False,
        redirect=0,
    )
    retry.retry_after_cap = retry_after_cap
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@dataclass(frozen=True)
class Page:
    url: str
    results: list[Any]
    next_url: str | None


class SketchfabClient:
    """Reads model listings. The token is sent as a header only, never logged or stored."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout_s: float = 20.0,
        session: requests.Session | None = None,
        min_remaining: int = 1,
        max_pace_sleep_s: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"API base URL must be http(s)://host[:port], got {base_url!r}")
        self._origin = (parts.scheme, parts.netloc.lower())
        self.timeout_s = timeout_s
        self.session = session or build_session()
        self.session.headers["Accept"] = "application/json"
        if token:
            self.session.headers["Authorization"] = f"Token {token}"
        self.min_remaining = min_remaining
        self.max_pace_sleep_s = max_pace_sleep_s
        self.requests_made = 0

    def models_url(self, *, sort_by: str = "-publishedAt", count: int = 24, **filters: Any) -> str:
        params = {"sort_by": sort_by, "count": count}
        params.update({k: v for k, v in filters.items() if v not in (None, "", [])})
        return f"{self.base_url}/v3/models?{urlencode(params, doseq=False)}"

    def iter_pages(self, first_url: str) -> Iterator[Page]:
        """Follow `next` links from `first_url`; only links on the configured scheme and host."""
        url: str | None = first_url
        while url:
            self.check_same_origin(url)
            body = self.get_json(url)
            if not isinstance(body, dict) or not isinstance(body.get("results"), list):
                raise SketchfabAPIError(f"{self.redact(url)}: expected a listing envelope with 'results'")
            next_url = body.get("next")
            if next_url is not None and not isinstance(next_url, str):
                raise SketchfabAPIError(f"{self.redact(url)}: 'next' is not a URL: {next_url!r}")
            yield Page(url=url, results=body["results"], next_url=next_url or None)
            url = next_url or None

    def get_model(self, uid: str) -> dict[str, Any] | None:
        """One model, or None when it is gone (404)."""
        body = self.get_json(f"{self.base_url}/v3/models/{uid}", allow_404=True)
        return body if isinstance(body, dict) else None

    def check_same_origin(self, url: str) -> None:
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc.lower()) != self._origin:
            raise SketchfabAPIError(
                f"Refusing to follow {self.redact(url)}: not on the configured API origin "
                f"{self._origin[0]}://{self._origin[1]}"
            )

    def get_json(self, url: str, *, allow_404: bool = False) -> Any:
        try:
            resp = self.session.get(url, timeout=self.timeout_s, allow_redirects=False)
        except requests.RequestException as exc:
            raise SketchfabAPIError(f"GET {self.redact(url)} failed after retries: {exc}") from exc
        self.requests_made += 1
        self._pace(resp)
        if allow_404 and resp.status_code == 404:
            return None
        if resp.status_code in (401, 403):
            raise SketchfabAPIError(
                f"GET {self.redact(url)}: HTTP {resp.status_code}; check the sketchfab_api connection's token"
            )
        if resp.status_code != 200:
            raise SketchfabAPIError(
                f"GET {self.redact(url)}: HTTP {resp.status_code} after retries: {resp.text[:200]!r}"
            )
        ctype = resp.headers.get("Content-Type", "")
        if "json" not in ctype.lower():
            raise SketchfabAPIError(
                f"GET {self.redact(url)}: expected JSON, got {ctype or 'no content type'} "
                f"(a proxy error page?): {resp.text[:120]!r}"
            )
        try:
            return resp.json()
        except ValueError as exc:
            raise SketchfabAPIError(f"GET {self.redact(url)}: invalid JSON: {exc}") from exc

    def _pace(self, resp: requests.Response) -> None:
        """Sleep until the window resets when the server says we are about to be throttled."""
        remaining = resp.headers.get("X-RateLimit-Remaining")
        reset = resp.headers.get("X-RateLimit-Reset")
        if remaining is None or reset is None:
            return
        try:
            remaining_n, reset_s = int(remaining), float(reset)
        except ValueError:
            return
        if remaining_n >= self.min_remaining:
            return
        # Reset may be an epoch timestamp or seconds from now; both are seen in the wild.
        wait = reset_s - time.time() if reset_s > 1e9 else reset_s
        wait = max(0.0, min(wait, self.max_pace_sleep_s))
        if wait:
            log.info("Rate limit nearly spent (remaining=%s); pausing %.1fs", remaining_n, wait)
            time.sleep(wait)

    @staticmethod
    def redact(url: str) -> str:
        """URLs are logged without query-string secrets (a token must never travel in a URL)."""
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?…" if parts.query else "")
