"""Stage 2, download_thumbnails: fetch, validate and store one thumbnail per model (`plan.py`
says which models need one).

Fetching (`fetch.py`) runs on an asyncio event loop (aiohttp: pooled keep-alive
connections, bounded concurrency, timeouts); decoding and storing run on a few worker
threads. Every outcome is recorded in `model_thumbnails`: `ok` with the content hash and
stored key, or `failed` with a reason "[transient|permanent] <kind>: <detail>".
Transient failures are retried within the run and on later runs, up to
`max_download_attempts`. Files are stored content-addressed, so identical images
are stored once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import aiohttp
from psycopg2.extras import execute_values

from ..core.db import connect
from ..core.images import ImageRejected, open_checked, to_rgb
from ..core.progress import Progress
from ..core.settings import Settings
from ..core.sharding import WHOLE, Shard
from ..core.store import ArtifactStore
from .fetch import ACCEPT, FetchFailed, GuardedResolver, fetch_bytes
from .plan import DownloadTask, plan_downloads

log = logging.getLogger(__name__)
STORE_FAILED = "store write failed"

VALIDATE_THREADS = min(4, os.cpu_count() or 1)
WRITE_BATCH = 200
WRITE_EVERY_S = 5.0


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


def validate_and_store(
    task: DownloadTask, data: bytes, store: ArtifactStore, settings: Settings
) -> tuple[DownloadResult, bool]:
    """Decode fully, normalise, hash and store. CPU and disk work: runs on a worker thread."""
    try:
        try:
            decoded = open_checked(data, settings.max_image_pixels, max_bytes=settings.max_image_decode_bytes)
            img = to_rgb(decoded)
        except ImageRejected as exc:
            kind, _, detail = str(exc).partition(": ")
            raise FetchFailed(kind, detail, transient=False) from None
        content_hash = hashlib.sha256(data).hexdigest()
        key = ArtifactStore.key_for(content_hash, decoded.format or "")
        try:
            stored_new = store.put(key, data)
        except Exception as exc:  # the store itself failed (disk full, S3 down): worth retrying later
            raise FetchFailed(STORE_FAILED, f"{type(exc).__name__}: {exc}", transient=True) from None
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
    store: ArtifactStore,
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
    store: ArtifactStore,
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
    tasks: Iterable[DownloadTask], store: ArtifactStore, settings: Settings
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
    with connect(db_url) as conn, conn.cursor() as cur:
        execute_values(
            cur,
            UPSERT_THUMBNAILS,
            [
                (r.uid, r.url, r.status, r.content_hash, r.stored_path, r.width, r.height, r.error, 1)
                for r in results
            ],
            template="(%s, %s, %s, %s, %s, %s, %s, %s, %s, now())",
        )


def download_thumbnails(settings: Settings, shard: Shard = WHOLE) -> DownloadStats:
    """Download every pending thumbnail (of this shard) concurrently; results are written in batches."""
    plan = plan_downloads(settings, shard)
    stats = DownloadStats(
        candidates=len(plan.tasks),
        skipped=sum(plan.skipped_by_reason.values()),
        skipped_by_reason=dict(plan.skipped_by_reason),
    )
    store = ArtifactStore.for_settings(settings)
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
    if stats.failed and not stats.fetched and all(STORE_FAILED in kind for kind in reasons):
        # Not a bad thumbnail but a broken store (unwritable volume, wrong bucket credentials): the
        # rows are recorded as transient failures, and the task fails so the run does not end green.
        raise StoreUnavailable(
            f"The thumbnail store {settings.thumbnail_store} refused all {stats.failed} writes; "
            f"see model_thumbnails.error (e.g. permissions of the store's path or its connection)"
        )
    return stats


class StoreUnavailable(RuntimeError):
    pass


def reason_kind(error: str) -> str:
    """The part of a reason before its detail ("[transient] HTTP 503"), for counting failures by kind."""
    return error.split(":")[0][:80]
