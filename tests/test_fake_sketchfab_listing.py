"""The local server's listings behave like the API's: a cap per query, both endpoints, every filter
the crawler slices by, refusals on request, changed thumbnails, a long-tailed catalogue."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest
import requests
from fake_sketchfab import Catalog, FaultConfig, start_server

pytestmark = pytest.mark.integration

CAP = 50


def page_all(url: str, **params) -> tuple[list[dict], int]:
    """Every result of a listing following `next`, and the number of pages."""
    results, pages = [], 0
    resp = requests.get(url, params=params, timeout=10)
    while True:
        resp.raise_for_status()
        body = resp.json()
        results += body["results"]
        pages += 1
        if not body["next"]:
            return results, pages
        resp = requests.get(body["next"], timeout=10)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.generate(300, seed=41)


def test_each_query_stops_at_the_cap_on_both_endpoints(catalog):
    with start_server(catalog, listing_cap=CAP) as server:
        models, _ = page_all(f"{server.api_base_url}/v3/models")
        search, _ = page_all(f"{server.api_base_url}/v3/search", type="models")
        newest = [m.uid for m in catalog.listing()[:CAP]]
        assert [r["uid"] for r in models] == newest == [r["uid"] for r in search]
        # Another query (other filters) has a cap of its own.
        low = sorted(m.face_count for m in catalog.models)[100]
        narrow, _ = page_all(f"{server.api_base_url}/v3/search", type="models", max_face_count=low)
        expected = [m.uid for m in catalog.listing() if m.face_count <= low][:CAP]
        assert [r["uid"] for r in narrow] == expected and len(expected) == CAP
        first = requests.get(f"{server.api_base_url}/v3/search", params={"type": "models"}, timeout=10).json()
        assert first["cursors"]["next"] == "24", "search cursors are numeric offsets"
        assert requests.get(f"{server.api_base_url}/v3/search", timeout=10).status_code == 400  # no type


def test_face_count_ranges_partition_the_catalogue(catalog):
    with start_server(catalog) as server:
        bounds = [0, 500, 3000, 20000]
        seen: list[str] = []
        for low, high in zip(bounds, bounds[1:], strict=False):
            part, _ = page_all(
                f"{server.api_base_url}/v3/search", type="models", min_face_count=low, max_face_count=high - 1
            )
            assert all(low <= r["faceCount"] < high for r in part)
            seen += [r["uid"] for r in part]
        rest, _ = page_all(f"{server.api_base_url}/v3/models", min_face_count=bounds[-1])
        seen += [r["uid"] for r in rest]
        assert sorted(seen) == sorted(m.uid for m in catalog.models)
        user = catalog.models[0].user.uid
        mine, _ = page_all(f"{server.api_base_url}/v3/models", user=user)
        assert {r["uid"] for r in mine} == {m.uid for m in catalog.models if m.user.uid == user}
        animated, _ = page_all(f"{server.api_base_url}/v3/search", type="models", animated="true")
        assert {r["uid"] for r in animated} == {m.uid for m in catalog.models if m.animation_count > 0}


def test_refused_filters_get_400_on_the_models_endpoint_only(catalog):
    faults = FaultConfig(refused_filters=frozenset({"min_face_count", "max_face_count"}))
    with start_server(catalog, faults=faults) as server:
        resp = requests.get(f"{server.api_base_url}/v3/models", params={"min_face_count": 10}, timeout=10)
        assert resp.status_code == 400 and "min_face_count" in resp.json()["detail"]
        ok = requests.get(f"{server.api_base_url}/v3/search?type=models&min_face_count=10", timeout=10)
        assert ok.status_code == 200


def test_a_changed_thumbnail_has_new_urls_and_a_new_picture():
    catalog = Catalog.generate(5, seed=42)
    with start_server(catalog) as server:
        uid = catalog.models[2].uid

        def small_image() -> tuple[str, bytes]:
            data = requests.get(f"{server.api_base_url}/v3/models/{uid}", timeout=10).json()
            url = min(data["thumbnails"]["images"], key=lambda i: i["width"])["url"]
            return url, requests.get(url, timeout=10).content

        url, body = small_image()
        server.change_thumbnail(uid)
        new_url, new_body = small_image()
    assert new_url != url and new_body != body and new_body[:2] == b"\xff\xd8"


def test_a_large_catalogue_is_long_tailed_and_renders_nothing_up_front():
    catalog = Catalog.generate(20_000, seed=43)
    faces = sorted(m.face_count for m in catalog.models)
    assert faces[0] < 100 and faces[-1] > 1_000_000 and 1_000 < statistics.median(faces) < 10_000
    categories = Counter(slug for m in catalog.models for _, slug in m.categories)
    uncategorised = sum(not m.categories for m in catalog.models)
    assert len(categories) == 18 and 0.05 < uncategorised / len(catalog.models) < 0.2
    sizes = sorted(categories.values())
    assert sizes[-1] > 20 * sizes[0], "a few large categories, many small ones"
    licenses = Counter(m.license[0] for m in catalog.models)
    assert len(licenses) == 9 and licenses.most_common(1)[0][0] == "by"
    with start_server(catalog) as server:
        requests.get(f"{server.api_base_url}/v3/models", timeout=10).raise_for_status()
        assert server.stats.count("thumbnail") == 0 and server._state.thumbs._size == 0
