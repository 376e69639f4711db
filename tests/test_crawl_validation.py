from datetime import UTC, datetime

import pytest
from sketchfab_similarity.crawl.records import (
    MAX_NAME_CHARS,
    MAX_RECORD_BYTES,
    NonFinite,
    RejectedRecord,
    judge,
    loads,
    storable,
    validate_model,
)

UID = "9006d26492f44177b4151ce18a4a506c"
NOW = datetime(2026, 11, 28, tzinfo=UTC)


def record(**kw):
    base = {
        "uid": UID,
        "name": "Old lantern",
        "publishedAt": "2026-11-27T18:04:11.123456",
        "likeCount": 12,
        "viewCount": 340,
        "user": {"username": "someone"},
        "tags": [{"name": "lantern", "slug": "lantern"}],
        "categories": [{"name": "Furniture & Home", "slug": "furniture-home"}],
        "viewerUrl": "https://sketchfab.com/3d-models/old-lantern-" + UID,
        "thumbnails": {
            "images": [{"url": "https://media.sketchfab.com/a.jpeg", "width": 720, "height": 405}]
        },
    }
    base.update(kw)
    return base


def test_valid_record_becomes_a_row_with_utc_time():
    row = validate_model(record(), NOW)
    assert row.published_at == datetime(2026, 11, 27, 18, 4, 11, 123456, tzinfo=UTC)
    assert row.tags == ["lantern"] and row.categories == ["furniture-home"] and row.author == "someone"
    assert row.thumbnails[0]["width"] == 720
    assert row.cleaned == [] and row.raw == record()


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"uid": "NOT-A-UID"}, "uid is not 32"),
        ({"uid": UID.upper()}, "uid is not 32"),
        ({"uid": None}, "uid is not 32"),
        ({"uid": "\ud800" * 32}, "uid is not 32"),
        ({"publishedAt": "yesterday"}, "publishedAt is not an ISO 8601"),
        ({"publishedAt": None}, "publishedAt missing"),
        ({"publishedAt": "0001-01-01T00:30:00+01:00"}, "publishedAt is not an ISO 8601 timestamp in range"),
        ({"publishedAt": "9999-12-31T23:59:59"}, "publishedAt is in the future"),
        ({"publishedAt": "\ud800"}, "publishedAt is not an ISO 8601"),
    ],
)
def test_only_uid_and_publication_time_reject_a_record(override, reason):
    with pytest.raises(RejectedRecord, match=reason):
        validate_model(record(**override), NOW)
    assert reason.split(" ")[0] in judge(record(**override), NOW)


# Every optional field with a wrong type, a hostile value or an absurd size: the model is kept,
# the field cleaned, and the note says which field.
HOSTILE_FIELDS = [
    ({"name": "x" * 6000}, "name: 6000 characters cut to 1024"),
    ({"name": "x" * 10_000_000}, "name: 10000000 characters cut to 1024"),
    ({"name": "lone \ud800 surrogate"}, "name: NUL or lone surrogate"),
    ({"name": "nul\x00byte"}, "name: NUL or lone surrogate"),
    ({"name": None}, "name: missing"),
    ({"name": 42}, "name: int, not a string"),
    ({"name": ["a"]}, "name: list, not a string"),
    ({"likeCount": -1}, "likeCount"),
    ({"likeCount": "12"}, "likeCount"),
    ({"likeCount": 2**40}, "likeCount"),
    ({"likeCount": True}, "likeCount"),
    ({"likeCount": NonFinite("NaN")}, "likeCount"),
    ({"viewCount": 1.5}, "viewCount"),
    ({"viewCount": {"a": 1}}, "viewCount"),
    ({"tags": "lantern"}, "tags: str, not a list"),
    ({"tags": [{"slug": "x" * 300}, 7, None, {"slug": "\ud800"}]}, "tags: 4 entries"),
    ({"tags": [{"slug": "t"}] * 5000}, "tags: 5000 entries cut to 200"),
    ({"categories": {"slug": "a"}}, "categories: dict, not a list"),
    ({"thumbnails": {"images": "nope"}}, "thumbnails: images is not a list"),
    ({"thumbnails": [1, 2]}, "thumbnails: images is not a list"),
    ({"thumbnails": {"images": [{"url": 5, "width": "a", "height": None}, "junk"]}}, "thumbnails: 2 images"),
    ({"thumbnails": {"images": [{"url": "u", "width": True, "height": 1}]}}, "thumbnails: 1 images"),
    ({"viewerUrl": 12}, "viewerUrl: int"),
    ({"viewerUrl": "h" * 5000}, "viewerUrl: 5000 characters cut"),
    ({"user": {"username": ["x"]}}, "user.username: list"),
    ({"description": NonFinite("Infinity")}, "raw: non-finite number replaced by null"),
    ({"description": "bad \udfff tail"}, "raw: NUL or lone surrogate"),
    ({"extra": float("nan")}, "raw: non-finite number replaced by null"),
]


