"""The gallery app against a real database filled by the pipeline stages (HTTP in-process, no browser)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import devenv
import pytest
from fastapi.testclient import TestClient
from gallery_fixtures import EVIL_NAME, EVIL_VIEWER_URL, WILDCARD_NAME, fill_database
from helpers import execute, query
from sketchfab_similarity.core.runs import STAGES
from sketchfab_similarity.core.settings import Settings
from sketchfab_similarity.gallery.app import create_app, render_html

pytestmark = pytest.mark.integration


class Page(HTMLParser):
    """Collects what matters for safety and content: elements, attributes, visible text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for t, attrs in self.tags if t == tag]

    def assert_inert(self) -> None:
        """No scripts, no event handlers, no javascript: URLs anywhere."""
        assert not self.all("script")
        for tag, attrs in self.tags:
            for name, value in attrs.items():
                assert not name.startswith("on"), f"<{tag} {name}=...> handler leaked into the page"
                assert not (value or "").strip().lower().startswith("javascript:"), f"<{tag} {name}={value}>"


@pytest.fixture
def data(make_settings):
    return fill_database(make_settings)


@pytest.fixture
def client(data) -> TestClient:
    return TestClient(create_app(lambda: data.settings), follow_redirects=False)


def latest_run_counts(html: str) -> dict[str, dict[str, str]]:
    """The home page's "Latest run" table: {task: {count: value as shown}}."""
    rows = re.findall(r"<tr><td>([a-z_]+)</td><td>(.*?)</td></tr>", html)
    return {task: dict(pair.split("=", 1) for pair in cells.split(", ") if pair) for task, cells in rows}


def test_home_shows_the_overview_of_tables_and_latest_run(client, data):
    resp = client.get("/")
    assert resp.status_code == 200
    page = Page(resp.text)
    page.assert_inert()
    models, ok, failed, vectors, rows = query(
        data.settings.db_url,
        "SELECT (SELECT count(*) FROM sketchfab_models), "
        "(SELECT count(*) FROM model_thumbnails WHERE status = 'ok'), "
        "(SELECT count(*) FROM model_thumbnails WHERE status = 'failed'), "
        "(SELECT count(*) FROM model_embeddings), (SELECT count(*) FROM model_similarity)",
    )[0]
    text = " ".join(" ".join(page.text).split())
    assert f"{models} models" in text
    assert f"{ok} thumbnails ok" in text
    assert f"{failed} thumbnails failed" in text
    assert f"{vectors} vectors" in text
    (run_id,) = query(data.settings.db_url, "SELECT run_id FROM pipeline_runs")[0]
    assert run_id in text
    (version,) = query(data.settings.db_url, "SELECT DISTINCT feature_version FROM model_similarity")[0]
    assert version in text
    # The latest run's counts, as the run recorded them, agree with what the tables hold.
    shown = latest_run_counts(resp.text)
    assert list(shown) == list(STAGES)
    assert shown["crawl_models"]["upserted"] == str(models)
    assert shown["download_thumbnails"]["fetched"] == str(ok)
    assert shown["download_thumbnails"]["failed"] == str(failed)
    assert shown["extract_features"]["extracted"] == str(vectors)
    assert shown["load_vectors"]["loaded"] == str(vectors)
    assert shown["refresh_similarity"]["rows"] == str(rows)
    assert shown["refresh_similarity"]["published"] == "True"


def test_model_page_shows_the_same_top_k_as_similar_models(client, data):
    uid = data.catalog.models[0].uid
    resp = client.get(f"/models/{uid}", params={"k": 5})
    assert resp.status_code == 200
    page = Page(resp.text)
    page.assert_inert()
    expected = query(data.settings.db_url, "SELECT uid, score FROM similar_models(%s, 5)", (uid,))
    shown = [f["data-uid"] for f in page.all("figure")]
    assert shown == [uid] + [u for u, _ in expected], "query first, then recommendations in rank order"
    for _, score in expected:
        assert f"{score:.3f}" in resp.text
    images = [img["src"] for img in page.all("img")]
    assert images[0] == f"/thumbnails/{uid}"


