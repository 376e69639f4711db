"""Stage 2, download_thumbnails: choose, fetch, validate and store one thumbnail per model.

Only hosts on the allow-list are contacted, over http(s), and every redirect hop
is checked again (the API decides what URLs we see, so this is an SSRF boundary).
The connection itself is checked too: a host that resolves to a private,
loopback or link-local address is refused unless it is listed in
`thumbnail_private_hosts`, which defeats DNS tricks that the name check cannot see.

Every outcome is recorded in `model_thumbnails`: `ok` with the content hash and
stored key, or `failed` with a reason "[transient|permanent] <kind>: <detail>".
Transient failures are retried on later runs, up to `max_download_attempts`.
Files are stored content-addressed, so identical images are stored once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import islice
from typing import Any
from urllib.parse import urljoin, urlsplit

import fsspec
import requests
from psycopg2.extras import execute_values
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .db import connect
from .images import ImageRejected, open_checked, to_rgb
from .progress import Progress
from .settings import Settings
from .sharding import WHOLE, Shard
from .sketchfab import make_retry

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
WRITE_BATCH = 200
WRITE_EVERY_S = 5.0
TRANSIENT, PERMANENT = "transient", "permanent"


class FetchFailed(Exception):
    """One thumbnail could not be taken; `kind` and `detail` become the recorded reason."""

    def __init__(self, kind: str, detail: str, transient: bool) -> None:
        super().__init__(f"{kind}: {detail}")
        self.transient = transient

    @property
    def recorded(self) -> str:
        return f"[{TRANSIENT if self.transient else PERMANENT}] {self}"


class PrivateAddressRefused(Exception):
    """Raised from inside the connection; deliberately not an OSError, so urllib3 does not retry it."""


@dataclass(frozen=True)
class DownloadTask:
    uid: str
    url: str | None


@dataclass(frozen=True)
class DownloadResult:
    uid: str
    url: str | None
    status: str
    content_hash: str | None = None
    stored_path: str | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None


@dataclass
class DownloadStats:
    candidates: int = 0
    fetched: int = 0
    failed: int = 0
    skipped: int = 0
    stored_new: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    skipped_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class DownloadPlan:
    tasks: list[DownloadTask] = field(default_factory=list)
    skipped_by_reason: Counter[str] = field(default_factory=Counter)


def choose_thumbnail(images: list[dict[str, Any]], min_side: int) -> str | None:
    """The smallest image with both sides >= min_side; the largest one if none is big enough."""
    if not images:
        return None
    big_enough = [i for i in images if i["width"] >= min_side and i["height"] >= min_side]
    if big_enough:
        return min(big_enough, key=lambda i: (i["width"] * i["height"], i["url"]))["url"]
    return max(images, key=lambda i: (i["width"] * i["height"], i["url"]))["url"]


class ThumbnailStore:
    """Content-addressed files under a local path or any fsspec URL (file://, s3://, memory://, ...)."""

    def __init__(self, root: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.root = self.root.rstrip("/")

    @staticmethod
    def key_for(content_hash: str) -> str:
        return f"{content_hash[:2]}/{content_hash[2:4]}/{content_hash}.jpg"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes) -> bool:
        """Write once; returns False when the content was already stored. Atomic via rename."""
        path = self.path(key)
        if self.fs.exists(path):
            return False
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)
        return True

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))


def is_public_address(address: str) -> bool:
    """Globally routable unicast only: no private, loopback, link-local, CGNAT, reserved or multicast."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def guarded_adapter(private_hosts: Iterable[str], **adapter_kw: Any) -> HTTPAdapter:
    """An HTTPAdapter whose connections check the address they actually connected to.

    The check runs on the connected socket, before a byte is sent, so it also holds
    when DNS answers differently between a check and the connection (DNS rebinding).
    """
    allowed = frozenset(h.lower() for h in private_hosts)

    def check(conn: HTTPConnection, sock: Any) -> Any:
        address = sock.getpeername()[0]
        if conn.host.lower().strip("[]") not in allowed and not is_public_address(address):
            sock.close()
            raise PrivateAddressRefused(f"{conn.host!r} resolved to non-public address {address}")
        return sock

    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> Any:
            return check(self, super()._new_conn())

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> Any:
            return check(self, super()._new_conn())

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}

    return GuardedAdapter(**adapter_kw)


def download_session(settings: Settings) -> requests.Session:
    """Pooled, retrying (connection errors, 429, 5xx; capped Retry-After), guarded against private addresses."""
    retry = make_retry(
        retries=settings.download_retries,
        backoff_s=settings.download_backoff_s,
        retry_after_cap_s=settings.download_retry_after_cap_s,
    )
    adapter = guarded_adapter(
        settings.thumbnail_private_hosts,
        max_retries=retry,
        pool_connections=4,
        pool_maxsize=settings.download_workers,
    )
    session = requests.Session()
    session.headers["Accept"] = "image/jpeg, image/png, image/webp;q=0.9"
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def check_allowed(url: str, allowed_hosts: tuple[str, ...]) -> None:
    """Only http(s), only allow-listed hosts (exact names), no credentials in the URL."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError as exc:
        raise FetchFailed("bad URL", str(exc), transient=False) from None
    if parts.scheme not in ("http", "https"):
        raise FetchFailed("scheme not allowed", f"{parts.scheme!r} is not http(s)", transient=False)
    if parts.username is not None or parts.password is not None:
        raise FetchFailed("bad URL", "URL carries credentials", transient=False)
    if host not in allowed_hosts:
        raise FetchFailed(
            "host not allowed", f"{host!r} is not in similarity_thumbnail_hosts", transient=False
        )


