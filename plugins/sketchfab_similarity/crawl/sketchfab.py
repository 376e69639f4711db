"""Sketchfab Data API v3 client: paging, auth, throttling and retries.

Retries and `Retry-After` handling come from urllib3's `Retry` (configured in
`core.httpretry`, shared with the thumbnail fetcher); this module adds
what urllib3 cannot know: the cap on `Retry-After`, pacing on
`X-RateLimit-Remaining`, retrying a 200 that is not JSON (a proxy's error page),
the same-origin rule for `next`, and envelope checks.

The token travels in the `Authorization` header only. URLs are logged without
their query string, and no header is ever logged.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import requests

from ..core.httpretry import backoff_delay, build_session, redact, short_error
from ..core.settings import Settings, default_value

log = logging.getLogger(__name__)

MAX_PAGE_BYTES = 32 * 1024 * 1024
"""A listing page is ~100 kB; anything near this is not a page we want to hold in memory."""
MAX_PAGE_SIZE = 24
"""The API's own maximum `count`."""
RESET_MARGIN_S = 0.25

# --- What the live API has not confirmed -------------------------------------------------------
# Checked here against the public documentation and Sketchfab's own clients only. Verify once
# against api.sketchfab.com; everything the slicing relies on is in this block.
SLICE_ENDPOINT = "/v3/search"
"""Where slices (listings with extra filters) are paged. Sketchfab's own plugins page
`/v3/search?type=models` with `min_face_count`/`max_face_count`; whether `/v3/models` accepts those
filters is not confirmed. `/v3/models` also works against a server that does (the bundled one)."""
ENDPOINT_PARAMS = {"/v3/search": {"type": "models"}, "/v3/models": {}}
"""Fixed query parameters of each listing endpoint."""
FACE_COUNT_FILTERS = ("min_face_count", "max_face_count")
"""Inclusive bounds on `faceCount`: the one filter that splits every model into ranges."""
FACET_FILTERS = ("downloadable", "animated")
"""Boolean filters that split a single face count further (true + false cover every model)."""
LISTING_CAP_SLACK = MAX_PAGE_SIZE
"""The cap is 'about' 10,000: a listing that ends within one page of the cap counts as capped."""
# -------------------------------------------------------------------------------------------------