@pytest.mark.parametrize(("override", "note"), HOSTILE_FIELDS)
def test_bad_optional_fields_are_cleaned_and_the_model_kept(override, note):
    row = validate_model(record(**override), NOW)
    assert row.uid == UID
    assert any(c.startswith(note) for c in row.cleaned), row.cleaned
    assert len(row.name) <= MAX_NAME_CHARS
    stored, _ = storable(row.raw)
    assert stored == row.raw  # already storable: cleaning twice changes nothing
    text = __import__("json").dumps(row.raw, allow_nan=False)  # Postgres refuses NaN in jsonb
    assert len(text.encode()) <= MAX_RECORD_BYTES and "\\ud8" not in text and "\\udf" not in text


def test_raw_json_is_preserved_except_what_postgres_cannot_store():
    raw = record(name="lamp \ud800", description="kept verbatim", license={"slug": "by"})
    row = validate_model(raw, NOW)
    assert row.raw["description"] == "kept verbatim" and row.raw["license"] == {"slug": "by"}
    assert row.raw["name"] == "lamp \ufffd" and row.name == "lamp \ufffd"


def test_nested_junk_and_huge_records_are_cut_to_something_storable():
    deep: object = "bottom"
    for _ in range(500):
        deep = {"a": [deep]}
    row = validate_model(record(junk=deep, blob=["x" * 10_000] * 100), NOW)
    assert any("nesting deeper" in c for c in row.cleaned) and any("shrunk" in c for c in row.cleaned)
    assert len(__import__("json").dumps(row.raw).encode()) <= MAX_RECORD_BYTES


def test_non_finite_numbers_are_refused_at_parse_time():
    parsed = loads(b'{"a": NaN, "b": Infinity, "c": -Infinity, "d": 1e999, "e": 1.5, "f": 3}')
    assert parsed["a"] == NonFinite("NaN") and parsed["b"] == NonFinite("Infinity")
    assert parsed["c"] == NonFinite("-Infinity") and parsed["d"] == NonFinite("1e999")
    assert parsed["e"] == 1.5 and parsed["f"] == 3


@pytest.mark.parametrize("raw", [None, [], "text", 7, {"uid": UID, "publishedAt": NonFinite("NaN")}])
def test_judge_turns_anything_into_a_verdict(raw):
    assert isinstance(judge(raw, NOW), str)


def test_judge_turns_an_unexpected_exception_into_a_reject(monkeypatch):
    from sketchfab_similarity.crawl import records

    def boom(*_args):
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(records, "_thumbnails", boom)
    verdict = judge(record(), NOW)
    assert isinstance(verdict, str) and verdict.startswith("invalid record (UnicodeEncodeError)")


def test_nasty_but_valid_names_are_kept_verbatim():
    name = 'Robert\'); DROP TABLE sketchfab_models;-- \u202e\U0001f600 "quoted"'
    row = validate_model(record(name=name), NOW)
    assert row.name == name and row.cleaned == []


def test_missing_thumbnails_is_valid():
    assert validate_model(record(thumbnails=None), NOW).thumbnails == []
