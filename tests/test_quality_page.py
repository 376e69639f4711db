"""The gallery's Quality page in headless Chromium: charts, top hubs, near-duplicates, history."""

from __future__ import annotations

import pytest
from fake_sketchfab import Catalog, FaultConfig, start_server
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers import model_jpeg, query
from sketchfab_similarity import crawl, evaluation, features, similarity, thumbnails, vectors
from sketchfab_similarity.gallery.app import create_app
from test_gallery_browser import ARTIFACTS, PREFIX, browser  # noqa: F401 (fixture)
from webdriver import serving

pytestmark = pytest.mark.integration


@pytest.fixture
def evaluated(make_settings):
    """24 models through the stages (models 0 and 1 share a picture), evaluated twice."""
    catalog = Catalog.generate(24, seed=8)
    same = ("image/jpeg", model_jpeg(catalog.models[0]))
    with start_server(
        catalog, faults=FaultConfig(thumbnail_bodies={m.uid: same for m in catalog.models[:2]})
    ) as server:
        settings = make_settings(
            api_base_url=server.api_base_url, thumbnail_hosts=(server.media_host,), top_n=20
        )
        crawl.crawl(settings, crawl.CrawlWindow())
        thumbnails.download_thumbnails(settings)
    extracted = features.extract_features(settings)
    vectors.load_vectors(settings, extracted.files)
    similarity.refresh_similarity(settings)
    evaluation.evaluate(settings, run_id="manual__first")
    latest = evaluation.evaluate(settings.with_overrides(hubness_rerank="csls"), run_id="manual__second")
    return catalog, settings, latest


@pytest.fixture
def served(evaluated):
    catalog, settings, latest = evaluated
    with serving(create_app(lambda: settings), PREFIX) as base:
        yield catalog, settings, latest, base


def test_quality_page_shows_curves_hubs_duplicates_and_history(browser, served):  # noqa: F811
    catalog, settings, latest, base = served
    browser.get(f"{base}/")
    browser.click(browser.find("header a.nav"))
    browser.wait_for_url(f"{base}/quality")
    browser.wait_for("#precision-chart svg")
    assert browser.alert_text() is None

    # One curve per method, the CSLS one included, in the precision chart.
    series = [browser.attribute(e, "data-series") for e in browser.find_all("#precision-chart polyline")]
    assert series == ["published", "random", "colour", "csls"]
    assert len(browser.find_all("#precision-chart circle")) == 4 * 4, "k = 1, 5, 10, 20 for each method"
    cells = {
        browser.attribute(r, "data-method"): browser.text(r)
        for r in browser.find_all("#methods tr[data-method]")
    }
    assert f"{latest['methods']['published']['precision']['10']:.3f}" in cells["published"]
    # Hubness histogram: one bar per bin, models add up to the catalogue.
    assert browser.find_all("#hubness-chart rect.bar")
    # Top hubs as thumbnails, in the evaluation's order, every image loaded.
    hubs = [browser.attribute(f, "data-uid") for f in browser.find_all("#hubs figure")]
    assert hubs == [uid for uid, _ in latest["hubness"]["top_hubs"]]
    assert all(browser.wait_for_images()), "every hub and duplicate thumbnail loads"
    # The near-duplicate pair side by side.
    pair = [browser.attribute(f, "data-uid") for f in browser.find_all("#duplicates .pair figure")]
    assert sorted(pair) == sorted(m.uid for m in catalog.models[:2])
    # History: both evaluations, newest first in the table, two points per line in the chart.
    history = [browser.text(r) for r in browser.find_all("#history tr")][1:]
    assert len(history) == 2 and "manual__second" in history[0] and "manual__first" in history[1]
    line = browser.find("#history-chart polyline[data-series=published]")
    assert len(browser.attribute(line, "points").split()) == 2
    browser.screenshot(ARTIFACTS / "gallery-quality.png")
    browser.execute("document.getElementById('hubness-chart').scrollIntoView();")
    browser.screenshot(ARTIFACTS / "gallery-quality-hubs.png")


def test_quality_page_before_any_evaluation(make_settings):
    settings = make_settings()
    root = FastAPI()
    root.mount(PREFIX, create_app(lambda: settings))
    page = TestClient(root).get(f"{PREFIX}/quality")
    assert page.status_code == 200
    assert "No evaluation yet" in page.text and "sketchfab_similarity_evaluation" in page.text
    assert query(settings.db_url, "SELECT count(*) FROM similarity_quality") == [(0,)]
