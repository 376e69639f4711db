"""Unit tests of the API client and the crawl's pure decisions (canned responses, no network)."""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import requests
from sketchfab_similarity import crawl, tasks
from sketchfab_similarity.core.httpretry import make_retry
from sketchfab_similarity.core.settings import Settings, parse_variable
from sketchfab_similarity.crawl import crawler, sketchfab
from sketchfab_similarity.crawl.crawler import (
    Checkpoint,
    CrawlFilters,
    CrawlStats,
    CrawlWindow,
    classify_page,
)
from sketchfab_similarity.crawl.sketchfab import SketchfabAPIError, SketchfabClient
from urllib3 import HTTPResponse

BASE = "https://api.sketchfab.com"
UID = "9006d26492f44177b4151ce18a4a506c"


def response(
    status: int = 200, body: bytes | str = b"{}", ctype: str = "application/json", **headers
) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.headers.update({"Content-Type": ctype, **{k.replace("_", "-"): v for k, v in headers.items()}})
    resp.raw = io.BytesIO(body.encode() if isinstance(body, str) else body)
    return resp


class CannedSession(requests.Session):
    """Answers GETs from a list, recording the URLs asked for."""

    def __init__(self, *answers: requests.Response) -> None:
        super().__init__()
        self.answers = list(answers)
        self.urls: list[str] = []

    def get(self, url, **kw):
        self.urls.append(url)
        return self.answers.pop(0)


def client(*answers: requests.Response, **kw) -> SketchfabClient:
    return SketchfabClient(BASE, "tok", session=CannedSession(*answers), backoff_s=0.0, **kw)


def envelope(results=(), next_url=None) -> str:
    return json.dumps({"results": list(results), "next": next_url, "previous": None, "cursors": {}})


def test_retry_after_is_capped_and_the_cap_survives_increments():
    retry = make_retry(retries=3, backoff_s=0.1, retry_after_cap_s=2.5)
    throttled = HTTPResponse(status=429, headers={"Retry-After": "3600"})
    assert retry.get_retry_after(throttled) == 2.5
    later = retry.increment("GET", "/v3/models", response=throttled)
    assert later.retry_after_cap == 2.5 and later.get_retry_after(throttled) == 2.5
    assert retry.is_retry("GET", 503) and retry.is_retry("GET", 429) and not retry.is_retry("GET", 404)
    assert not retry.is_retry("POST", 503)


def test_a_page_follows_only_its_own_origin():
    c = client(response(body=envelope([{"uid": UID}], f"{BASE}/v3/models?cursor=abc")))
    page = c.get_page(c.models_url(count=100, categories="cars", tags=None))
    assert page.results == [{"uid": UID}] and page.next_url == f"{BASE}/v3/models?cursor=abc"
    assert c.session.urls == [f"{BASE}/v3/models?sort_by=-publishedAt&count=24&categories=cars"]
    for other in ("http://api.sketchfab.com/v3/models", "https://api.sketchfab.com:8443/v3/models",
                  "https://evil.example/v3/models", "https://api.sketchfab.com.evil.example/v3/models"):  # fmt: skip
        with pytest.raises(SketchfabAPIError, match="Refusing to follow"):
            c.get_page(other)
    c.check_same_origin("https://API.Sketchfab.com/v3/models?cursor=x")  # host case does not matter


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (response(body="[]"), "expected a listing envelope with a 'results' list, got list"),
        (response(body='{"results": "nope"}'), r"got \['results'\]"),
        (response(body='{"results": [], "next": 5}'), "'next' is not a URL"),
        (
            response(401, '{"detail": "Invalid token."}'),
            "HTTP 401; check the sketchfab_api connection's token",
        ),
        (
            response(301, "", Location="https://elsewhere/"),
            "HTTP 301 redirect, which the crawler does not follow",
        ),
        (response(404, '{"detail": "Not found."}'), r"HTTP 404: '\{\"detail\""),
        (response(503, "down"), "HTTP 503 after retries"),
    ],
)
def test_wrong_answers_are_clear_errors(answer, message):
    with pytest.raises(SketchfabAPIError, match=message):
        client(answer).get_page(f"{BASE}/v3/models")


