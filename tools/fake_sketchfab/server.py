"""A local Sketchfab-compatible HTTP server over a Catalog (stdlib only).

The API answers on ``http://127.0.0.1:PORT`` and thumbnails are linked through
``http://localhost:PORT`` so that the media host differs from the API host, as
``api.sketchfab.com`` and ``media.sketchfab.com`` do; an allow-list of thumbnail
hosts can then be tested for real.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from PIL import Image

from .catalog import Catalog, FaultConfig, Model, ThumbnailFault
from .render import encode_jpeg, render_thumbnail

__all__ = ["RunningServer", "Stats", "start_server"]

PAGE_SIZE = 24
LISTING_CAP = 10_000  # per query (filters + sort), like the real listings: nothing past this offset
LISTING_CACHE = 256  # filtered listings kept per server (one per query being paged)
OFFSITE_API = "http://evil.example.invalid"
UNLIMITED_RATE = 10_000  # advertised in X-RateLimit-Limit when no limit is enforced
THUMB_CACHE_BYTES = 64 * 1024 * 1024

_SORT_KEYS = {
    "publishedAt": lambda m: m.published_at,
    "createdAt": lambda m: m.created_at,
    "likeCount": lambda m: m.like_count,
    "viewCount": lambda m: m.view_count,
}
_DETAIL_RE = re.compile(r"/v3/models/(?P<uid>[^/]+)/?")
_THUMB_RE = re.compile(r"/media/models/(?P<uid>[^/]+)/thumbnails/(?P<w>\d+)x(?P<h>\d+)\.jpeg")
_PROXY_PAGE = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>"
    b"<h1>Bad Gateway</h1><p>The proxy server received an invalid response from an upstream server.</p>"
    b"<hr><address>nginx</address></body></html>"
)
_CDN_ERROR_PAGE = b"<!DOCTYPE html><html><body><h1>Oops</h1><p>Something went wrong.</p></body></html>"


def _bomb_jpeg() -> bytes:
    """A ~600-byte JPEG whose SOF header declares 40000x22500 pixels: PIL refuses it as a bomb."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 9), (200, 60, 60)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline SOF0: marker, length(2), precision(1), height(2), width(2)
    data[sof + 5 : sof + 9] = (22500).to_bytes(2, "big") + (40000).to_bytes(2, "big")
    return bytes(data)


_BOMB = _bomb_jpeg()


class Stats:
    """Thread-safe request counters, so tests can assert what a client actually did."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()
        self.with_token = 0
        self.without_token = 0

    def record(self, route: str, status: int) -> None:
        with self._lock:
            self._counts[route, status] += 1

    def record_token(self, present: bool) -> None:
        with self._lock:
            if present:
                self.with_token += 1
            else:
                self.without_token += 1

    def count(self, route: str | None = None, status: int | None = None) -> int:
        """Requests matching ``route`` ("list", "detail", "thumbnail", "other") and/or ``status``."""
        with self._lock:
            return sum(
                n
                for (r, s), n in self._counts.items()
                if (route is None or r == route) and (status is None or s == status)
            )

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f"{r} {s}": n for (r, s), n in sorted(self._counts.items())}


class _ByteLRU:
    """Encoded thumbnails by (uid, w, h), capped by total bytes."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._size = 0
        self._items: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple[str, int, int], value: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._size += len(value)
            while self._size > self._cap and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)


def _encode_cursor(offset: int, page: int) -> str:
    return base64.urlsafe_b64encode(
        json.dumps({"o": offset, "p": page}, separators=(",", ":")).encode()
    ).decode()


def _decode_cursor(cursor: str) -> tuple[int, int]:
    data = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    offset, page = int(data["o"]), int(data["p"])
    if offset < 0 or page < 1:
        raise ValueError(cursor)
    return offset, page


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise ValueError(value)