class SketchfabAPIError(RuntimeError):
    """The API answered, but not with something we can use. The message says what and where."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InvalidBody(SketchfabAPIError):
    """A 200 whose body is not JSON (typically a proxy's HTML page): worth another try."""


@dataclass(frozen=True)
class Page:
    url: str
    results: list[Any]
    next_url: str | None


class SketchfabClient:
    """Reads model listings. The token is sent as a header only, never logged or stored."""

    slice_endpoint: str = SLICE_ENDPOINT

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout_s: float = default_value("http_timeout_s"),
        session: requests.Session | None = None,
        pace_below: int = default_value("api_pace_below"),
        max_pace_sleep_s: float = default_value("api_max_pace_sleep_s"),
        body_retries: int = default_value("api_body_retries"),
        backoff_s: float = default_value("api_backoff_s"),
    ) -> None:
        """Defaults are the Settings fields' (`from_settings` passes a deployment's values)."""
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"API base URL must be http(s)://host[:port], got {base_url!r}")
        self._origin = (parts.scheme, parts.netloc.lower())
        self.timeout_s = timeout_s
        self.session = session or build_session(
            retries=default_value("api_retries"),
            backoff_factor=backoff_s,
            retry_after_cap=default_value("api_retry_after_cap_s"),
        )
        self.session.headers["Accept"] = "application/json"
        if token:
            self.session.headers["Authorization"] = f"Token {token}"
        self.pace_below = pace_below
        self.max_pace_sleep_s = max_pace_sleep_s
        self.body_retries = body_retries
        self.backoff_s = backoff_s
        self.requests_made = 0
        self.paced_s = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SketchfabClient:
        session = build_session(
            retries=settings.api_retries,
            backoff_factor=settings.api_backoff_s,
            retry_after_cap=settings.api_retry_after_cap_s,
            pool_size=2,
        )
        return cls(
            settings.api_base_url,
            settings.api_token,
            timeout_s=settings.http_timeout_s,
            session=session,
            pace_below=settings.api_pace_below,
            max_pace_sleep_s=settings.api_max_pace_sleep_s,
            body_retries=settings.api_body_retries,
            backoff_s=settings.api_backoff_s,
        )

    def models_url(self, *, sort_by: str = "-publishedAt", count: int = MAX_PAGE_SIZE, **filters: Any) -> str:
        params: dict[str, Any] = {"sort_by": sort_by, "count": min(max(count, 1), MAX_PAGE_SIZE)}
        params.update({k: v for k, v in filters.items() if v not in (None, "", [])})
        return f"{self.base_url}/v3/models?{urlencode(params)}"

    def listing_url(
        self,
        filters: dict[str, Any],
        *,
        endpoint: str | None = None,
        sort_by: str = "-publishedAt",
        count: int = MAX_PAGE_SIZE,
    ) -> str:
        """First page of a slice: `filters` plus the endpoint's own fixed parameters."""
        endpoint = endpoint or self.slice_endpoint
        params: dict[str, Any] = {
            **ENDPOINT_PARAMS[endpoint], "sort_by": sort_by, "count": min(max(count, 1), MAX_PAGE_SIZE)
        }  # fmt: skip
        for name, value in filters.items():
            if value is None:
                continue
            params[name] = ("true" if value else "false") if isinstance(value, bool) else value
        return f"{self.base_url}{endpoint}?{urlencode(params)}"

    def get_model(self, uid: str) -> Any | None:
        """`GET /v3/models/{uid}`: the model's JSON, or None when the API answers 404 (gone)."""
        return self.get_json(f"{self.base_url}/v3/models/{uid}", allow_404=True)

    def get_page(self, url: str) -> Page:
        """One listing page; `url` must be on the configured origin, the body a listing envelope."""
        self.check_same_origin(url)
        body = self.get_json(url)
        if not isinstance(body, dict) or not isinstance(body.get("results"), list):
            keys = sorted(body)[:10] if isinstance(body, dict) else type(body).__name__
            raise SketchfabAPIError(
                f"{self.redact(url)}: expected a listing envelope with a 'results' list, got {keys}"
            )
        next_url = body.get("next")
        if next_url is not None and not isinstance(next_url, str):
            raise SketchfabAPIError(f"{self.redact(url)}: 'next' is not a URL: {str(next_url)[:80]!r}")
        return Page(url=url, results=body["results"], next_url=next_url or None)

    def check_same_origin(self, url: str) -> None:
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc.lower()) != self._origin:
            raise SketchfabAPIError(
                f"Refusing to follow {self.redact(url)}: not on the configured API origin "
                f"{self._origin[0]}://{self._origin[1]}"
            )

    def get_json(self, url: str, *, allow_404: bool = False) -> Any:
        """GET and decode JSON. A 200 that is not JSON is retried `body_retries` times, then an error."""
        attempt = 0
        while True:
            status, ctype, body = self._get(url)
            if allow_404 and status == 404:
                return None
            self._check_status(url, status, body)
            try:
                return self._decode(url, ctype, body)
            except InvalidBody as exc:
                if attempt >= self.body_retries:
                    raise SketchfabAPIError(f"{exc} (still so after {attempt + 1} attempts)", 200) from None
                attempt += 1
                delay = backoff_delay(attempt - 1, self.backoff_s)
                log.warning("%s; retrying in %.1fs", exc, delay)
                time.sleep(delay)

    def _get(self, url: str) -> tuple[int, str, bytes]:
        """One GET (urllib3 retries included), body read under a byte cap."""
        try:
            resp = self.session.get(url, timeout=self.timeout_s, allow_redirects=False, stream=True)
        except requests.RequestException as exc:
            raise SketchfabAPIError(
                f"GET {self.redact(url)} failed after retries: {type(exc).__name__}: {short_error(exc)}"
            ) from None
        with resp:
            self.requests_made += 1
            chunks, size = [], 0
            try:
                for chunk in resp.iter_content(256 * 1024):
                    size += len(chunk)
                    if size > MAX_PAGE_BYTES:
                        raise SketchfabAPIError(
                            f"GET {self.redact(url)}: response larger than {MAX_PAGE_BYTES} bytes"
                        )
                    chunks.append(chunk)
            except requests.RequestException as exc:
                raise SketchfabAPIError(
                    f"GET {self.redact(url)}: connection lost while reading: {type(exc).__name__}"
                ) from None
            self._pace(resp)
            return resp.status_code, resp.headers.get("Content-Type", ""), b"".join(chunks)

    def _check_status(self, url: str, status: int, body: bytes) -> None:
        where = f"GET {self.redact(url)}"
        if status == 200:
            return
        if status in (401, 403):
            raise SketchfabAPIError(
                f"{where}: HTTP {status}; check the sketchfab_api connection's token", status
            )
        if 300 <= status < 400:
            raise SketchfabAPIError(
                f"{where}: HTTP {status} redirect, which the crawler does not follow; "
                f"check the sketchfab_api connection's base URL",
                status,
            )
        hint = " after retries (a retry of the task resumes from the checkpoint)" if status >= 429 else ""
        snippet = body[:200].decode("utf-8", "replace")
        raise SketchfabAPIError(f"{where}: HTTP {status}{hint}: {snippet!r}", status)

    def _decode(self, url: str, ctype: str, body: bytes) -> Any:
        if "json" not in ctype.lower():
            snippet = body[:120].decode("utf-8", "replace")
            raise InvalidBody(
                f"GET {self.redact(url)}: expected JSON, got {ctype or 'no content type'} "
                f"(a proxy error page?): {snippet!r}",
                200,
            )
        try:
            return json.loads(body)
        except ValueError as exc:
            raise InvalidBody(f"GET {self.redact(url)}: invalid JSON: {exc}", 200) from None

    def _pace(self, resp: requests.Response) -> None:
        """Spread the requests left in the rate-limit window over the time until it resets."""
        remaining = resp.headers.get("X-RateLimit-Remaining")
        reset = resp.headers.get("X-RateLimit-Reset")
        if remaining is None or reset is None:
            return
        try:
            remaining_n, reset_s = int(remaining), float(reset)
        except ValueError:
            return
        if remaining_n >= self.pace_below:
            return
        # Reset may be an epoch timestamp or seconds from now; both are seen in the wild. It is given
        # in whole seconds, so aim a little past it.
        until_reset = (reset_s - time.time() if reset_s > 1e9 else reset_s) + RESET_MARGIN_S
        wait = max(0.0, min(until_reset / (remaining_n + 1), self.max_pace_sleep_s))
        if wait:
            log.info("Rate limit: %d requests left in the window; pausing %.1fs", remaining_n, wait)
            self.paced_s += wait
            time.sleep(wait)

    redact = staticmethod(redact)