def test_non_json_200_is_retried_then_reported():
    html = response(body="<html>502 Bad Gateway</html>", ctype="text/html")
    good = response(body=envelope())
    assert client(html, good, body_retries=1).get_page(f"{BASE}/v3/models").results == []
    broken = [response(body='{"results": [', ctype="application/json") for _ in range(3)]
    with pytest.raises(SketchfabAPIError, match="invalid JSON.*still so after 3 attempts"):
        client(*broken, body_retries=2).get_page(f"{BASE}/v3/models")


def test_oversized_response_is_refused(monkeypatch):
    monkeypatch.setattr(sketchfab, "MAX_PAGE_BYTES", 1000)
    with pytest.raises(SketchfabAPIError, match="larger than 1000 bytes"):
        client(response(body=envelope([{"name": "x" * 2000}]))).get_page(f"{BASE}/v3/models")


def test_pacing_spreads_the_remaining_budget_until_reset(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(sketchfab.time, "sleep", slept.append)
    c = client(max_pace_sleep_s=30.0, pace_below=3)
    c._pace(response(X_RateLimit_Remaining="10", X_RateLimit_Reset=str(int(time.time()) + 20)))
    assert slept == []
    c._pace(response(X_RateLimit_Remaining="1", X_RateLimit_Reset="6"))  # seconds from now
    assert slept[-1] == pytest.approx((6 + sketchfab.RESET_MARGIN_S) / 2)
    c._pace(response(X_RateLimit_Remaining="0", X_RateLimit_Reset=str(time.time() + 10)))  # epoch
    assert slept[-1] == pytest.approx(10 + sketchfab.RESET_MARGIN_S, abs=0.1)
    c._pace(response(X_RateLimit_Remaining="0", X_RateLimit_Reset=str(time.time() + 3600)))
    assert slept[-1] == 30.0, "capped"
    c._pace(response(X_RateLimit_Remaining="zero", X_RateLimit_Reset="soon"))
    assert len(slept) == 3 and c.paced_s == pytest.approx(sum(slept))


def test_transport_errors_do_not_leak_query_strings():
    class Failing(requests.Session):
        def get(self, url, **kw):
            raise requests.ConnectionError(f"Max retries exceeded with url: {url} (Caused by refused)")

    c = SketchfabClient(BASE, "tok", session=Failing())
    with pytest.raises(SketchfabAPIError, match="failed after retries") as info:
        c.get_page(f"{BASE}/v3/models?cursor=secret-cursor")
    assert "secret-cursor" not in str(info.value)


def record(**kw):
    base = {"uid": UID, "name": "Lantern", "publishedAt": "2026-11-27T18:04:11.123456", "likeCount": 3}
    return {**base, **kw}


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"publishedAt": "2099-01-01T00:00:00"}, "publishedAt is in the future"),
        ({"tags": [{"slug": f"t{i}"} for i in range(500)]}, "tags has 500 entries"),
        ({"tags": [{"slug": "x" * 300}]}, "tags entry is 300 characters"),
        ({"viewCount": 2**40}, "viewCount is not a non-negative 32-bit integer"),
        ({"description": "x" * 300_000}, "larger than 256000 bytes"),
    ],
)
def test_absurd_values_are_rejected(override, reason):
    with pytest.raises(crawl.RejectedRecord, match=reason):
        crawl.validate_model(record(**override), now=datetime(2026, 11, 28, tzinfo=UTC))


def rows(*specs: tuple[str, int, int]) -> list:
    """(uid prefix, minutes before 12:00, likes) -> validated records, newest first."""
    noon = datetime(2026, 11, 27, 12, tzinfo=UTC)
    out = []
    for prefix, minutes, likes in specs:
        raw = record(
            uid=prefix * 32, publishedAt=(noon - timedelta(minutes=minutes)).isoformat(), likeCount=likes
        )
        out.append((raw, crawl.validate_model(raw, now=noon)))
    return out


def checkpoint(window: CrawlWindow, **stats) -> Checkpoint:
    return Checkpoint(1, "k", window, None, CrawlStats(**stats), None)