class _State:
    """Everything the request handlers share; ``lock`` guards the catalog and fault counters."""

    def __init__(
        self, catalog: Catalog, faults: FaultConfig, token: str | None, verbose: bool, listing_cap: int
    ) -> None:
        self.catalog = catalog
        self.listing_cap = listing_cap
        self._listings: OrderedDict[tuple[Any, ...], list[Model]] = OrderedDict()
        self.token = token
        self.verbose = verbose
        self.lock = threading.Lock()
        self.stats = Stats()
        self.thumbs = _ByteLRU(THUMB_CACHE_BYTES)
        self.api_base_url = ""
        self.media_base_url = ""
        self.port = 0
        self._sorted: dict[str, tuple[int, list[Model]]] = {}
        self.set_faults(faults)

    def set_faults(self, faults: FaultConfig) -> None:
        with self.lock:
            self.faults = faults
            self.gate_count = 0  # API requests that reached the burst check outside a burst
            self.burst_left = 0
            self.error_count = 0
            self.list_count = 0
            self.media_count = 0
            self.shift_armed = faults.shift_on_page > 0
            self.window_start = time.monotonic()
            self.window_count = 0

    def sorted_listing(self, sort_by: str) -> list[Model]:
        """The listing in ``sort_by`` order, cached until the catalog changes. Caller holds ``lock``."""
        version = self.catalog.version
        cached = self._sorted.get(sort_by)
        if cached is None or cached[0] != version:
            key = _SORT_KEYS[sort_by.lstrip("-")]
            entries = sorted(
                self.catalog.listing(), key=lambda m: (key(m), m.uid), reverse=sort_by.startswith("-")
            )
            cached = self._sorted[sort_by] = (version, entries)
        return cached[1]

    def filtered_listing(self, sort_by: str, filters: tuple[tuple[str, str], ...]) -> list[Model]:
        """One query's matches (before the cap), cached per catalog version: a crawl pages each
        query many times, and a scan of 200,000 models per page would dominate. Caller holds ``lock``."""
        key = (self.catalog.version, sort_by, filters)
        entries = self._listings.get(key)
        if entries is None:
            match = _filter(dict(filters))
            entries = [m for m in self.sorted_listing(sort_by) if match(m)]
            self._listings[key] = entries
            while len(self._listings) > LISTING_CACHE:
                self._listings.popitem(last=False)
        else:
            self._listings.move_to_end(key)
        return entries