def fetch_bytes(session: requests.Session, url: str, settings: Settings) -> bytes:
    """GET with manual redirects (each hop re-checked), a byte cap, a deadline and a content-type check."""
    deadline = time.monotonic() + settings.download_deadline_s
    for hop in range(MAX_REDIRECTS + 1):
        try:
            check_allowed(url, settings.thumbnail_hosts)
        except FetchFailed as exc:
            if hop:
                raise FetchFailed("redirect refused", f"{exc} ({_redact(url)})", transient=False) from None
            raise
        try:
            resp = session.get(url, stream=True, timeout=settings.http_timeout_s, allow_redirects=False)
        except PrivateAddressRefused as exc:
            raise FetchFailed("private address", str(exc), transient=False) from None
        except (
            requests.exceptions.InvalidURL,
            requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema,
        ) as exc:
            raise FetchFailed("bad URL", type(exc).__name__, transient=False) from None
        except requests.RequestException as exc:
            raise FetchFailed("connection failed", type(exc).__name__, transient=True) from None
        with resp:
            if resp.is_redirect:
                url = urljoin(url, resp.headers.get("Location", ""))
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                raise FetchFailed(
                    f"HTTP {resp.status_code}", f"after {settings.download_retries} retries", transient=True
                )
            if resp.status_code != 200:
                raise FetchFailed(f"HTTP {resp.status_code}", resp.reason or "", transient=False)
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if not ctype.startswith("image/"):
                raise FetchFailed("not an image", f"content type {ctype or 'missing'!r}", transient=False)
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > settings.max_image_bytes:
                raise FetchFailed(
                    "too large", f"{declared} bytes, over the {settings.max_image_bytes} cap", transient=False
                )
            return _read_capped(resp, settings.max_image_bytes, deadline)
    raise FetchFailed("too many redirects", f"more than {MAX_REDIRECTS}", transient=False)


def _read_capped(resp: requests.Response, max_bytes: int, deadline: float) -> bytes:
    chunks, size = [], 0
    try:
        for chunk in resp.iter_content(64 * 1024):
            size += len(chunk)
            if size > max_bytes:
                raise FetchFailed("too large", f"over the {max_bytes} byte cap", transient=False)
            if time.monotonic() > deadline:
                raise FetchFailed("too slow", f"{size} bytes before the deadline", transient=True)
            chunks.append(chunk)
    except requests.RequestException as exc:
        raise FetchFailed("download interrupted", type(exc).__name__, transient=True) from None
    return b"".join(chunks)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"[:200]


def download_one(
    task: DownloadTask, session: requests.Session, store: ThumbnailStore, settings: Settings
) -> tuple[DownloadResult, bool]:
    """Fetch, validate and store one thumbnail. Never raises: a bad image is a result, not an error."""
    if task.url is None:
        return _failed(task, FetchFailed("no thumbnail", "the model lists no images", transient=False)), False
    try:
        data = fetch_bytes(session, task.url, settings)
        try:
            img = to_rgb(open_checked(data, settings.max_image_pixels))
        except ImageRejected as exc:
            kind, _, detail = str(exc).partition(": ")
            raise FetchFailed(kind, detail, transient=False) from None
        content_hash = hashlib.sha256(data).hexdigest()
        key = ThumbnailStore.key_for(content_hash)
        try:
            stored_new = store.put(key, data)
        except Exception as exc:  # the store itself failed (disk full, S3 down): worth retrying later
            raise FetchFailed("store write failed", f"{type(exc).__name__}: {exc}", transient=True) from None
    except FetchFailed as exc:
        return _failed(task, exc), False
    except Exception as exc:  # a bug or an unforeseen library error must not fail the batch
        log.exception("Unexpected error downloading %s", task.uid)
        return _failed(task, FetchFailed("unexpected error", f"{type(exc).__name__}: {exc}", True)), False
    width, height = img.size
    return DownloadResult(task.uid, task.url, "ok", content_hash, key, width, height), stored_new


def _failed(task: DownloadTask, exc: FetchFailed) -> DownloadResult:
    return DownloadResult(task.uid, task.url, "failed", error=exc.recorded[:1000])


