"""Stage 1, crawl_models: page the API newest-first and upsert models.

A run covers a window of publication times. Incremental runs take everything
newer than the stored watermark minus an overlap (late-indexed models); a
backfill takes exactly its data interval. Records that cannot be accepted go to
`crawl_rejects` with their reason.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg2.extras import Json, execute_values

from .db import connect
from .progress import Progress
from .settings import Settings
from .sketchfab import SketchfabClient, build_session

log = logging.getLogger(__name__)

UID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_NAME_CHARS = 1024
MAX_RECORD_BYTES = 256_000
WATERMARK_KEY = "watermark"


@dataclass(frozen=True)
class CrawlWindow:
    """Publication times [since, until); None means unbounded on that side."""

    since: datetime | None = None
    until: datetime | None = None
    incremental: bool = True
    """Incremental windows advance the stored watermark when the crawl succeeds."""


@dataclass(frozen=True)
class CrawlFilters:
    categories: str | None = None
    tags: tuple[str, ...] = ()
    min_likes: int = 0
    max_models: int | None = None


@dataclass
class CrawlStats:
    pages: int = 0
    seen: int = 0
    upserted: int = 0
    rejected: int = 0
    skipped_outside_window: int = 0
    skipped_min_likes: int = 0
    duplicates: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    window_since: str | None = None
    window_until: str | None = None


@dataclass(frozen=True)
class ModelRow:
    uid: str
    name: str
    author: str | None
    published_at: datetime
    like_count: int
    view_count: int
    tags: list[str]
    categories: list[str]
    viewer_url: str | None
    thumbnails: list[dict[str, Any]]
    raw: dict[str, Any]


class RejectedRecord(ValueError):
    """A record we cannot accept; the message is the stored reason."""


def parse_timestamp(value: Any, field_name: str) -> datetime:
    """ISO 8601; Sketchfab omits the zone, which means UTC."""
    if not isinstance(value, str):
        raise RejectedRecord(f"{field_name} missing or not a string")
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise RejectedRecord(f"{field_name} is not an ISO 8601 timestamp: {value[:40]!r}") from None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _count(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**31 - 1:
        raise RejectedRecord(f"{key} is not a non-negative 32-bit integer: {value!r}")
    return value


def _slugs(raw: dict[str, Any], key: str) -> list[str]:
    items = raw.get(key) or []
    if not isinstance(items, list):
        raise RejectedRecord(f"{key} is not a list")
    slugs = []
    for item in items:
        slug = item.get("slug") if isinstance(item, dict) else item
        if isinstance(slug, str) and slug:
            slugs.append(slug[:200])
    return slugs


def _thumbnails(raw: dict[str, Any]) -> list[dict[str, Any]]:
    thumbs = raw.get("thumbnails") or {}
    images = thumbs.get("images", []) if isinstance(thumbs, dict) else None
    if not isinstance(images, list):
        raise RejectedRecord("thumbnails.images is not a list")
    out = []
    for img in images:
        if not isinstance(img, dict):
            continue
        url, w, h = img.get("url"), img.get("width"), img.get("height")
        if isinstance(url, str) and isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
            out.append({"url": url, "width": w, "height": h, "size": img.get("size")})
    return out


def validate_model(raw: Any) -> ModelRow:
    """Turn one API record into a row, or raise RejectedRecord with the reason."""
    if not isinstance(raw, dict):
        raise RejectedRecord(f"record is a {type(raw).__name__}, not an object")
    encoded = json.dumps(raw, ensure_ascii=False)
    if len(encoded.encode()) > MAX_RECORD_BYTES:
        raise RejectedRecord(f"record is larger than {MAX_RECORD_BYTES} bytes")
    if "\\u0000" in encoded:
        raise RejectedRecord("record contains a NUL character, which Postgres cannot store")
    uid = raw.get("uid")
    if not isinstance(uid, str) or not UID_RE.match(uid):
        raise RejectedRecord(f"uid is not 32 lowercase hex characters: {str(uid)[:64]!r}")
    name = raw.get("name")
    if not isinstance(name, str):
        raise RejectedRecord("name missing or not a string")
    if len(name) > MAX_NAME_CHARS:
        raise RejectedRecord(f"name is {len(name)} characters, more than {MAX_NAME_CHARS}")
    user = raw.get("user") if isinstance(raw.get("user"), dict) else {}
    author = user.get("username") or user.get("displayName")
    viewer_url = raw.get("viewerUrl")
    return ModelRow(
        uid=uid,
        name=name,
        author=author if isinstance(author, str) else None,
        published_at=parse_timestamp(raw.get("publishedAt"), "publishedAt"),
        like_count=_count(raw, "likeCount"),
        view_count=_count(raw, "viewCount"),
        tags=_slugs(raw, "tags"),
        categories=_slugs(raw, "categories"),
        viewer_url=viewer_url if isinstance(viewer_url, str) else None,
        thumbnails=_thumbnails(raw),
        raw=raw,
    )


UPSERT_MODELS = """
INSERT INTO sketchfab_models
    (uid, name, author, published_at, like_count, view_count, tags, categories, viewer_url, thumbnails, raw)
