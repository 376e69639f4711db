"""Stage 2, download_thumbnails: choose, fetch, validate and store one thumbnail per model.

Only hosts on the allow-list are contacted, over http(s), and every redirect hop
is checked again (the API decides what URLs we see, so this is an SSRF boundary).
What a host resolves to is checked too: a host whose DNS answer is a private,
loopback or link-local address is refused unless it is listed in
`thumbnail_private_hosts`, which defeats DNS tricks that the name check cannot see.

Fetching runs on an asyncio event loop (aiohttp: pooled keep-alive connections,
bounded concurrency, timeouts); decoding and storing run on a few worker threads.
Every outcome is recorded in `model_thumbnails`: `ok` with the content hash and
stored key, or `failed` with a reason "[transient|permanent] <kind>: <detail>".
Transient failures are retried within the run and on later runs, up to
`max_download_attempts`. Files are stored content-addressed, so identical images
are stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import queue
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import fsspec
from aiohttp.resolver import ThreadedResolver
from fsspec.implementations.local import LocalFileSystem
from psycopg2.extras import execute_values

from .db import connect
from .images import ImageRejected, open_checked, to_rgb
from .progress import Progress
from .settings import Settings
from .sharding import WHOLE, Shard
from .sketchfab import RETRY_STATUSES

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ACCEPT = "image/jpeg, image/png, image/webp;q=0.9"
VALIDATE_THREADS = min(4, os.cpu_count() or 1)
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


class PrivateAddressRefused(OSError):
    """A DNS answer we refuse; an OSError because that is what aiohttp expects from a resolver."""


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
    """Content-addressed files under a local path or any fsspec URL (file://, s3://, memory://, ...).

    Keys are `<first two hex digits>/<sha256>.<ext>` (git's object layout): at most 256
    directories, so a local store creates each directory once and never again.
    """

    EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

    def __init__(self, root: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.root = self.root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)
        self._made_dirs: set[str] = set()

    @classmethod
    def key_for(cls, content_hash: str, image_format: str = "JPEG") -> str:
        return f"{content_hash[:2]}/{content_hash}.{cls.EXTENSIONS.get(image_format, 'img')}"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes) -> bool:
        """Write once; returns False when the content was already stored. Atomic via rename."""
        path = self.path(key)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        parent = path.rsplit("/", 1)[0]
        if self._local:  # plain system calls: fsspec's layers cost more than the write itself
            if os.path.exists(path):
                return False
            if parent not in self._made_dirs:
                os.makedirs(parent, exist_ok=True)
                self._made_dirs.add(parent)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return True
        if self.fs.exists(path):
            return False
        self.fs.makedirs(parent, exist_ok=True)
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


class GuardedResolver(ThreadedResolver):
    """DNS answers for hosts outside `private_hosts` must all be public addresses.

    aiohttp connects only to the addresses its resolver returns, so the check
    cannot be undone by a second, different DNS answer (DNS rebinding).
    """

    def __init__(self, private_hosts: Iterable[str]) -> None:
        super().__init__()
        self.private_hosts = frozenset(h.lower() for h in private_hosts)

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        answers = await super().resolve(host, port, family)
        if host.lower() not in self.private_hosts:
            for answer in answers:
                if not is_public_address(answer["host"]):
                    raise PrivateAddressRefused(f"{host!r} resolved to non-public address {answer['host']}")
        return answers


def check_allowed(url: str, allowed_hosts: tuple[str, ...], private_hosts: tuple[str, ...] = ()) -> None:
    """Only http(s), only allow-listed hosts (exact names), no credentials, no private IP literals."""
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
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return  # a name: the resolver checks what it resolves to
    if host not in private_hosts and not is_public_address(str(literal)):
        raise FetchFailed("private address", f"{host} is not a public address", transient=False)


def retry_delay(attempt: int, retry_after: str | None, backoff_s: float, cap_s: float) -> float:
    """Retry-After (seconds or an HTTP date) when given, else exponential backoff with jitter; capped."""
    if retry_after:
        if retry_after.strip().isdigit():
            return min(float(retry_after), cap_s)
        with contextlib.suppress(TypeError, ValueError):
            when = parsedate_to_datetime(retry_after).timestamp()
            return max(0.0, min(when - time.time(), cap_s))
    return min(backoff_s * 2**attempt + random.uniform(0, backoff_s), cap_s)


@dataclass(frozen=True)
class _Redirect:
    location: str


async def fetch_bytes(session: aiohttp.ClientSession, url: str, settings: Settings) -> bytes:
    """GET under a whole-download deadline, following redirects by hand so every hop is checked again."""
    try:
        async with asyncio.timeout(settings.download_deadline_s):
            for hop in range(MAX_REDIRECTS + 1):
                try:
                    check_allowed(url, settings.thumbnail_hosts, settings.thumbnail_private_hosts)
                except FetchFailed as exc:
                    if hop:
                        raise FetchFailed(
                            "redirect refused", f"{exc} ({_redact(url)})", transient=False
                        ) from None
                    raise
                answer = await _get_with_retries(session, url, settings)
                if isinstance(answer, bytes):
                    return answer
                url = urljoin(url, answer.location)
    except TimeoutError:
        raise FetchFailed("too slow", f"over {settings.download_deadline_s:g}s", transient=True) from None
    raise FetchFailed("too many redirects", f"more than {MAX_REDIRECTS}", transient=False)


async def _get_with_retries(
    session: aiohttp.ClientSession, url: str, settings: Settings
) -> bytes | _Redirect:
    """One hop: retries connection errors, 429 and 5xx (capped Retry-After, jittered backoff)."""
    attempt = 0
    while True:
        retry_after = None
        try:
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status in REDIRECT_STATUSES:
                    return _Redirect(resp.headers.get("Location", ""))
                if resp.status in RETRY_STATUSES:
                    failure = FetchFailed(f"HTTP {resp.status}", f"after {attempt} retries", transient=True)
                    retry_after = resp.headers.get("Retry-After")
                elif resp.status != 200:
                    raise FetchFailed(f"HTTP {resp.status}", resp.reason or "", transient=False)
                else:
                    return await _read_body(resp, settings.max_image_bytes)
        except aiohttp.ClientConnectorDNSError as exc:
            if isinstance(exc.os_error, PrivateAddressRefused):
                raise FetchFailed("private address", str(exc.os_error), transient=False) from None
            failure = FetchFailed("connection failed", f"DNS: {exc.os_error}", transient=True)
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = FetchFailed("connection failed", type(exc).__name__, transient=True)
        if attempt >= settings.download_retries:
            raise failure
        delay = retry_delay(
            attempt, retry_after, settings.download_backoff_s, settings.download_retry_after_cap_s
        )
        attempt += 1
        await asyncio.sleep(delay)


async def _read_body(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The body, refusing non-images and anything over the byte cap (declared or streamed)."""
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not ctype.startswith("image/"):
        raise FetchFailed("not an image", f"content type {ctype or 'missing'!r}", transient=False)
    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchFailed("too large", f"{declared} bytes, over the {max_bytes} cap", transient=False)
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > max_bytes:
            raise FetchFailed("too large", f"over the {max_bytes} byte cap", transient=False)
        chunks.append(chunk)
    return b"".join(chunks)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"[:200]


def validate_and_store(
    task: DownloadTask, data: bytes, store: ThumbnailStore, settings: Settings
) -> tuple[DownloadResult, bool]:
    """Decode fully, normalise, hash and store. CPU and disk work: runs on a worker thread."""
    try:
        try:
            decoded = open_checked(data, settings.max_image_pixels)
            img = to_rgb(decoded)
        except ImageRejected as exc:
            kind, _, detail = str(exc).partition(": ")
            raise FetchFailed(kind, detail, transient=False) from None
        content_hash = hashlib.sha256(data).hexdigest()
        key = ThumbnailStore.key_for(content_hash, decoded.format or "")
        try:
            stored_new = store.put(key, data)
        except Exception as exc:  # the store itself failed (disk full, S3 down): worth retrying later
            raise FetchFailed("store write failed", f"{type(exc).__name__}: {exc}", transient=True) from None
    except FetchFailed as exc:
        return _failed(task, exc), False
    except Exception as exc:  # a bug or an unforeseen library error must not fail the batch
        log.exception("Unexpected error validating %s", task.uid)
        return _failed(task, FetchFailed("unexpected error", f"{type(exc).__name__}: {exc}", True)), False
    width, height = img.size
    return DownloadResult(task.uid, task.url, "ok", content_hash, key, width, height), stored_new


async def download_one(
    task: DownloadTask,
    session: aiohttp.ClientSession,
    workers: ThreadPoolExecutor,
    store: ThumbnailStore,
    settings: Settings,
) -> tuple[DownloadResult, bool]:
    """Fetch, then validate and store on a worker thread. Never raises: a bad image is a result."""
    if task.url is None:
        return _failed(task, FetchFailed("no thumbnail", "the model lists no images", transient=False)), False
    try:
        data = await fetch_bytes(session, task.url, settings)
    except FetchFailed as exc:
        return _failed(task, exc), False
    except Exception as exc:
        log.exception("Unexpected error downloading %s", task.uid)
        return _failed(task, FetchFailed("unexpected error", f"{type(exc).__name__}: {exc}", True)), False
    return await asyncio.get_running_loop().run_in_executor(
        workers, validate_and_store, task, data, store, settings
    )


def _failed(task: DownloadTask, exc: FetchFailed) -> DownloadResult:
    return DownloadResult(task.uid, task.url, "failed", error=exc.recorded[:1000])


async def _download_all(
    tasks: Iterable[DownloadTask],
    store: ThumbnailStore,
    settings: Settings,
    emit: Callable[[tuple[DownloadResult, bool]], None],
    stop: threading.Event,
) -> None:
    """At most `download_workers` requests in flight over pooled keep-alive connections."""
    connector = aiohttp.TCPConnector(
        limit=settings.download_workers,
        resolver=GuardedResolver(settings.thumbnail_private_hosts),
        ttl_dns_cache=60,
    )
    timeout = aiohttp.ClientTimeout(sock_connect=settings.http_timeout_s, sock_read=settings.http_timeout_s)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers={"Accept": ACCEPT}, trust_env=False
    ) as session:
        with ThreadPoolExecutor(VALIDATE_THREADS, thread_name_prefix="thumbnail-validate") as workers:

            async def one(task: DownloadTask) -> None:
                emit(await download_one(task, session, workers, store, settings))

            in_flight: set[asyncio.Task] = set()
            for task in tasks:
                if stop.is_set():
                    break
                if len(in_flight) >= settings.download_workers:
                    done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    for finished in done:
                        finished.result()
                in_flight.add(asyncio.create_task(one(task)))
            for finished in asyncio.as_completed(in_flight):
                await finished


def iter_downloads(
    tasks: Iterable[DownloadTask], store: ThumbnailStore, settings: Settings
) -> Iterator[tuple[DownloadResult, bool]]:
    """Download on an event loop in a background thread; yield (result, stored_new) as they complete.

    The caller's thread stays free for the database, the loop thread does network I/O, and a
    few worker threads decode and store (Pillow and file I/O release the interpreter lock).
    """
    results: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    finished = object()

    def run() -> None:
        try:
            asyncio.run(_download_all(tasks, store, settings, results.put, stop))
        except BaseException as exc:
            results.put(exc)
        finally:
            results.put(finished)

    thread = threading.Thread(target=run, name="thumbnail-fetch", daemon=True)
    thread.start()
    try:
        while (item := results.get()) is not finished:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer gave up: schedule nothing more, let the requests in flight end
        thread.join(timeout=settings.download_deadline_s + 5)


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
    progress = Progress("download", total=len(plan.tasks), unit="thumbnails", log=log)
    reasons: Counter[str] = Counter()
    batch: list[DownloadResult] = []
    last_write = time.monotonic()
    try:
        for result, stored_new in iter_downloads(plan.tasks, store, settings):
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
    finally:
        record_results(settings.db_url, batch)  # what finished is kept even if the run breaks off
    stats.failures_by_reason = dict(reasons)
    progress.finish(
        f"{stats.fetched} ok ({stats.stored_new} new files), {stats.failed} failed {dict(reasons)}, "
        f"{stats.skipped} skipped {stats.skipped_by_reason}"
    )
    return stats


def reason_kind(error: str) -> str:
    """The part of a reason before its detail ("[transient] HTTP 503"), for counting failures by kind."""
    return error.split(":")[0][:80]