def plan_downloads(settings: Settings, shard: Shard = WHOLE, limit: int | None = None) -> DownloadPlan:
    """What to fetch: no row yet, a changed chosen URL, or a transient failure with attempts left."""
    plan = DownloadPlan()
    with connect(settings.db_url, vectors=False) as conn, conn.cursor(name="plan_downloads") as cur:
        cur.itersize = 5000
        cur.execute(
            """
            SELECT m.uid, m.thumbnails, t.source_url, t.status, t.error, t.attempts
            FROM sketchfab_models m LEFT JOIN model_thumbnails t ON t.uid = m.uid
            ORDER BY m.published_at DESC, m.uid
            """
        )
        for uid, images, stored_url, status, error, attempts in cur:
            if not shard.contains(uid):
                continue
            url = choose_thumbnail(images, settings.input_size)
            skip = skip_reason(url, stored_url, status, error, attempts, settings.max_download_attempts)
            if skip:
                plan.skipped_by_reason[skip] += 1
            elif limit is None or len(plan.tasks) < limit:
                plan.tasks.append(DownloadTask(uid, url))
    return plan


def skip_reason(
    url: str | None,
    stored_url: str | None,
    status: str | None,
    error: str | None,
    attempts: int,
    max_attempts: int,
) -> str | None:
    """Why a model needs no download now, or None when it does."""
    if status is None or url != stored_url:
        return None
    if status == "ok":
        return "up to date"
    if not (error or "").startswith(f"[{TRANSIENT}]"):
        return "permanent failure"
    if attempts >= max_attempts:
        return "attempts exhausted"
    return None


def pending_downloads(
    settings: Settings, limit: int | None = None, shard: Shard = WHOLE
) -> list[DownloadTask]:
    return plan_downloads(settings, shard, limit).tasks


UPSERT_THUMBNAILS = """
INSERT INTO model_thumbnails AS t
    (uid, source_url, status, content_hash, stored_path, width, height, error, attempts, fetched_at)
VALUES %s
ON CONFLICT (uid) DO UPDATE SET
    attempts = CASE WHEN t.source_url IS NOT DISTINCT FROM EXCLUDED.source_url AND t.status = 'failed'
                    THEN t.attempts + 1 ELSE 1 END,
    source_url = EXCLUDED.source_url,
    status = EXCLUDED.status,
    content_hash = EXCLUDED.content_hash,
    stored_path = EXCLUDED.stored_path,
    width = EXCLUDED.width,
    height = EXCLUDED.height,
    error = EXCLUDED.error,
    fetched_at = now()
"""


def record_results(db_url: str, results: list[DownloadResult]) -> None:
    if not results:
        return
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        execute_values(
            cur,
            UPSERT_THUMBNAILS,
            [
                (r.uid, r.url, r.status, r.content_hash, r.stored_path, r.width, r.height, r.error, 1)
                for r in results
            ],
            template="(%s, %s, %s, %s, %s, %s, %s, %s, %s, now())",
        )


def bounded_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """Like ThreadPoolExecutor.map, in completion order, with at most 4x `workers` items in flight."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thumbnail") as pool:
        in_flight: set[Future[Any]] = {pool.submit(fn, item) for item in islice(items, 4 * workers)}
        while in_flight:
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                next_item = next(items, None)
                if next_item is not None:
                    in_flight.add(pool.submit(fn, next_item))
                yield future.result()


def download_thumbnails(
    settings: Settings, tasks: list[DownloadTask] | None = None, shard: Shard = WHOLE
) -> DownloadStats:
    """Download every pending thumbnail (of this shard) concurrently; results are written in batches."""
    plan = plan_downloads(settings, shard) if tasks is None else DownloadPlan(tasks=tasks)
    stats = DownloadStats(
        candidates=len(plan.tasks),
        skipped=sum(plan.skipped_by_reason.values()),
        skipped_by_reason=dict(plan.skipped_by_reason),
    )
    store = ThumbnailStore(settings.thumbnail_store)
    session = download_session(settings)
    progress = Progress("download", total=len(plan.tasks), unit="thumbnails", log=log)
    reasons: Counter[str] = Counter()
    batch: list[DownloadResult] = []
    last_write = time.monotonic()
    with session:
        for result, stored_new in bounded_map(
            lambda t: download_one(t, session, store, settings), plan.tasks, settings.download_workers
        ):
            batch.append(result)
            if result.status == "ok":
                stats.fetched += 1
                stats.stored_new += stored_new
            else:
                stats.failed += 1
                reasons[reason_kind(result.error or "")] += 1
            progress.advance()
            if len(batch) >= WRITE_BATCH or time.monotonic() - last_write > WRITE_EVERY_S:
                record_results(settings.db_url, batch)
                batch, last_write = [], time.monotonic()
    record_results(settings.db_url, batch)
    stats.failures_by_reason = dict(reasons)
    progress.finish(
        f"{stats.fetched} ok ({stats.stored_new} new files), {stats.failed} failed {dict(reasons)}, "
        f"{stats.skipped} skipped {stats.skipped_by_reason}"
    )
    return stats


def reason_kind(error: str) -> str:
    """The part of a reason before its detail ("[transient] HTTP 503"), for counting failures by kind."""
    return error.split(":")[0][:80]