VALUES %s
ON CONFLICT (uid) DO UPDATE SET
    name = EXCLUDED.name,
    author = EXCLUDED.author,
    published_at = EXCLUDED.published_at,
    like_count = EXCLUDED.like_count,
    view_count = EXCLUDED.view_count,
    tags = EXCLUDED.tags,
    categories = EXCLUDED.categories,
    viewer_url = EXCLUDED.viewer_url,
    thumbnails = EXCLUDED.thumbnails,
    raw = EXCLUDED.raw,
    last_seen_at = now()
"""


def upsert_models(cur: Any, rows: list[ModelRow]) -> None:
    values = [
        (
            r.uid, r.name, r.author, r.published_at, r.like_count, r.view_count,
            r.tags, r.categories, r.viewer_url, Json(r.thumbnails), Json(r.raw),
        )
        for r in rows
    ]  # fmt: skip
    execute_values(cur, UPSERT_MODELS, values)


def record_rejects(cur: Any, rejects: list[tuple[Any, str]]) -> None:
    execute_values(
        cur,
        "INSERT INTO crawl_rejects (raw, reason) VALUES %s ON CONFLICT DO NOTHING",
        [(Json(_jsonable(raw)), reason) for raw, reason in rejects],
    )


def _jsonable(raw: Any) -> Any:
    """Keep the raw record, but never let a NUL byte or a non-object break the insert."""
    text = json.dumps(raw, ensure_ascii=False, default=str).replace("\\u0000", "\\ufffd")
    return json.loads(text)


def read_watermark(db_url: str) -> datetime | None:
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute("SELECT value->>'published_at' FROM pipeline_state WHERE name = %s", (WATERMARK_KEY,))
        row = cur.fetchone()
    return datetime.fromisoformat(row[0]) if row and row[0] else None


def incremental_window(db_url: str, overlap: timedelta) -> CrawlWindow:
    watermark = read_watermark(db_url)
    return CrawlWindow(since=None if watermark is None else watermark - overlap, incremental=True)


def crawl(
    settings: Settings,
    window: CrawlWindow,
    filters: CrawlFilters = CrawlFilters(),
    client: SketchfabClient | None = None,
) -> CrawlStats:
    """Upsert every model published inside `window` (newest first), page by page."""
    client = client or SketchfabClient(
        settings.api_base_url,
        settings.api_token,
        timeout_s=settings.http_timeout_s,
        session=build_session(),
    )
    stats = CrawlStats(
        window_since=window.since.isoformat() if window.since else None,
        window_until=window.until.isoformat() if window.until else None,
    )
    seen_uids: set[str] = set()
    newest: datetime | None = None
    progress = Progress("crawl", total=filters.max_models, unit="models", log=log)
    first_url = client.models_url(
        count=settings.page_size,
        categories=filters.categories,
        tags=",".join(filters.tags) or None,
    )
    done = False
    for page in client.iter_pages(first_url):
        stats.pages += 1
        rows: list[ModelRow] = []
        rejects: list[tuple[Any, str]] = []
        for raw in page.results:
            stats.seen += 1
            try:
                row = validate_model(raw)
            except RejectedRecord as exc:
                rejects.append((raw, str(exc)))
                kind = str(exc).split(":")[0]
                stats.reject_reasons[kind] = stats.reject_reasons.get(kind, 0) + 1
                continue
            if row.uid in seen_uids:
                stats.duplicates += 1
                continue
            seen_uids.add(row.uid)
            if window.until is not None and row.published_at >= window.until:
                stats.skipped_outside_window += 1
                continue
            if window.since is not None and row.published_at < window.since:
                done = True  # newest-first: everything after this is older still
                break
            if row.like_count < filters.min_likes:
                stats.skipped_min_likes += 1
                continue
            rows.append(row)
            newest = row.published_at if newest is None else max(newest, row.published_at)
            if filters.max_models is not None and stats.upserted + len(rows) >= filters.max_models:
                done = True
                break
        with connect(settings.db_url, vectors=False) as conn, conn.cursor() as cur:
            if rows:
                upsert_models(cur, rows)
            if rejects:
                record_rejects(cur, rejects)
        stats.upserted += len(rows)
        stats.rejected += len(rejects)
        progress.advance(len(rows))
        if done:
            break
    if window.incremental and newest is not None:
        advance_watermark(settings.db_url, newest)
    progress.finish(
        f"{stats.upserted} models upserted, {stats.rejected} rejected, {stats.pages} pages, "
        f"{client.requests_made} requests"
    )
    return stats


def advance_watermark(db_url: str, newest: datetime) -> None:
    """Move the watermark forward only (a smaller run never moves it back)."""
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO pipeline_state (name, value) VALUES (%s, jsonb_build_object('published_at', %s::text))
            ON CONFLICT (name) DO UPDATE SET
                value = CASE WHEN (pipeline_state.value->>'published_at')::timestamptz >= %s::timestamptz
                             THEN pipeline_state.value ELSE EXCLUDED.value END,
                updated_at = now()
            """,
            (WATERMARK_KEY, newest.isoformat(), newest.isoformat()),
        )