class _Response:
    def __init__(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> _Response:
    body = json.dumps(payload, ensure_ascii=False).encode()
    return _Response(status, body, "application/json", headers)


_NOT_FOUND = {"detail": "Not found."}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real clients use
    disable_nagle_algorithm = True
    timeout = 30  # idle keep-alive connections give their thread back
    state: _State  # set on the per-server subclass

    def log_message(self, format: str, *args: Any) -> None:
        if self.state.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        st = self.state
        if st.faults.latency_ms > 0:
            time.sleep(st.faults.latency_ms / 1000)
        url = urlsplit(self.path)
        if url.path in ("/v3/models", "/v3/models/", "/v3/search", "/v3/search/"):
            route, response = "list", self._api(lambda: self._list(url.query, url.path))
        elif match := _DETAIL_RE.fullmatch(url.path):
            route, response = "detail", self._api(lambda: self._detail(match["uid"]))
        elif match := _THUMB_RE.fullmatch(url.path):
            route = "thumbnail"
            response = self._media_gate(url.query) or self._thumbnail(
                match["uid"], int(match["w"]), int(match["h"])
            )
        else:
            route, response = "other", _json(404, _NOT_FOUND)
        st.stats.record(route, response.status)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)

    def _api(self, handle: Callable[[], _Response]) -> _Response:
        """Auth, rate limits and injected errors in front of every API route."""
        st = self.state
        auth = self.headers.get("Authorization")
        st.stats.record_token(auth is not None)
        if auth is not None and st.token is not None and auth != f"Token {st.token}":
            return _json(401, {"detail": "Invalid token."})
        with st.lock:
            faults = st.faults
            now = time.monotonic()
            if now - st.window_start >= faults.rate_limit_window_s:
                st.window_start, st.window_count = now, 0
            st.window_count += 1
            limit = faults.rate_limit_per_minute or UNLIMITED_RATE
            window_left = st.window_start + faults.rate_limit_window_s - now
            reset_in = max(1, math.ceil(window_left))
            headers = {
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": str(max(limit - st.window_count, 0)),
                # Epoch seconds, rounded up: a client sleeping until then finds the window reset.
                "X-RateLimit-Reset": str(math.ceil(time.time() + window_left)),
            }
            throttled = {"detail": "Request was throttled."}
            if faults.rate_limit_per_minute and st.window_count > faults.rate_limit_per_minute:
                return _json(429, throttled, {**headers, "Retry-After": str(reset_in)})
            if st.burst_left > 0:
                st.burst_left -= 1
                return _json(429, throttled, {**headers, "Retry-After": str(faults.retry_after_s)})
            st.gate_count += 1
            if faults.rate_limit_every and st.gate_count % faults.rate_limit_every == 0:
                st.burst_left = faults.rate_limit_burst - 1
                return _json(429, throttled, {**headers, "Retry-After": str(faults.retry_after_s)})
            st.error_count += 1
            rate = faults.server_error_rate
            if rate > 0 and math.floor(st.error_count * rate) > math.floor((st.error_count - 1) * rate):
                status = (500, 502, 503)[math.floor(st.error_count * rate) % 3]
                if status == 502:
                    return _Response(502, _PROXY_PAGE, "text/html; charset=utf-8", headers)
                return _json(status, {"detail": "A server error occurred."}, headers)
        response = handle()
        response.headers.update(headers)
        return response

    def _list(self, query: str, path: str) -> _Response:
        """`/v3/models` (opaque cursors) or `/v3/search?type=models` (numeric offsets), same envelope."""
        st = self.state
        search = path.startswith("/v3/search")
        params = parse_qsl(query, keep_blank_values=True)
        args = dict(params)
        sort_by = args.get("sort_by", "-publishedAt")
        if sort_by.lstrip("-") not in _SORT_KEYS:
            return _json(400, {"detail": f"Invalid sort_by: {sort_by!r}."})
        if search and args.get("type") != "models":
            return _json(400, {"detail": "type must be models."})
        refused = sorted(k for k in args if k in st.faults.refused_filters and not search)
        if refused:
            return _json(400, {"detail": f"Unknown filter(s) for this endpoint: {', '.join(refused)}."})
        filters = tuple(sorted((k, v) for k, v in args.items() if k in _FILTERS))
        try:
            count = min(max(int(args.get("count", PAGE_SIZE)), 1), PAGE_SIZE)
            if search:
                offset = int(args.get("cursor") or 0)
                page = offset // count + 1
            else:
                offset, page = _decode_cursor(args["cursor"]) if args.get("cursor") else (0, 1)
            if offset < 0:
                raise ValueError(offset)
            _filter(args)
        except (ValueError, KeyError, TypeError, binascii.Error, json.JSONDecodeError):
            return _json(400, {"detail": "Invalid query parameters."})
        with st.lock:
            st.list_count += 1
            faults = st.faults
            if faults.list_outage_after and st.list_count > faults.list_outage_after:
                return _json(503, {"detail": "Service temporarily unavailable."})
            if faults.html_200_every and st.list_count % faults.html_200_every == 0:
                return _Response(200, _PROXY_PAGE, "text/html; charset=utf-8")
            entries = st.filtered_listing(sort_by, filters)[: st.listing_cap]
            results = [
                Catalog.model_json(m, st.api_base_url, st.media_base_url) for m in entries[offset:][:count]
            ]
            if page == faults.shift_on_page and st.shift_armed:
                st.shift_armed = False
                st.catalog.publish(faults.shift_publish)

        def page_url(cursor: str, host: str = st.api_base_url) -> str:
            kept = [(k, v) for k, v in params if k != "cursor"] + [("cursor", cursor)]
            return f"{host}{path}?{urlencode(kept)}"

        def cursor_at(at: int, at_page: int) -> str:
            return str(at) if search else _encode_cursor(at, at_page)

        next_cursor = cursor_at(offset + count, page + 1) if offset + count < len(entries) else None
        prev_cursor = cursor_at(max(offset - count, 0), page - 1) if offset > 0 and page > 1 else None
        next_host = OFFSITE_API if page == faults.offsite_next_on_page else st.api_base_url
        return _json(
            200,
            {
                "cursors": {"next": next_cursor, "previous": prev_cursor},
                "next": page_url(next_cursor, next_host) if next_cursor else None,
                "previous": page_url(prev_cursor) if prev_cursor else None,
                "results": results,
            },
        )

    def _detail(self, uid: str) -> _Response:
        st = self.state
        with st.lock:
            model = st.catalog.by_uid.get(uid)
            if (
                model is None
                or not st.catalog.is_live(uid)
                or model.disappears
                or uid in st.faults.disappearing_uids
            ):
                return _json(404, _NOT_FOUND)
        return _json(200, Catalog.model_json(model, st.api_base_url, st.media_base_url))

    def _media_gate(self, query: str) -> _Response | None:
        """Media-host faults that do not depend on the model: transient errors and redirects."""
        st = self.state
        with st.lock:
            faults = st.faults
            st.media_count += 1
            rate = faults.media_error_rate
            if rate > 0 and math.floor(st.media_count * rate) > math.floor((st.media_count - 1) * rate):
                status = (503, 500)[math.floor(st.media_count * rate) % 2]
                return _Response(status, b"upstream unavailable", "text/plain")
        redirected = any(key == "redirected" for key, _ in parse_qsl(query, keep_blank_values=True))
        if faults.thumbnail_redirect and not redirected:
            location = faults.thumbnail_redirect.format(port=st.port, path=self.path)
            return _Response(302, b"", "text/plain", {"Location": location})
        return None

    def _thumbnail(self, uid: str, width: int, height: int) -> _Response:
        st = self.state
        with st.lock:
            model = st.catalog.by_uid.get(uid) if st.catalog.is_live(uid) else None
        if model is None or not any((t.width, t.height) == (width, height) for t in model.thumbnails):
            return _Response(404, b"Not Found", "text/plain")
        if uid in st.faults.thumbnail_bodies:
            content_type, body = st.faults.thumbnail_bodies[uid]
            return _Response(200, body, content_type)
        fault = model.thumbnail_fault
        if fault in (ThumbnailFault.NO_THUMBNAILS, ThumbnailFault.NOT_FOUND):
            return _Response(404, b"Not Found", "text/plain")
        if fault is ThumbnailFault.HTML_200:
            return _Response(200, _CDN_ERROR_PAGE, "text/html; charset=utf-8")
        if fault is ThumbnailFault.ZERO_BYTES:
            return _Response(200, b"", "image/jpeg")
        if fault is ThumbnailFault.HUGE_DIMENSIONS:
            return _Response(200, _BOMB, "image/jpeg")
        if fault is ThumbnailFault.WRONG_CONTENT_TYPE:
            return _Response(200, b"this is not an image\n", "text/plain")
        if fault is ThumbnailFault.REDIRECT_OFFSITE:
            location = f"http://127.0.0.2:{st.port}{self.path}"
            return _Response(302, b"", "text/plain", {"Location": location})
        key = (f"{uid}:{model.params_seed}", width, height)
        body = st.thumbs.get(key)
        if body is None:
            body = encode_jpeg(render_thumbnail(model.shape_class, model.params_seed, width, height))
            st.thumbs.put(key, body)
        if fault is ThumbnailFault.TRUNCATED_JPEG:
            body = body[: len(body) // 2]
        return _Response(200, body, "image/jpeg", {"Cache-Control": "public, max-age=31536000"})


def _filter(args: dict[str, str]) -> Callable[[Model], bool]:
    """A predicate for the listing filters in ``args``; raises ValueError on bad values."""
    checks: list[Callable[[Model], bool]] = []
    if category := args.get("categories"):
        checks.append(lambda m: any(slug == category for _, slug in m.categories))
    if tags := [t for t in args.get("tags", "").split(",") if t]:
        checks.append(lambda m: all(t in m.tags for t in tags))
    if q := args.get("q", "").lower():
        checks.append(lambda m: q in m.name.lower())
    if "staffpicked" in args:
        staffpicked = _parse_bool(args["staffpicked"])
        checks.append(lambda m: (m.staffpicked_at is not None) == staffpicked)
    if "downloadable" in args:
        downloadable = _parse_bool(args["downloadable"])
        checks.append(lambda m: m.is_downloadable == downloadable)
    if "animated" in args:
        animated = _parse_bool(args["animated"])
        checks.append(lambda m: (m.animation_count > 0) == animated)
    if license_slug := args.get("license"):
        checks.append(lambda m: m.license[0] == license_slug)
    if user := args.get("user"):
        checks.append(lambda m: m.user.uid == user)
    if "min_face_count" in args:
        low = int(args["min_face_count"])
        checks.append(lambda m: m.face_count >= low)
    if "max_face_count" in args:
        high = int(args["max_face_count"])
        checks.append(lambda m: m.face_count <= high)
    return lambda m: all(check(m) for check in checks)


# Query parameters that select models (everything else is paging, sorting or the endpoint's `type`).
_FILTERS = frozenset(
    {"categories", "tags", "q", "staffpicked", "downloadable", "animated", "license", "user",
     "min_face_count", "max_face_count"}
)  # fmt: skip


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-response are normal for a crawler under test; stay quiet."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class RunningServer:
    """A started server; also a context manager that closes it."""

    def __init__(self, httpd: _HTTPServer, state: _State, thread: threading.Thread, media_host: str) -> None:
        self._httpd = httpd
        self._state = state
        self._thread = thread
        self.media_host = media_host

    @property
    def port(self) -> int:
        return self._state.port

    @property
    def api_base_url(self) -> str:
        return self._state.api_base_url

    @property
    def media_base_url(self) -> str:
        return self._state.media_base_url

    @property
    def catalog(self) -> Catalog:
        return self._state.catalog

    @property
    def stats(self) -> Stats:
        return self._state.stats

    @property
    def faults(self) -> FaultConfig:
        return self._state.faults

    def set_faults(self, faults: FaultConfig) -> None:
        """Swap the per-request faults live; counters restart and ``shift_on_page`` re-arms."""
        self._state.set_faults(faults)

    def publish(self, n: int) -> list[Model]:
        """Publish ``n`` new models at the head of the catalog (newest first in the result)."""
        with self._state.lock:
            return self.catalog.publish(n)

    def remove(self, uid: str) -> None:
        """Make ``uid`` disappear: 404 on detail and thumbnails, absent from listings."""
        with self._state.lock:
            self.catalog.remove(uid)

    def change_thumbnail(self, uid: str) -> None:
        """Replace ``uid``'s thumbnail: new URLs in the API, a different picture behind them."""
        with self._state.lock:
            self.catalog.change_thumbnail(uid)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def start_server(
    catalog: Catalog,
    host: str = "127.0.0.1",
    port: int = 0,
    faults: FaultConfig | None = None,
    *,
    token: str | None = None,
    media_host: str = "localhost",
    verbose: bool = False,
    listing_cap: int = LISTING_CAP,
) -> RunningServer:
    """Serve ``catalog`` from a daemon thread; ``port=0`` picks a free port.

    ``faults`` defaults to the config the catalog was generated with. With ``token``
    set, a request carrying a different ``Authorization`` header gets 401;
    requests without one stay anonymous. ``listing_cap`` is how many results one query
    (filters + sort) yields at most, as on the real API.
    """
    state = _State(catalog, faults or catalog.faults, token, verbose, listing_cap)
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = _HTTPServer((host, port), handler)
    state.port = httpd.server_address[1]
    api_host = "127.0.0.1" if host in ("", "0.0.0.0") else host
    state.api_base_url = f"http://{api_host}:{state.port}"
    state.media_base_url = f"http://{media_host}:{state.port}"
    thread = threading.Thread(target=httpd.serve_forever, name=f"fake-sketchfab-{state.port}", daemon=True)
    thread.start()
    return RunningServer(httpd, state, thread, media_host)