def test_classify_page_window_likes_duplicates_and_rejects():
    noon = datetime(2026, 11, 27, 12, tzinfo=UTC)
    window = CrawlWindow(since=noon - timedelta(minutes=30), until=noon - timedelta(minutes=5))
    page = rows(("a", 1, 9), ("b", 10, 9), ("c", 12, 0), ("d", 15, 9), ("b", 16, 9))
    page.insert(2, ({"uid": "bad"}, "uid is not 32 lowercase hex characters: 'bad'"))
    page += rows(("e", 20, 9), ("f", 40, 9), ("0", 50, 9))
    cp = checkpoint(window)
    out = classify_page(page, {"d" * 32}, CrawlFilters(min_likes=5), cp)
    assert [r.uid[0] for r in out.rows] == ["b", "e"]
    assert out.stop == "window" and len(out.rejects) == 1
    s = cp.stats
    assert (s.seen, s.skipped_outside_window, s.skipped_min_likes, s.duplicates, s.rejected) == (
        8,
        1,
        1,
        2,
        1,
    )
    assert cp.newest == noon - timedelta(minutes=10), "skipped-for-likes models still count for the watermark"


def test_classify_page_stops_at_max_models_counting_earlier_pages():
    cp = checkpoint(CrawlWindow(), upserted=8)
    out = classify_page(rows(("a", 1, 0), ("b", 2, 0), ("c", 3, 0)), set(), CrawlFilters(max_models=10), cp)
    assert [r.uid[0] for r in out.rows] == ["a", "b"] and out.stop == "max_models" and cp.stats.seen == 2


def test_watermarks_are_kept_per_model_selection_and_run_keys_are_stable():
    assert crawl.watermark_name(CrawlFilters(max_models=5)) == "watermark"
    assert crawl.watermark_name(CrawlFilters(tags=("b", "a"))) == crawl.watermark_name(
        CrawlFilters(tags=("a", "b"))
    )
    assert crawl.watermark_name(CrawlFilters(min_likes=5)) != "watermark"
    w = CrawlWindow(since=datetime(2026, 1, 1, tzinfo=UTC))
    assert crawl.default_run_key(w, CrawlFilters()) == crawl.default_run_key(w, CrawlFilters())
    assert crawl.default_run_key(w, CrawlFilters()) != crawl.default_run_key(w, CrawlFilters(max_models=3))


def context(run_type: str, **extra) -> dict:
    dag_run = SimpleNamespace(run_type=SimpleNamespace(value=run_type), dag_id="dag", run_id=f"{run_type}__1")
    return {"dag_run": dag_run, **extra}


def test_task_edge_backfill_window_params_and_checkpoint_key(monkeypatch):
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    settings = SimpleNamespace(db_url="unused", crawl_overlap_minutes=60)
    window = tasks.crawl_window(
        context("backfill", data_interval_start=start, data_interval_end=end), settings
    )
    assert window == CrawlWindow(since=start, until=end, incremental=False)
    with pytest.raises(ValueError, match="needs a data interval"):
        tasks.crawl_window(context("backfill"), settings)
    asked: list[CrawlFilters] = []

    def watermark(db_url: str, filters: CrawlFilters) -> datetime:
        asked.append(filters)
        return end

    monkeypatch.setattr(crawler, "read_watermark", watermark)
    filters = tasks.crawl_filters({"tags": "a, b", "min_likes": "5", "max_models": 10, "categories": ""})
    assert filters == CrawlFilters(categories=None, tags=("a", "b"), min_likes=5, max_models=10)
    assert tasks.crawl_window(context("scheduled"), settings, filters) == CrawlWindow(
        since=end - timedelta(hours=1)
    )
    assert asked == [filters], "the watermark of the crawled selection is used"
    assert tasks.checkpoint_key(context("manual")) == "dag/manual__1"


def test_crawl_and_download_settings_are_checked():
    with pytest.raises(ValueError, match="page_size must be <= 24"):
        Settings(page_size=25)
    with pytest.raises(ValueError, match="similarity_api_retries must be >= 0"):
        Settings(api_retries=-1)
    assert parse_variable("similarity_thumbnail_private_hosts", "Mirror.Internal, ::1") == (
        "mirror.internal",
        "::1",
    )
    assert parse_variable("similarity_api_retries", "2") == 2
