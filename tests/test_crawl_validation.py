from datetime import UTC, datetime

import pytest
from sketchfab_similarity.crawl.records import RejectedRecord, validate_model

UID = "9006d26492f44177b4151ce18a4a506c"


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
    row = validate_model(record())
    assert row.published_at == datetime(2026, 11, 27, 18, 4, 11, 123456, tzinfo=UTC)
    assert row.tags == ["lantern"] and row.categories == ["furniture-home"] and row.author == "someone"
    assert row.thumbnails[0]["width"] == 720


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"uid": "NOT-A-UID"}, "uid is not 32"),
        ({"uid": UID.upper()}, "uid is not 32"),
        ({"uid": None}, "uid is not 32"),
        ({"publishedAt": "yesterday"}, "publishedAt is not an ISO 8601"),
        ({"publishedAt": None}, "publishedAt missing"),
        ({"name": None}, "name missing"),
        ({"name": "x" * 5000}, "name is 5000 characters"),
        ({"likeCount": -1}, "likeCount"),
        ({"name": "nul\x00byte"}, "NUL character"),
        ({"thumbnails": {"images": "nope"}}, "thumbnails.images"),
    ],
)
def test_bad_records_are_rejected_with_a_reason(override, reason):
    with pytest.raises(RejectedRecord, match=reason):
        validate_model(record(**override))


def test_nasty_but_valid_names_are_kept_verbatim():
    name = 'Robert\'); DROP TABLE sketchfab_models;-- \u202e\U0001f600 "quoted"'
    assert validate_model(record(name=name)).name == name


def test_missing_thumbnails_is_valid():
    assert validate_model(record(thumbnails=None)).thumbnails == []
