"""API records in, table rows out: what the crawler accepts from Sketchfab and why it refuses the rest.

The API's text is written by users (any Unicode, very long strings, SQL-looking text), so a
record is checked field by field; what cannot be accepted raises `RejectedRecord`, whose
message is the reason stored in `crawl_rejects`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..core.uids import is_uid

MAX_NAME_CHARS = 1024


MAX_RECORD_BYTES = 256_000


MAX_SLUG_CHARS = 200


MAX_SLUGS = 200


MAX_FUTURE = timedelta(days=1)
"""A publication time further ahead than this is bad data; it would push the watermark past every real model."""


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
        raise RejectedRecord(f"{key} is not a non-negative 32-bit integer: {str(value)[:40]!r}")
    return value


def _slugs(raw: dict[str, Any], key: str) -> list[str]:
    items = raw.get(key) or []
    if not isinstance(items, list):
        raise RejectedRecord(f"{key} is not a list")
    if len(items) > MAX_SLUGS:
        raise RejectedRecord(f"{key} has {len(items)} entries, more than {MAX_SLUGS}")
    slugs = []
    for item in items:
        slug = item.get("slug") if isinstance(item, dict) else item
        if isinstance(slug, str) and slug:
            if len(slug) > MAX_SLUG_CHARS:
                raise RejectedRecord(f"{key} entry is {len(slug)} characters, more than {MAX_SLUG_CHARS}")
            slugs.append(slug)
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


def validate_model(raw: Any, now: datetime | None = None) -> ModelRow:
    """Turn one API record into a row, or raise RejectedRecord with the reason."""
    if not isinstance(raw, dict):
        raise RejectedRecord(f"record is a {type(raw).__name__}, not an object")
    encoded = json.dumps(raw, ensure_ascii=False, default=str)
    if len(encoded.encode()) > MAX_RECORD_BYTES:
        raise RejectedRecord(f"record is larger than {MAX_RECORD_BYTES} bytes")
    if "\\u0000" in encoded:
        raise RejectedRecord("record contains a NUL character, which Postgres cannot store")
    uid = raw.get("uid")
    if not is_uid(uid):
        raise RejectedRecord(f"uid is not 32 lowercase hex characters: {str(uid)[:64]!r}")
    name = raw.get("name")
    if not isinstance(name, str):
        raise RejectedRecord("name missing or not a string")
    if len(name) > MAX_NAME_CHARS:
        raise RejectedRecord(f"name is {len(name)} characters, more than {MAX_NAME_CHARS}")
    published_at = parse_timestamp(raw.get("publishedAt"), "publishedAt")
    if published_at > (now or datetime.now(UTC)) + MAX_FUTURE:
        raise RejectedRecord(f"publishedAt is in the future: {published_at.isoformat()}")
    user = raw.get("user") if isinstance(raw.get("user"), dict) else {}
    author = user.get("username") or user.get("displayName")
    viewer_url = raw.get("viewerUrl")
    return ModelRow(
        uid=uid,
        name=name,
        author=author if isinstance(author, str) else None,
        published_at=published_at,
        like_count=_count(raw, "likeCount"),
        view_count=_count(raw, "viewCount"),
        tags=_slugs(raw, "tags"),
        categories=_slugs(raw, "categories"),
        viewer_url=viewer_url if isinstance(viewer_url, str) else None,
        thumbnails=_thumbnails(raw),
        raw=raw,
    )
