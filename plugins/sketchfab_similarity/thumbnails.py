"""Stage 2, download_thumbnails: choose, fetch, validate and store one thumbnail per model.

Only hosts on the allow-list are contacted (the API decides what URLs we see, so
this is an SSRF boundary). Every outcome is recorded in `model_thumbnails`: `ok`
with the content hash and stored key, or `failed` with a reason prefixed
`[transient]` (retried on later runs, up to a maximum) or `[permanent]`.
Files are stored content-addressed, so identical images are stored once.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import fsspec
import requests
from psycopg2.extras import execute_values

from .db import connect
from .images import ImageRejected, open_checked
from .progress import Progress
from .settings import Settings
from .sharding import WHOLE, Shard
from .sketchfab import build_session

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
WRITE_BATCH = 200


class FetchFailed(Exception):
    def __init__(self, reason: str, transient: bool) -> None:
        super().__init__(reason)
        self.transient = transient

    @property
    def recorded(self) -> str:
        return f"[{'transient' if self.transient else 'permanent'}] {self}"


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
    stored_new: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)


def choose_thumbnail(images: list[dict[str, Any]], min_side: int) -> str | None:
    """The smallest image with both sides >= min_side; the largest one if none is big enough."""
    if not images:
        return None
    big_enough = [i for i in images if i["width"] >= min_side and i["height"] >= min_side]
    if big_enough:
        return min(big_enough, key=lambda i: (i["width"] * i["height"], i["url"]))["url"]
    return max(images, key=lambda i: (i["width"] * i["height"], i["url"]))["url"]


class ThumbnailStore:
    """Content-addressed files under a local path or any fsspec URL (file://, s3://, ...)."""

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


def check_allowed(url: str, allowed_hosts: tuple[str, ...]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchFailed(f"URL scheme {parts.scheme!r} is not http(s)", transient=False)
    host = (parts.hostname or "").lower()
    if host not in allowed_hosts:
        raise FetchFailed(f"host {host!r} is not in similarity_thumbnail_hosts", transient=False)
    if parts.username or parts.password:
        raise FetchFailed("URL carries credentials", transient=False)


def fetch_bytes(session: requests.Session, url: str, settings: Settings) -> bytes:
    """GET with manual redirects (each hop re-checked), a byte cap and content-type check."""
    for _ in range(MAX_REDIRECTS + 1):
        check_allowed(url, settings.thumbnail_hosts)
        try:
            resp = session.get(url, stream=True, timeout=settings.http_timeout_s, allow_redirects=False)
        except requests.RequestException as exc:
            raise FetchFailed(f"request failed: {type(exc).__name__}", transient=True) from None
        with resp:
            if resp.is_redirect:
                url = urljoin(url, resp.headers.get("Location", ""))
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                raise FetchFailed(f"HTTP {resp.status_code}", transient=True)
            if resp.status_code != 200:
                raise FetchFailed(f"HTTP {resp.status_code}", transient=False)
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if not ctype.startswith("image/"):
                raise FetchFailed(f"content type {ctype or 'missing'!r} is not an image", transient=False)
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > settings.max_image_bytes:
                raise FetchFailed(
                    f"{declared} bytes, over the {settings.max_image_bytes} cap", transient=False
                )
            chunks, size = [], 0
            try:
                for chunk in resp.iter_content(64 * 1024):
                    size += len(chunk)
                    if size > settings.max_image_bytes:
                        raise FetchFailed(f"over the {settings.max_image_bytes} byte cap", transient=False)
                    chunks.append(chunk)
            except requests.RequestException as exc:
                raise FetchFailed(f"download interrupted: {type(exc).__name__}", transient=True) from None
            return b"".join(chunks)
    raise FetchFailed(f"more than {MAX_REDIRECTS} redirects", transient=False)


def download_one(
    task: DownloadTask, session: requests.Session, store: ThumbnailStore, settings: Settings
) -> tuple[DownloadResult, bool]:
    """Fetch, validate and store one thumbnail. Never raises for a bad image: it is a result."""
    if task.url is None:
        return DownloadResult(task.uid, None, "failed", error="[permanent] model has no thumbnail"), False
    try:
        data = fetch_bytes(session, task.url, settings)
        try:
            img = open_checked(data, settings.max_image_pixels)
        except ImageRejected as exc:
            raise FetchFailed(str(exc), transient=False) from None
        content_hash = hashlib.sha256(data).hexdigest()
        key = ThumbnailStore.key_for(content_hash)
        stored_new = store.put(key, data)
    except FetchFailed as exc:
        return DownloadResult(task.uid, task.url, "failed", error=exc.recorded), False
    except OSError as exc:  # the store itself failed: worth retrying later
        return DownloadResult(
            task.uid, task.url, "failed", error=f"[transient] store write failed: {exc}"
        ), False
    width, height = img.size
    return DownloadResult(task.uid, task.url, "ok", content_hash, key, width, height), stored_new


def pending_downloads(
    settings: Settings, limit: int | None = None, shard: Shard = WHOLE
) -> list[DownloadTask]:
    """Models with no good thumbnail, a changed chosen URL, or a transient failure left to retry."""
    with connect(settings.db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute(
            """
            SELECT m.uid, m.thumbnails, t.source_url, t.status, t.error, t.attempts
            FROM sketchfab_models m LEFT JOIN model_thumbnails t ON t.uid = m.uid
            ORDER BY m.published_at DESC, m.uid
            """
        )
        rows = cur.fetchall()
    tasks = []
    for uid, images, stored_url, status, error, attempts in rows:
        if not shard.contains(uid):
            continue
        url = choose_thumbnail(images, settings.input_size)
        if (
            status is None
            or url != stored_url
            or (
                status == "failed"
                and (error or "").startswith("[transient]")
                and attempts < settings.max_download_attempts
            )
        ):
            tasks.append(DownloadTask(uid, url))
        if limit is not None and len(tasks) >= limit:
            break
    return tasks


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
    tasks = pending_downloads(settings, shard=shard) if tasks is None else tasks
    stats = DownloadStats(candidates=len(tasks))
    store = ThumbnailStore(settings.thumbnail_store)
    # Thumbnail fetches get no urllib3 status retries: a failed image is recorded and retried next run.
    session = build_session(retries=2, pool_size=settings.download_workers, statuses=frozenset())
    progress = Progress("download", total=len(tasks), unit="thumbnails", log=log)
    reasons: Counter[str] = Counter()
    batch: list[DownloadResult] = []
    with ThreadPoolExecutor(max_workers=settings.download_workers) as pool:
        for result, stored_new in pool.map(lambda t: download_one(t, session, store, settings), tasks):
            batch.append(result)
            if result.status == "ok":
                stats.fetched += 1
                stats.stored_new += stored_new
            else:
                stats.failed += 1
                reasons[reason_kind(result.error or "")] += 1
            progress.advance()
            if len(batch) >= WRITE_BATCH:
                record_results(settings.db_url, batch)
                batch = []
    record_results(settings.db_url, batch)
    stats.failures_by_reason = dict(reasons)
    progress.finish(
        f"{stats.fetched} ok ({stats.stored_new} new files), {stats.failed} failed {dict(reasons)}"
    )
    return stats


def reason_kind(error: str) -> str:
    """The part of a reason before any detail, for counting failures by kind."""
    return error.split(":")[0][:60]
