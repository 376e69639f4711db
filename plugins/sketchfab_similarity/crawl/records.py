"""API records in, table rows out: what the crawler accepts from Sketchfab and why it refuses the rest.

The API's text is written by users (any Unicode, very long strings, SQL-looking text, broken
encodings), so a record is checked field by field. Only the two fields the pipeline cannot
work without justify refusing a model: its uid and its publication time. Those raise
`RejectedRecord`, whose message is the reason stored in `crawl_rejects`. Every other field
that is wrong (a 6,000-character name, a count that is a string, a lone surrogate) is cleaned:
truncated, replaced or dropped, the model is kept, and `ModelRow.cleaned` says what was done.
The raw JSON is kept as received except where Postgres could not store it.

`judge` is the crawler's entry point: whatever goes wrong while looking at one record makes
that record a reject with its reason, never a failed page.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ..core.uids import is_uid

MAX_NAME_CHARS = 1024
MAX_AUTHOR_CHARS = 256
MAX_URL_CHARS = 2048
MAX_RECORD_BYTES = 256_000
"""Raw JSON above this is shrunk before storing (long strings cut, long lists shortened)."""
MAX_RAW_STRING_CHARS = 4096
MAX_RAW_LIST_ITEMS = 1000
MAX_DEPTH = 32
"""Nesting below this in the raw JSON is replaced by a marker; Postgres and json both have stack limits."""
MAX_SLUG_CHARS = 200
MAX_SLUGS = 200
MAX_THUMBNAILS = 64
MAX_REASON_CHARS = 500

MAX_FUTURE = timedelta(days=1)
"""A publication time further ahead than this is bad data, not clock skew: the record is refused.
(Nearer future times are kept; the crawler caps the watermark at the crawl's start, see crawler.finish.)"""

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class NonFinite:
    """A number the API sent that is not a finite float (NaN, Infinity, 1e999).

    The client's JSON parser produces this instead of a float (`loads`), so a non-finite value
    never reaches arithmetic or Postgres; cleaning drops it with a note.
    """

    text: str


def loads(body: bytes | str) -> Any:
    """`json.loads` that refuses non-finite numbers at parse time, marking them as `NonFinite`."""

    def parse_float(text: str) -> float | NonFinite:
        value = float(text)
        return value if math.isfinite(value) else NonFinite(text)

    return json.loads(body, parse_constant=NonFinite, parse_float=parse_float)


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
    cleaned: list[str] = field(default_factory=list)
    """What was truncated, replaced or dropped to accept this record; empty when nothing."""


class RejectedRecord(ValueError):
    """A record we cannot accept; the message is the stored reason."""


def _clean_text(value: str) -> str:
    """Text Postgres can store: NULs and lone surrogates (invalid in UTF-8) become U+FFFD."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    return _LONE_SURROGATE.sub("\ufffd", value)


class _Cleaner:
    """Makes any parsed JSON storable as jsonb and notes each kind of change once."""

    def __init__(self, shrink: bool) -> None:
        self.shrink = shrink
        self.notes: set[str] = set()

    def clean(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            text = _clean_text(value)
            if text != value:
                self.notes.add("raw: NUL or lone surrogate replaced by U+FFFD")
            if self.shrink and len(text) > MAX_RAW_STRING_CHARS:
                self.notes.add(f"raw: strings cut to {MAX_RAW_STRING_CHARS} characters")
                text = text[:MAX_RAW_STRING_CHARS]
            return text
        if isinstance(value, NonFinite) or (isinstance(value, float) and not math.isfinite(value)):
            self.notes.add("raw: non-finite number replaced by null")
            return None
        if value is None or isinstance(value, bool | int | float):
            return value
        if depth >= MAX_DEPTH:
            self.notes.add(f"raw: nesting deeper than {MAX_DEPTH} replaced by a marker")
            return "[nested too deep]"
        if isinstance(value, dict):
            return {self.clean(str(k), depth + 1): self.clean(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            items = list(value)
            if self.shrink and len(items) > MAX_RAW_LIST_ITEMS:
                self.notes.add(f"raw: lists cut to {MAX_RAW_LIST_ITEMS} items")
                items = items[:MAX_RAW_LIST_ITEMS]
            return [self.clean(v, depth + 1) for v in items]
        self.notes.add(f"raw: {type(value).__name__} replaced by its text")
        return _clean_text(str(value))[:MAX_RAW_STRING_CHARS]


def _encoded_size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode())


def storable(raw: Any) -> tuple[Any, list[str]]:
    """The raw record as JSON Postgres accepts, no larger than MAX_RECORD_BYTES, and what was changed.

    Values Postgres refuses in jsonb (NUL, lone surrogates, NaN) are replaced, deep nesting is cut;
    an oversized record has its long strings and lists shortened, and if still too large is kept
    as a JSON-text prefix.
    """
    cleaner = _Cleaner(shrink=False)
    value = cleaner.clean(raw)
    if _encoded_size(value) > MAX_RECORD_BYTES:
        cleaner = _Cleaner(shrink=True)
        value = cleaner.clean(raw)
        cleaner.notes.add(f"raw: record larger than {MAX_RECORD_BYTES} bytes shrunk")
        if _encoded_size(value) > MAX_RECORD_BYTES:
            text = json.dumps(value, ensure_ascii=False)
            value = {"truncated_json": text[: MAX_RECORD_BYTES // 4], "original_chars": len(text)}
    return value, sorted(cleaner.notes)


def parse_timestamp(value: Any, field_name: str) -> datetime:
    """ISO 8601; Sketchfab omits the zone, which means UTC."""
    if not isinstance(value, str):
        raise RejectedRecord(f"{field_name} missing or not a string")
    shown = _clean_text(value[:40])
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    except (ValueError, OverflowError):
        raise RejectedRecord(f"{field_name} is not an ISO 8601 timestamp in range: {shown!r}") from None


def _text(value: Any, key: str, limit: int, notes: list[str]) -> str | None:
    """A cleaned, bounded string, or None (noted) when the value is not a string."""
    if value is None:
        return None
    if not isinstance(value, str):
        notes.append(f"{key}: {type(value).__name__}, not a string; dropped")
        return None
    text = _clean_text(value)
    if text != value:
        notes.append(f"{key}: NUL or lone surrogate replaced by U+FFFD")
    if len(text) > limit:
        notes.append(f"{key}: {len(text)} characters cut to {limit}")
        text = text[:limit]
    return text


def _count(raw: dict[str, Any], key: str, notes: list[str]) -> int:
    value = raw.get(key, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**31 - 1:
        shown = _clean_text(str(value)[:40])
        notes.append(f"{key}: {shown!r} is not a non-negative 32-bit integer; stored as 0")
        return 0
    return value


def _slugs(raw: dict[str, Any], key: str, notes: list[str]) -> list[str]:
    items = raw.get(key) or []
    if not isinstance(items, list):
        notes.append(f"{key}: {type(items).__name__}, not a list; dropped")
        return []
    if len(items) > MAX_SLUGS:
        notes.append(f"{key}: {len(items)} entries cut to {MAX_SLUGS}")
        items = items[:MAX_SLUGS]
    slugs, bad = [], 0
    for item in items:
        slug = item.get("slug") if isinstance(item, dict) else item
        if isinstance(slug, str) and slug and len(slug) <= MAX_SLUG_CHARS and _clean_text(slug) == slug:
            slugs.append(slug)
        else:
            bad += 1
    if bad:
        notes.append(f"{key}: {bad} entries without a usable slug dropped")
    return slugs


def _thumbnails(raw: dict[str, Any], notes: list[str]) -> list[dict[str, Any]]:
    thumbs = raw.get("thumbnails") or {}
    images = thumbs.get("images", []) if isinstance(thumbs, dict) else None
    if not isinstance(images, list):
        notes.append("thumbnails: images is not a list; no thumbnails")
        return []
    out, bad = [], 0
    for img in images[:MAX_THUMBNAILS]:
        url = img.get("url") if isinstance(img, dict) else None
        w = img.get("width") if isinstance(img, dict) else None
        h = img.get("height") if isinstance(img, dict) else None
        if (
            isinstance(url, str)
            and len(url) <= MAX_URL_CHARS
            and _clean_text(url) == url
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**31 for n in (w, h))
        ):
            size = img.get("size")
            ok_size = isinstance(size, int) and not isinstance(size, bool) and 0 <= size < 2**53
            out.append({"url": url, "width": w, "height": h, "size": size if ok_size else None})
        else:
            bad += 1
    if len(images) > MAX_THUMBNAILS:
        notes.append(f"thumbnails: {len(images)} images cut to {MAX_THUMBNAILS}")
    if bad:
        notes.append(f"thumbnails: {bad} images without a usable url/width/height dropped")
    return out


def validate_model(raw: Any, now: datetime | None = None) -> ModelRow:
    """Turn one API record into a row (cleaning optional fields), or raise RejectedRecord."""
    if not isinstance(raw, dict):
        raise RejectedRecord(f"record is a {type(raw).__name__}, not an object")
    uid = raw.get("uid")
    if not is_uid(uid):
        shown = _clean_text(str(uid)[:64]) if not isinstance(uid, NonFinite) else uid.text
        raise RejectedRecord(f"uid is not 32 lowercase hex characters: {shown!r}")
    published_at = parse_timestamp(raw.get("publishedAt"), "publishedAt")
    if published_at > (now or datetime.now(UTC)) + MAX_FUTURE:
        raise RejectedRecord(f"publishedAt is in the future: {published_at.isoformat()}")
    notes: list[str] = []
    name = _text(raw.get("name"), "name", MAX_NAME_CHARS, notes)
    if name is None:
        notes.append("name: missing; stored as empty")
        name = ""
    user = raw.get("user") if isinstance(raw.get("user"), dict) else {}
    author_value = user.get("username") or user.get("displayName")
    author = _text(author_value, "user.username", MAX_AUTHOR_CHARS, notes)
    viewer_url = _text(raw.get("viewerUrl"), "viewerUrl", MAX_URL_CHARS, notes)
    like_count = _count(raw, "likeCount", notes)
    view_count = _count(raw, "viewCount", notes)
    tags = _slugs(raw, "tags", notes)
    categories = _slugs(raw, "categories", notes)
    thumbnails = _thumbnails(raw, notes)
    stored, raw_notes = storable(raw)
    return ModelRow(
        uid=uid,
        name=name,
        author=author,
        published_at=published_at,
        like_count=like_count,
        view_count=view_count,
        tags=tags,
        categories=categories,
        viewer_url=viewer_url,
        thumbnails=thumbnails,
        raw=stored,
        cleaned=notes + raw_notes,
    )


def judge(raw: Any, now: datetime) -> ModelRow | str:
    """The crawler's verdict on one record: a row, or the reason it is refused.

    Any exception while looking at the record refuses that record alone (with the exception
    as its reason); one bad record must never fail its page.
    """
    try:
        return validate_model(raw, now)
    except RejectedRecord as exc:
        return str(exc)[:MAX_REASON_CHARS]
    except Exception as exc:  # noqa: BLE001 - anything a hostile record provokes is that record's fault
        reason = _clean_text(f"invalid record ({type(exc).__name__}): {exc}")
        return reason[:MAX_REASON_CHARS]