def test_search_by_name_uid_and_literal_wildcards(client, data):
    target = data.catalog.models[3]
    part = target.name[2:9]
    resp = client.get("/search", params={"q": part})
    assert resp.status_code == 200
    assert target.uid in [f["data-uid"] for f in Page(resp.text).all("figure")]
    execute(
        data.settings.db_url, "UPDATE sketchfab_models SET deleted_at = now() WHERE uid = %s", (target.uid,)
    )
    resp = client.get("/search", params={"q": part})
    assert target.uid not in [f["data-uid"] for f in Page(resp.text).all("figure")], "deleted on Sketchfab"
    execute(
        data.settings.db_url, "UPDATE sketchfab_models SET deleted_at = NULL WHERE uid = %s", (target.uid,)
    )

    resp = client.get("/search", params={"q": target.uid.upper()})
    assert resp.status_code == 303 and resp.headers["location"] == f"/models/{target.uid}"

    resp = client.get("/search", params={"q": "%"})
    assert [f["data-uid"] for f in Page(resp.text).all("figure")] == [data.wildcard_uid], WILDCARD_NAME
    resp = client.get("/search", params={"q": "_"})
    assert [f["data-uid"] for f in Page(resp.text).all("figure")] == [data.wildcard_uid]

    resp = client.get("/search", params={"q": "x" * 201})
    assert resp.status_code == 422


def test_hostile_names_urls_and_queries_are_escaped(client, data):
    for url in (f"/models/{data.evil_uid}", "/search?q=script", "/"):
        resp = client.get(url)
        assert resp.status_code == 200, url
        page = Page(resp.text)
        page.assert_inert()
        assert EVIL_VIEWER_URL not in resp.text
    resp = client.get(f"/models/{data.evil_uid}")
    assert EVIL_NAME in "".join(Page(resp.text).text), "the name is shown as text, verbatim"
    assert "<script>alert" not in resp.text

    reflected = '"><img src=x onerror=alert(2)>'
    resp = client.get("/search", params={"q": reflected})
    page = Page(resp.text)
    page.assert_inert()
    assert page.all("input")[0]["value"] == reflected


def test_security_headers_forbid_scripts(client):
    resp = client.get("/")
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert resp.headers["x-content-type-options"] == "nosniff"


def test_thumbnails_are_served_from_the_store(client, data):
    uid = data.catalog.models[0].uid
    (stored_path,) = query(
        data.settings.db_url, "SELECT stored_path FROM model_thumbnails WHERE uid = %s", (uid,)
    )[0]
    resp = client.get(f"/thumbnails/{uid}")
    assert resp.status_code == 200
    assert resp.content == (Path(data.settings.thumbnail_store) / stored_path).read_bytes()
    assert resp.headers["content-type"] in ("image/jpeg", "image/png", "image/webp", "image/gif")
    assert client.get(f"/thumbnails/{'0' * 32}").status_code == 404
    assert client.get("/thumbnails/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_unknown_and_malformed_uids_get_404(client):
    assert client.get(f"/models/{'f' * 32}").status_code == 404
    assert client.get("/models/not-a-uid").status_code == 404
    assert client.get(f"/models/{'f' * 32}?k=0").status_code == 422


def test_empty_database_explains_what_to_do(pg_uri, tmp_path):
    db_url, _ = devenv.create_database(pg_uri, "gallery_empty")
    settings = Settings(db_url=db_url, thumbnail_store=str(tmp_path))
    client = TestClient(create_app(lambda: settings))
    resp = client.get("/")
    assert resp.status_code == 200 and "No run has finished yet" in resp.text
    resp = client.get(f"/models/{'a' * 32}")
    assert resp.status_code == 503 and "trigger the DAG" in resp.text


def test_missing_connection_is_a_clear_503(tmp_path):
    def no_connection() -> Settings:
        raise RuntimeError("Airflow connection 'similarity_db' is not defined: point it at a Postgres")

    resp = TestClient(create_app(no_connection)).get("/")
    assert resp.status_code == 503 and "similarity_db" in resp.text


def test_static_page_for_the_demo_is_escaped(data):
    from sketchfab_similarity.gallery.queries import get_model, similar_models

    card = get_model(data.settings.db_url, data.evil_uid)
    html = render_html(
        "demo <b>", [(card, similar_models(data.settings.db_url, card.uid, 3))], lambda uid: None
    )
    page = Page(html)
    page.assert_inert()
    assert EVIL_NAME in "".join(page.text) and "demo <b>" in "".join(page.text)
