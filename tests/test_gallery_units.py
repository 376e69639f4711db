"""Gallery pieces that need no database."""

from __future__ import annotations

import pytest
from sketchfab_similarity.gallery.app import cached, image_type, safe_link


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("https://sketchfab.com/3d-models/x", True),
        ("http://example.com/", True),
        ("javascript:alert(1)", False),
        (" JavaScript:alert(1)", False),
        ("data:text/html,hi", False),
        ("//evil.example/", False),
        ("", False),
        (None, False),
    ],
)
def test_only_http_links_survive(url, kept):
    assert (safe_link(url) is not None) == kept


def test_image_type_by_magic_bytes():
    assert image_type(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert image_type(b"\x89PNG\r\n\x1a\nrest") == "image/png"
    assert image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert image_type(b"<svg onload=alert(1)>") is None


def test_cached_settings_are_reread_after_the_ttl():
    calls = []

    def provider():
        calls.append(1)
        return len(calls)

    get = cached(provider, ttl_s=0.0)
    assert (get(), get()) == (1, 2)
    get = cached(provider, ttl_s=3600)
    assert (get(), get()) == (3, 3)


def test_unreachable_database_is_a_clear_503(tmp_path):
    from fastapi.testclient import TestClient
    from sketchfab_similarity.core.settings import Settings
    from sketchfab_similarity.gallery.app import create_app

    settings = Settings(
        db_url=f"postgresql+psycopg2://postgres@/none?host={tmp_path}", thumbnail_store=str(tmp_path)
    )
    resp = TestClient(create_app(lambda: settings)).get(f"/models/{'a' * 32}")
    assert resp.status_code == 503 and "not available" in resp.text
