"""The fake Sketchfab server, exercised over real HTTP on 127.0.0.1 (port 0).

The pipeline's crawler and downloader tests trust this server to behave like the
real API and to produce exactly the faults it claims; these tests hold it to that.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import requests
from fake_sketchfab import (
    SHAPE_CLASSES,
    THUMBNAIL_SIZES,
    Catalog,
    FaultConfig,
    RunningServer,
    ThumbnailFault,
    object_mask,
    render_thumbnail,
    start_server,
)
from fake_sketchfab.catalog import SQL_NAME, UNICODE_NAME
from fake_sketchfab.render import encode_jpeg
from PIL import Image, UnidentifiedImageError

UID_RE = re.compile(r"[0-9a-f]{32}")
TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}")
TIMEOUT = 10


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.generate(64, seed=7)


@pytest.fixture(scope="module")
def server(catalog: Catalog) -> Iterator[RunningServer]:
    """A shared, never-mutated server; tests that publish or remove start their own."""
    with start_server(catalog) as srv:
        yield srv


def get(url: str, **params: Any) -> requests.Response:
    return requests.get(url, params=params or None, timeout=TIMEOUT, allow_redirects=False)


def crawl(srv: RunningServer, between_pages: Any = None, **params: Any) -> list[dict[str, Any]]:
    """Follow ``next`` from the first page; ``between_pages(n)`` runs after page n."""
    pages: list[dict[str, Any]] = []
    url: str | None = f"{srv.api_base_url}/v3/models"
    query: dict[str, Any] = {"sort_by": "-publishedAt", **params}
    while url:
        response = get(url, **query)
        assert response.status_code == 200, response.text[:200]
        pages.append(response.json())
        if between_pages:
            between_pages(len(pages))
        url, query = pages[-1]["next"], {}
    return pages


def uids_of(pages: list[dict[str, Any]]) -> list[str]:
    return [m["uid"] for page in pages for m in page["results"]]


def test_catalog_is_deterministic_and_balanced() -> None:
    a, b, other = Catalog.generate(40, seed=3), Catalog.generate(40, seed=3), Catalog.generate(40, seed=4)
    assert [m.uid for m in a.models] == [m.uid for m in b.models]
    dump = [Catalog.model_json(m, "http://api", "http://media") for m in a.models]
    assert dump == [Catalog.model_json(m, "http://api", "http://media") for m in b.models]
    assert not {m.uid for m in a.models} & {m.uid for m in other.models}
    # A smaller catalog is a prefix of a larger one with the same seed.
    assert [m.uid for m in Catalog.generate(16, seed=3).models] == [m.uid for m in a.models[:16]]
    assert len(SHAPE_CLASSES) >= 8
    assert Counter(m.shape_class for m in a.models) == {s: 5 for s in SHAPE_CLASSES}


def test_timeline_is_newest_first_about_seven_minutes_apart(catalog: Catalog) -> None:
    published = [m.published_at for m in catalog.models]
    assert published == sorted(published, reverse=True)
    assert all(m.created_at < m.published_at for m in catalog.models)
    mean_gap = (published[0] - published[-1]) / (len(published) - 1)
    assert 5 * 60 < mean_gap.total_seconds() < 9 * 60
    assert published[0] <= datetime(2026, 11, 27, 12, 0)


@pytest.mark.integration
def test_model_objects_follow_the_api_doc(server: RunningServer, catalog: Catalog) -> None:
    results = get(f"{server.api_base_url}/v3/models").json()["results"]
    assert len(results) == 24
    for data in results:
        model = catalog.by_uid[data["uid"]]
        assert UID_RE.fullmatch(data["uid"])
        assert TIMESTAMP_RE.fullmatch(data["publishedAt"]) and TIMESTAMP_RE.fullmatch(data["createdAt"])
        assert datetime.fromisoformat(data["createdAt"]) < datetime.fromisoformat(data["publishedAt"])
        if model.categories:  # some models are in no category, as on Sketchfab
            assert data["categories"][0] == {"name": model.shape_class.title(), "slug": model.shape_class}
        else:
            assert data["categories"] == []
        assert model.shape_class in {t["slug"] for t in data["tags"]}
        assert "shape_class" not in json.dumps(data)
        assert data["uri"] == f"{server.api_base_url}/v3/models/{model.uid}"
        assert data["viewerUrl"].startswith("https://sketchfab.com/3d-models/")
        assert data["viewerUrl"].endswith(model.uid)
        assert set(data["user"]) == {"uid", "username", "displayName"}
        images = data["thumbnails"]["images"]
        assert {(i["width"], i["height"]) for i in images} == set(THUMBNAIL_SIZES)
        for image in images:
            url = urlsplit(image["url"])
            assert (url.hostname, url.port) == ("localhost", server.port)
            assert UID_RE.fullmatch(image["uid"]) and image["size"] > 0
    assert len({tuple(i["width"] for i in d["thumbnails"]["images"]) for d in results}) > 1, "order shuffled"


@pytest.mark.integration
def test_pagination_visits_every_model_once(server: RunningServer, catalog: Catalog) -> None:
    pages = crawl(server, count=10)
    assert uids_of(pages) == [m.uid for m in catalog.models]
    assert [len(p["results"]) for p in pages] == [10] * 6 + [4]
    first_next = urlsplit(pages[0]["next"])
    assert f"{first_next.scheme}://{first_next.netloc}" == server.api_base_url
    query = parse_qs(first_next.query)
    assert query["sort_by"] == ["-publishedAt"] and query["count"] == ["10"]
    assert query["cursor"] == [pages[0]["cursors"]["next"]]
    assert not pages[0]["cursors"]["next"].isdigit()
    assert pages[0]["previous"] is None and pages[-1]["next"] is None
    back = get(pages[1]["previous"]).json()
    assert back["results"] == pages[0]["results"]


@pytest.mark.integration
def test_count_is_clamped_to_24(server: RunningServer) -> None:
    assert len(get(f"{server.api_base_url}/v3/models", count=100).json()["results"]) == 24
    assert len(get(f"{server.api_base_url}/v3/models").json()["results"]) == 24
    assert len(get(f"{server.api_base_url}/v3/models", count=3).json()["results"]) == 3


@pytest.mark.integration
@pytest.mark.parametrize(
    ("sort_by", "field"),
    [
        ("-likeCount", "likeCount"),
        ("likeCount", "likeCount"),
        ("-viewCount", "viewCount"),
        ("-createdAt", "createdAt"),
    ],
)
def test_sort_orders(server: RunningServer, catalog: Catalog, sort_by: str, field: str) -> None:
    pages = crawl(server, sort_by=sort_by)
    keys = [m[field] for page in pages for m in page["results"]]
    assert keys == sorted(keys, reverse=sort_by.startswith("-"))
    assert sorted(uids_of(pages)) == sorted(m.uid for m in catalog.models)


@pytest.mark.integration
def test_filters(server: RunningServer, catalog: Catalog) -> None:
    def listed(**params: Any) -> set[str]:
        return set(uids_of(crawl(server, **params)))

    def expected(predicate: Any) -> set[str]:
        uids = {m.uid for m in catalog.models if predicate(m)}
        assert uids, "a filter test needs matches"
        return uids

    assert listed(categories="cube") == expected(lambda m: ("Cube", "cube") in m.categories)
    tag_pair = catalog.models[0].tags[:2]
    assert listed(tags=",".join(tag_pair)) == expected(lambda m: set(tag_pair) <= set(m.tags))
    word = catalog.models[0].name.split()[0]
    assert listed(q=word.upper()) == expected(lambda m: word.lower() in m.name.lower())
    assert listed(downloadable="false") == expected(lambda m: not m.is_downloadable)
    assert listed(staffpicked="true") == expected(lambda m: m.staffpicked_at is not None)
    assert listed(categories="sphere", downloadable="true") == expected(
        lambda m: ("Sphere", "sphere") in m.categories and m.is_downloadable
    )
    for bad in ({"sort_by": "-bogus"}, {"cursor": "not-a-cursor"}, {"staffpicked": "maybe"}, {"count": "x"}):
        assert get(f"{server.api_base_url}/v3/models", **bad).status_code == 400


@pytest.mark.integration
def test_detail_and_not_found(server: RunningServer, catalog: Catalog) -> None:
    model = catalog.models[3]
    response = get(f"{server.api_base_url}/v3/models/{model.uid}")
    assert response.status_code == 200
    assert response.json() == Catalog.model_json(model, server.api_base_url, server.media_base_url)
    for path in (f"/v3/models/{'0' * 32}", "/v3/nothing"):
        missing = get(server.api_base_url + path)
        assert missing.status_code == 404 and missing.json() == {"detail": "Not found."}
    for name in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
        assert response.headers[name].isdigit()


@pytest.mark.integration
def test_thumbnails_decode_as_jpeg_at_listed_sizes(server: RunningServer, catalog: Catalog) -> None:
    for model in catalog.models[:2]:
        data = get(f"{server.api_base_url}/v3/models/{model.uid}").json()
        for image in data["thumbnails"]["images"]:
            response = get(image["url"])
            assert response.status_code == 200
            assert response.headers["Content-Type"] == "image/jpeg"
            assert int(response.headers["Content-Length"]) == len(response.content)
            with Image.open(io.BytesIO(response.content)) as img:
                img.load()
                assert img.format == "JPEG" and img.mode == "RGB"
                assert img.size == (image["width"], image["height"])
                assert img.width * 9 == img.height * 16
    assert server.stats.count("thumbnail", 200) >= 8


def test_classes_have_distinct_silhouettes() -> None:
    """1-nearest-neighbour on normalised silhouettes must beat chance (1/8) by far."""

    def silhouette(mask: np.ndarray) -> np.ndarray:
        ys, xs = np.nonzero(mask)
        crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        side = max(crop.shape)
        square = np.zeros((side, side), np.uint8)
        top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
        square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop * 255
        return np.asarray(Image.fromarray(square).resize((24, 24), Image.BILINEAR), np.float32).ravel()

    per_class = 6
    features, labels = [], []
    for label, shape in enumerate(SHAPE_CLASSES):
        for k in range(per_class):
            mask = object_mask(shape, 100 * label + k, 128, 72)
            assert 0.02 < mask.mean() < 0.6, (shape, k, mask.mean())
            features.append(silhouette(mask))
            labels.append(label)
    x, y = np.array(features), np.array(labels)
    dist = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    accuracy = (y[dist.argmin(axis=1)] == y).mean()
    assert accuracy >= 0.6, accuracy
    # Same seed, different class: the pictures differ.
    images = [np.asarray(render_thumbnail(s, 5, 128, 72), np.int16) for s in SHAPE_CLASSES]
    assert all(np.abs(a - b).mean() > 3 for i, a in enumerate(images) for b in images[i + 1 :])


@pytest.mark.integration
def test_publish_mid_crawl_shifts_pages() -> None:
    catalog = Catalog.generate(50, seed=1)
    original = [m.uid for m in catalog.models]
    with start_server(catalog) as srv:
        published: list[str] = []

        def publish_after_first_page(n: int) -> None:
            if n == 1:
                published.extend(m.uid for m in srv.publish(3))

        pages = crawl(srv, publish_after_first_page, count=10)
        seen = uids_of(pages)
        assert seen[10:13] == seen[7:10], "offset cursors shift by the number of new models"
        assert set(seen) == set(original) and len(seen) == 53
        assert not set(published) & set(seen)
        head = get(f"{srv.api_base_url}/v3/models", count=5).json()["results"]
        assert [m["uid"] for m in head[:3]] == published
        newest_original = max(catalog.by_uid[u].published_at for u in original)
        assert datetime.fromisoformat(head[2]["publishedAt"]) > newest_original


@pytest.mark.integration
def test_remove_hides_a_model() -> None:
    catalog = Catalog.generate(30, seed=2)
    gone = catalog.models[4]
    with start_server(catalog) as srv:
        srv.remove(gone.uid)
        assert get(f"{srv.api_base_url}/v3/models/{gone.uid}").status_code == 404
        assert get(f"{srv.media_base_url}/media/models/{gone.uid}/thumbnails/256x144.jpeg").status_code == 404
        seen = uids_of(crawl(srv))
        assert gone.uid not in seen and len(seen) == 29
        assert catalog.by_uid[gone.uid].shape_class in SHAPE_CLASSES


@pytest.mark.integration
def test_token_is_checked_and_counted(catalog: Catalog) -> None:
    with start_server(catalog, token="s3cret") as srv:
        url = f"{srv.api_base_url}/v3/models"
        assert requests.get(url, timeout=TIMEOUT).status_code == 200
        assert (
            requests.get(url, headers={"Authorization": "Token s3cret"}, timeout=TIMEOUT).status_code == 200
        )
        bad = requests.get(url, headers={"Authorization": "Token nope"}, timeout=TIMEOUT)
        assert bad.status_code == 401
        assert (srv.stats.with_token, srv.stats.without_token) == (2, 1)
        assert srv.stats.snapshot() == {"list 200": 2, "list 401": 1}


@pytest.mark.integration
def test_rate_limit_bursts(catalog: Catalog) -> None:
    faults = FaultConfig(rate_limit_every=3, rate_limit_burst=2, retry_after_s=0)
    with start_server(catalog, faults=faults) as srv:
        responses = [get(f"{srv.api_base_url}/v3/models", count=1) for _ in range(8)]
        assert [r.status_code for r in responses] == [200, 200, 429, 429, 200, 200, 429, 429]
        throttled = [r for r in responses if r.status_code == 429]
        assert all(r.headers["Retry-After"] == "0" and "X-RateLimit-Reset" in r.headers for r in throttled)
        srv.set_faults(FaultConfig())
        assert get(f"{srv.api_base_url}/v3/models", count=1).status_code == 200


@pytest.mark.integration
def test_rate_limit_per_minute(catalog: Catalog) -> None:
    with start_server(catalog, faults=FaultConfig(rate_limit_per_minute=3)) as srv:
        responses = [get(f"{srv.api_base_url}/v3/models/{catalog.models[0].uid}") for _ in range(4)]
        assert [r.status_code for r in responses] == [200, 200, 200, 429]
        assert [r.headers["X-RateLimit-Remaining"] for r in responses] == ["2", "1", "0", "0"]
        assert 1 <= int(responses[-1].headers["Retry-After"]) <= 60


@pytest.mark.integration
def test_server_errors_follow_a_deterministic_pattern(catalog: Catalog) -> None:
    with start_server(catalog, faults=FaultConfig(server_error_rate=0.25)) as srv:
        statuses = [get(f"{srv.api_base_url}/v3/models", count=1).status_code for _ in range(12)]
        failed = [i + 1 for i, s in enumerate(statuses) if s != 200]
        assert failed == [4, 8, 12]
        assert {statuses[i - 1] for i in failed} == {500, 502, 503}


@pytest.mark.integration
def test_html_200_every_nth_page(catalog: Catalog) -> None:
    with start_server(catalog, faults=FaultConfig(html_200_every=2)) as srv:
        responses = [get(f"{srv.api_base_url}/v3/models", count=1) for _ in range(4)]
        assert [r.status_code for r in responses] == [200] * 4
        kinds = [r.headers["Content-Type"].split(";")[0] for r in responses]
        assert kinds == ["application/json", "text/html"] * 2
        with pytest.raises(ValueError):
            responses[1].json()


@pytest.mark.integration
def test_shift_on_page_publishes_once(catalog: Catalog) -> None:
    own = Catalog.generate(50, seed=4)
    with start_server(own, faults=FaultConfig(shift_on_page=2, shift_publish=4)) as srv:
        pages = crawl(srv, count=10)
        assert uids_of(pages[2:3])[:4] == uids_of(pages[1:2])[-4:]
        assert len(own.models) == 54 and len(set(uids_of(pages))) == 50
        again = uids_of(crawl(srv, count=10))
        assert len(again) == len(set(again)) == 54


@pytest.mark.integration
def test_offsite_next_on_page(catalog: Catalog) -> None:
    with start_server(catalog, faults=FaultConfig(offsite_next_on_page=2)) as srv:
        first = get(f"{srv.api_base_url}/v3/models", count=10).json()
        assert first["next"].startswith(srv.api_base_url)
        second = get(first["next"]).json()
        assert second["next"].startswith("http://evil.example.invalid/v3/models?")
        assert parse_qs(urlsplit(second["next"]).query)["cursor"] == [second["cursors"]["next"]]


@pytest.mark.integration
def test_latency_is_added(catalog: Catalog, monkeypatch) -> None:
    from fake_sketchfab import server as server_module

    slept: list[float] = []
    monkeypatch.setattr(server_module.time, "sleep", slept.append)  # the server's own delay, recorded
    with start_server(catalog, faults=FaultConfig(latency_ms=50)) as srv:
        assert get(f"{srv.api_base_url}/v3/models", count=1).status_code == 200
    assert 0.05 in slept


@pytest.mark.integration
def test_broken_thumbnails_fail_as_labelled() -> None:
    catalog = Catalog.generate(40, seed=2, faults=FaultConfig(broken_thumbnails=True))
    by_fault = {m.thumbnail_fault: m for m in catalog.models}
    assert set(by_fault) == {None, *ThumbnailFault}
    with start_server(catalog) as srv:

        def fetch(fault: ThumbnailFault | None) -> requests.Response:
            data = get(f"{srv.api_base_url}/v3/models/{by_fault[fault].uid}").json()
            if fault is ThumbnailFault.NO_THUMBNAILS:
                assert data["thumbnails"]["images"] == []
                return get(f"{srv.media_base_url}/media/models/{data['uid']}/thumbnails/720x405.jpeg")
            url = next(i["url"] for i in data["thumbnails"]["images"] if i["width"] == 720)
            return get(url)

        def decode(body: bytes) -> None:
            with Image.open(io.BytesIO(body)) as img:
                img.load()

        def content_type(r: requests.Response) -> str:
            return r.headers["Content-Type"].split(";")[0]

        decode(fetch(None).content)
        assert fetch(ThumbnailFault.NO_THUMBNAILS).status_code == 404
        assert fetch(ThumbnailFault.NOT_FOUND).status_code == 404
        truncated = fetch(ThumbnailFault.TRUNCATED_JPEG)
        assert truncated.status_code == 200 and truncated.content.startswith(b"\xff\xd8")
        with pytest.raises(OSError):
            decode(truncated.content)
        html = fetch(ThumbnailFault.HTML_200)
        assert (html.status_code, content_type(html)) == (200, "text/html")
        empty = fetch(ThumbnailFault.ZERO_BYTES)
        assert (empty.status_code, empty.content, content_type(empty)) == (200, b"", "image/jpeg")
        bomb = fetch(ThumbnailFault.HUGE_DIMENSIONS)
        assert bomb.status_code == 200 and len(bomb.content) < 2000
        with pytest.raises(Image.DecompressionBombError):
            decode(bomb.content)
        redirect = fetch(ThumbnailFault.REDIRECT_OFFSITE)
        assert redirect.status_code == 302
        assert urlsplit(redirect.headers["Location"]).hostname not in ("localhost", "127.0.0.1")
        wrong = fetch(ThumbnailFault.WRONG_CONTENT_TYPE)
        assert (wrong.status_code, content_type(wrong)) == (200, "text/plain")
        with pytest.raises(UnidentifiedImageError):
            decode(wrong.content)

    uid = catalog.models[0].uid  # same uid in any catalog of seed 2
    explicit = Catalog.generate(
        10, seed=2, faults=FaultConfig(thumbnail_faults={uid: ThumbnailFault.ZERO_BYTES})
    )
    assert explicit.by_uid[uid].thumbnail_fault is ThumbnailFault.ZERO_BYTES


@pytest.mark.integration
def test_disappearing_models_are_listed_but_404() -> None:
    catalog = Catalog.generate(30, seed=5, faults=FaultConfig(disappearing_models=2))
    assert len(catalog.disappearing_uids) == 2
    with start_server(catalog) as srv:
        assert catalog.disappearing_uids <= set(uids_of(crawl(srv)))
        for uid in catalog.disappearing_uids:
            assert get(f"{srv.api_base_url}/v3/models/{uid}").status_code == 404
        live = next(m.uid for m in catalog.models if not m.disappears)
        assert get(f"{srv.api_base_url}/v3/models/{live}").status_code == 200
        srv.set_faults(FaultConfig(disappearing_uids=frozenset({live})))
        assert get(f"{srv.api_base_url}/v3/models/{live}").status_code == 404


@pytest.mark.integration
def test_bad_records_are_listed_with_honest_verdicts() -> None:
    catalog = Catalog.generate(40, seed=6, faults=FaultConfig(bad_records=True))

    def looks_valid(record: dict[str, Any]) -> bool:
        try:
            datetime.fromisoformat(record["publishedAt"])
        except ValueError:
            return False
        return bool(UID_RE.fullmatch(record.get("uid", ""))) and len(record["name"]) <= 10_000

    with start_server(catalog) as srv:
        results = [m for page in crawl(srv) for m in page["results"]]
        invalid = [r for r in catalog.bad_records if not r.valid]
        assert len(results) == len(catalog.models) + len(invalid)
        assert {r.kind for r in catalog.bad_records} >= {
            "sql_name",
            "unicode_name",
            "missing_uid",
            "huge_name",
        }
        for record in catalog.bad_records:
            served = Catalog.model_json(record.model, srv.api_base_url, srv.media_base_url)
            assert results.count(served) == 1, record.kind
            assert looks_valid(served) == record.valid, record.kind
        names = {m.get("uid"): m["name"] for m in results}
        assert SQL_NAME in names.values() and UNICODE_NAME in names.values()
        assert sum(looks_valid(m) for m in results) == len(catalog.models)


def test_fault_config_parse() -> None:
    faults = FaultConfig.parse("rate_limit_every=10, broken_thumbnails,latency_ms=20.5,disappearing_uids=a+b")
    assert faults == FaultConfig(
        rate_limit_every=10, broken_thumbnails=True, latency_ms=20.5, disappearing_uids=frozenset({"a", "b"})
    )
    assert FaultConfig.parse("bad_records=false") == FaultConfig()
    with pytest.raises(ValueError):
        FaultConfig.parse("no_such_fault=1")


@pytest.mark.integration
def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    tools = str(Path(__file__).resolve().parents[1] / "tools")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tools, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "fake_sketchfab", "--models", "12", "--seed", "5", "--port", "0"]
    proc = subprocess.Popen([*cmd, "--ready-file", str(ready)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert (
            info["media_host"] == "localhost" and info["api_base_url"] == f"http://127.0.0.1:{info['port']}"
        )
        results = get(f"{info['api_base_url']}/v3/models").json()["results"]
        expected = Catalog.generate(12, seed=5).models
        assert [m["uid"] for m in results] == [m.uid for m in expected]
        # Same pixels from another process: rendering depends on the seed only.
        body = get(f"http://localhost:{info['port']}/media/models/{expected[0].uid}/thumbnails/256x144.jpeg")
        local = render_thumbnail(expected[0].shape_class, expected[0].params_seed, 256, 144)
        assert body.content == encode_jpeg(local)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert f"api_base_url={info['api_base_url']}" in out and "media_host=localhost" in out


@pytest.mark.integration
def test_rate_limit_window_is_configurable_and_reset_is_not_early(catalog: Catalog) -> None:
    faults = FaultConfig(rate_limit_per_minute=2, rate_limit_window_s=0.5)
    with start_server(catalog, faults=faults) as srv:
        url = f"{srv.api_base_url}/v3/models/{catalog.models[0].uid}"
        started = time.time()
        responses = [get(url) for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 429]
        assert all(int(r.headers["X-RateLimit-Reset"]) >= started + 0.5 for r in responses)
        srv._state.window_start -= faults.rate_limit_window_s  # the window passes (no sleeping)
        assert get(url).status_code == 200


@pytest.mark.integration
def test_list_outage_after_n_listing_requests(catalog: Catalog) -> None:
    with start_server(catalog, faults=FaultConfig(list_outage_after=2)) as srv:
        statuses = [get(f"{srv.api_base_url}/v3/models", count=1).status_code for _ in range(4)]
        assert statuses == [200, 200, 503, 503]
        assert get(f"{srv.api_base_url}/v3/models/{catalog.models[0].uid}").status_code == 200
        srv.set_faults(FaultConfig())
        assert get(f"{srv.api_base_url}/v3/models", count=1).status_code == 200


@pytest.mark.integration
def test_media_errors_redirects_and_served_bodies(catalog: Catalog) -> None:
    model = catalog.models[0]
    thumb = f"/media/models/{model.uid}/thumbnails/256x144.jpeg"
    with start_server(catalog, faults=FaultConfig(media_error_rate=0.5)) as srv:
        statuses = [get(f"{srv.media_base_url}{thumb}").status_code for _ in range(4)]
        assert statuses == [200, 500, 200, 503]
        assert get(f"{srv.api_base_url}/v3/models", count=1).status_code == 200, "the API is unaffected"

        srv.set_faults(FaultConfig(thumbnail_redirect="http://localhost:{port}{path}?redirected=1"))
        hop = get(f"{srv.media_base_url}{thumb}")
        assert (
            hop.status_code == 302 and hop.headers["Location"] == f"{srv.media_base_url}{thumb}?redirected=1"
        )
        assert get(hop.headers["Location"]).headers["Content-Type"] == "image/jpeg"

        srv.set_faults(FaultConfig(thumbnail_bodies={model.uid: ("image/png", b"\x89PNG fake")}))
        served = get(f"{srv.media_base_url}{thumb}")
        assert (served.status_code, served.headers["Content-Type"], served.content) == (
            200,
            "image/png",
            b"\x89PNG fake",
        )
    parsed = FaultConfig.parse(
        "media_error_rate=0.5,list_outage_after=3,rate_limit_window_s=2,thumbnail_redirect=x"
    )
    assert (parsed.media_error_rate, parsed.list_outage_after, parsed.rate_limit_window_s) == (0.5, 3, 2.0)
    with pytest.raises(ValueError):
        FaultConfig.parse("thumbnail_bodies=x")
