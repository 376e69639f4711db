"""The gallery in a real browser: headless Chromium against the app served on loopback.

The app is mounted under the same prefix as in the Airflow API server, so every link
and image URL is exercised the way users follow them. Screenshots are kept in
`test-artifacts/` for people to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from gallery_fixtures import EVIL_NAME, EVIL_VIEWER_URL, fill_database
from helpers import query
from sketchfab_similarity.gallery.app import create_app
from webdriver import Chromium, find_browser, serving

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PREFIX = "/similarity-gallery"


@pytest.fixture
def browser(tmp_path):
    found = find_browser()
    if found is None:
        reason = (
            "BROWSER TEST NOT RUN: headless Chromium is not installed "
            "(apt-get install -y chromium chromium-driver; .ci/run installs them)"
        )
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " and REQUIRE_BROWSER=1")
        pytest.skip(reason)
    chromium = Chromium(*found, profile=tmp_path / "profile")
    yield chromium
    chromium.quit()


@pytest.fixture
def served(make_settings):
    """The gallery on 127.0.0.1 under the API server's prefix."""
    data = fill_database(make_settings)
    with serving(create_app(lambda: data.settings), PREFIX) as base:
        yield data, base


def test_search_a_model_and_see_its_look_alikes(browser, served):
    data, base = served
    browser.get(f"{base}/")
    browser.wait_for(".stat")
    stats = [browser.text(e) for e in browser.find_all(".stat")]
    (models,) = query(data.settings.db_url, "SELECT count(*) FROM sketchfab_models")[0]
    assert f"{models}\nmodels" in stats
    assert all(browser.wait_for_images()), "every thumbnail on the overview loads"
    browser.screenshot(ARTIFACTS / "gallery-overview.png")

    target = data.catalog.models[3]
    browser.type(browser.find("input[name=q]"), target.name[:12])
    browser.click(browser.find("header button[type=submit]"))
    browser.wait_for_url(f"{base}/search")
    browser.wait_for("h1")
    assert "matching" in browser.text(browser.find("h1"))
    hit = next(e for e in browser.find_all("figure") if browser.attribute(e, "data-uid") == target.uid)
    browser.click(browser.find_all("figure a")[browser.find_all("figure").index(hit)])

    browser.wait_for_url(f"{base}/models/")
    browser.wait_for("figure.big")
    assert browser.current_url == f"{base}/models/{target.uid}"
    assert browser.text(browser.find("h1")) == target.name
    expected = query(data.settings.db_url, "SELECT uid, score FROM similar_models(%s, 10)", (target.uid,))
    figures = browser.find_all("figure")
    assert [browser.attribute(f, "data-uid") for f in figures] == [target.uid] + [u for u, _ in expected]
    scores = [browser.text(e) for e in browser.find_all("figure .score")]
    assert scores == [f"{s:.3f}" for _, s in expected]
    assert all(browser.wait_for_images()), "the query's and every recommendation's thumbnail load"
    links = [browser.attribute(e, "href") for e in browser.find_all("figcaption a")]
    assert links and all(link.startswith("https://sketchfab.com/3d-models/") for link in links)
    browser.screenshot(ARTIFACTS / "gallery-model.png")


def test_hostile_model_name_is_shown_as_text(browser, served):
    data, base = served
    browser.get(f"{base}/models/{data.evil_uid}")
    browser.wait_for("h1")
    assert browser.alert_text() is None, "no script ran"
    assert browser.text(browser.find("h1")) == EVIL_NAME
    assert (
        browser.execute("return document.querySelectorAll('main script, main img[src=\"x\"]').length;") == 0
    )
    hrefs = [browser.attribute(e, "href") or "" for e in browser.find_all("a")]
    assert not any(EVIL_VIEWER_URL in h or h.lower().startswith("javascript:") for h in hrefs)

    browser.get(f"{base}/search?q=%3Cscript%3Ealert(%27name%27)")
    browser.wait_for("h1")
    assert browser.alert_text() is None
    assert data.evil_uid in [browser.attribute(f, "data-uid") for f in browser.find_all("figure")]
    browser.screenshot(ARTIFACTS / "gallery-hostile-name.png")
