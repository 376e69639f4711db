"""HTTP retry, backoff and URL redaction, shared by the API client and the thumbnail fetcher.

One backoff rule everywhere: attempt n (from 0) waits `base * 2**n` plus up to `base` of
random jitter, capped. The API client gets it from urllib3's `Retry` (same formula, battle
tested, honours `Retry-After`); the asyncio thumbnail fetcher and the client's
not-JSON retries call `backoff_delay`/`retry_delay` directly.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Answers worth another try: throttling and server errors."""
MAX_BACKOFF_S = 60.0


def backoff_delay(attempt: int, base_s: float, cap_s: float = MAX_BACKOFF_S) -> float:
    """Exponential backoff with jitter: base * 2**attempt + U(0, base), at most cap_s."""
    return min(base_s * 2**attempt + random.uniform(0, base_s), cap_s)


def retry_delay(attempt: int, retry_after: str | None, backoff_s: float, cap_s: float) -> float:
    """Retry-After (seconds or an HTTP date) when given, else `backoff_delay`; capped."""
    if retry_after:
        if retry_after.strip().isdigit():
            return min(float(retry_after), cap_s)
        with contextlib.suppress(TypeError, ValueError):
            when = parsedate_to_datetime(retry_after).timestamp()
            return max(0.0, min(when - time.time(), cap_s))
    return backoff_delay(attempt, backoff_s, cap_s)


def redact(url: str) -> str:
    """A URL fit for logs and stored reasons: no credentials, no query string (it may hold secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return (f"{parts.scheme}://{netloc}{parts.path}" + ("?…" if parts.query else ""))[:200]


def short_error(exc: Exception) -> str:
    """Exception text without query strings (requests puts the full URL into its messages)."""
    return re.sub(r"\?\S*", "?…", str(exc))[:300]


class CappedRetry(Retry):
    """urllib3 Retry that never sleeps longer than `retry_after_cap` for one Retry-After, and says why it waits."""

    retry_after_cap: float = 120.0

    def get_retry_after(self, response: Any) -> float | None:
        value = super().get_retry_after(response)
        return None if value is None else min(value, self.retry_after_cap)

    def new(self, **kw: Any) -> CappedRetry:
        new = super().new(**kw)
        new.retry_after_cap = self.retry_after_cap
        return new

    def increment(
        self, method: Any = None, url: Any = None, response: Any = None, error: Any = None, **kw: Any
    ):
        new = super().increment(method, url, response, error, **kw)
        pool = kw.get("_pool")
        where = f"{getattr(pool, 'host', '?')}{(url or '').split('?')[0]}"
        why = f"HTTP {response.status}" if response is not None and response.status else type(error).__name__
        log.warning("GET %s: %s; retry %d of %s", where, why, len(new.history), self.total)
        return new


def make_retry(
    *, retries: int, backoff_s: float, retry_after_cap_s: float, statuses: frozenset[int] = RETRY_STATUSES
) -> CappedRetry:
    """GET-only retries on connection errors and `statuses`, exponential backoff with jitter, no redirects."""
    retry = CappedRetry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=0,
        status_forcelist=statuses,
        allowed_methods=frozenset({"GET"}),
        backoff_factor=backoff_s,
        backoff_jitter=backoff_s,
        backoff_max=MAX_BACKOFF_S,
        respect_retry_after_header=True,
        raise_on_status=False,
        redirect=0,
        raise_on_redirect=False,
    )
    retry.retry_after_cap = retry_after_cap_s
    return retry


def build_session(
    *,
    retries: int,
    backoff_factor: float,
    retry_after_cap: float,
    pool_size: int = 16,
    statuses: frozenset[int] = RETRY_STATUSES,
) -> requests.Session:
    """A pooled Session retrying GETs on connection errors, 429 and 5xx with jittered backoff."""
    retry = make_retry(
        retries=retries, backoff_s=backoff_factor, retry_after_cap_s=retry_after_cap, statuses=statuses
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
