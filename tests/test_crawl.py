"""crawl_models against the local Sketchfab-compatible server and the embedded Postgres, fault by fault."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import urllib3.util.retry
from fake_sketchfab import Catalog, FaultConfig, start_server
from fake_sketchfab.catalog import SQL_NAME, UNICODE_NAME
from helpers import execute, query
from sketchfab_similarity import crawl
from sketchfab_similarity.crawl.crawler import CrawlFilters, CrawlWindow
from sketchfab_similarity.crawl.sketchfab import SketchfabAPIError, SketchfabClient

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
# Fast retries so fault tests take seconds; the logic is the production one.
FAST = dict(api_backoff_s=0.01, api_retry_after_cap_s=0.05, api_max_pace_sleep_s=3.0)


@pytest.fixture
def crawl_settings(make_settings):
    def make(server, **overrides):
        return make_settings(api_base_url=server.api_base_url, **{**FAST, **overrides})

    return make


def utc(model) -> datetime:
    return model.published_at.replace(tzinfo=UTC)


def stored_uids(db_url: str) -> list[str]:
    return [r[0] for r in query(db_url, "SELECT uid FROM sketchfab_models ORDER BY uid")]


def crawl_run(db_url: str, key: str) -> dict:
    rows = query(
        db_url,
        "SELECT status, pages, attempts, error, next_url FROM crawl_runs WHERE run_key = %s ORDER BY id DESC",
        (key,),
    )
    status, pages, attempts, error, next_url = rows[0]
    return {"status": status, "pages": pages, "attempts": attempts, "error": error, "next_url": next_url}


def test_incremental_crawls_take_new_models_and_overlap_and_advance_the_watermark(crawl_settings):
    catalog = Catalog.generate(60, seed=11)
    with start_server(catalog) as server:
        settings = crawl_settings(server)
        first = crawl.crawl(settings, crawl.incremental_window(settings.db_url, timedelta(hours=1)))
        assert (first.upserted, first.complete, first.stopped_by) == (60, True, "end of listing")
        newest = utc(catalog.models[0])
        assert crawl.read_watermark(settings.db_url) == newest
        seen_before = dict(query(settings.db_url, "SELECT uid, first_seen_at FROM sketchfab_models"))

        published = server.publish(5)
        window = crawl.incremental_window(settings.db_url, timedelta(hours=1))
        assert window.since == newest - timedelta(hours=1)
        lists_before = server.stats.count("list", 200)
        second = crawl.crawl(settings, window)
        new = [m.uid for m in catalog.models if m.uid not in seen_before]
        in_overlap = sum(utc(catalog.by_uid[u]) >= window.since for u in seen_before)
        assert new == [m.uid for m in published] and in_overlap >= 5  # the hour below the mark is re-read
        assert second.upserted == 5 + in_overlap and second.stopped_by == "window"
        assert server.stats.count("list", 200) - lists_before == 1, "one page reaches below the watermark"
        assert crawl.read_watermark(settings.db_url) == utc(published[0])
        assert sorted(stored_uids(settings.db_url)) == sorted({m.uid for m in catalog.models})
        after = dict(query(settings.db_url, "SELECT uid, first_seen_at FROM sketchfab_models"))
        assert all(after[u] == seen_before[u] for u in seen_before), "first_seen_at never moves"


def test_a_model_seen_again_updates_its_mutable_fields(crawl_settings):
    catalog = Catalog.generate(30, seed=12)
    with start_server(catalog) as server:
        settings = crawl_settings(server)
        crawl.crawl(settings, CrawlWindow(), checkpoint_key="first")
        model = catalog.models[3]
        (before,) = query(
            settings.db_url,
            "SELECT first_seen_at, last_seen_at FROM sketchfab_models WHERE uid=%s",
            (model.uid,),
        )
        model.name, model.like_count, model.view_count = "Renamed lantern", 77, 1234
        model.tags = ("renamed", "lantern")
        crawl.crawl(settings, CrawlWindow(), checkpoint_key="second")
        (row,) = query(
            settings.db_url,
            "SELECT name, like_count, view_count, tags, raw->>'name', first_seen_at, last_seen_at "
            "FROM sketchfab_models WHERE uid = %s",
            (model.uid,),
        )
        assert row[:5] == ("Renamed lantern", 77, 1234, ["renamed", "lantern"], "Renamed lantern")
        assert row[5] == before[0] and row[6] > before[1]
        assert len(stored_uids(settings.db_url)) == 30


def test_backfill_takes_exactly_its_interval_and_leaves_the_watermark(crawl_settings):
    catalog = Catalog.generate(80, seed=13)
    since, until = utc(catalog.models[60]), utc(catalog.models[20])
    with start_server(catalog) as server:
        settings = crawl_settings(server)
        stats = crawl.crawl(settings, CrawlWindow(since=since, until=until, incremental=False))
    expected = sorted(m.uid for m in catalog.models if since <= utc(m) < until)
    assert stored_uids(settings.db_url) == expected and len(expected) == 40
    assert stats.skipped_outside_window == 21 and stats.stopped_by == "window"
    assert crawl.read_watermark(settings.db_url) is None


def test_filters_categories_tags_min_likes_and_max_models(crawl_settings):
    catalog = Catalog.generate(96, seed=14)
    with start_server(catalog) as server:
        settings = crawl_settings(server)

        def run(filters: CrawlFilters) -> tuple[crawl.CrawlStats, set[str]]:
            execute(settings.db_url, "TRUNCATE sketchfab_models CASCADE")
            stats = crawl.crawl(
                settings, crawl.incremental_window(settings.db_url, timedelta(0), filters), filters
            )
            return stats, set(stored_uids(settings.db_url))

        stats, uids = run(CrawlFilters(categories="cube"))
        assert uids == {m.uid for m in catalog.models if ("Cube", "cube") in m.categories} and stats.complete
        tags = catalog.models[0].tags[:2]
        _, uids = run(CrawlFilters(tags=tags))
        assert uids == {m.uid for m in catalog.models if set(tags) <= set(m.tags)}
        stats, uids = run(CrawlFilters(min_likes=5))
        assert uids == {m.uid for m in catalog.models if m.like_count >= 5}
        assert stats.skipped_min_likes == sum(m.like_count < 5 for m in catalog.models) > 0
        # A filtered crawl covers a subset: it keeps its own watermark, never the global one.
        assert crawl.read_watermark(settings.db_url) is None
        assert crawl.read_watermark(settings.db_url, CrawlFilters(min_likes=5)) == utc(catalog.models[0])

        stats, uids = run(CrawlFilters(max_models=30))
        assert uids == {m.uid for m in catalog.models[:30]}
        assert (stats.upserted, stats.complete, stats.stopped_by) == (30, False, "max_models")
        assert server.stats.count("list", 200) > 0
        assert crawl.read_watermark(settings.db_url) is None, "a truncated crawl must not move the watermark"


def test_429_storm_with_huge_retry_after_is_ridden_out(crawl_settings, monkeypatch):
    slept: list[float] = []
    real_sleep = time.sleep

    def watched_sleep(seconds: float) -> None:
        assert seconds <= FAST["api_retry_after_cap_s"], f"slept {seconds}s: Retry-After was not capped"
        slept.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(urllib3.util.retry.time, "sleep", watched_sleep)
    faults = FaultConfig(rate_limit_every=2, rate_limit_burst=3, retry_after_s=3600)
    catalog = Catalog.generate(72, seed=15)
    with start_server(catalog, faults=faults) as server:
        stats = crawl.crawl(crawl_settings(server), CrawlWindow())
        throttled = server.stats.count("list", 429)
    assert stats.upserted == 72 and stats.complete
    assert throttled >= 3 and len(slept) == throttled, "every 429 was waited out, for the capped time"


def test_429_storm_longer_than_the_retries_fails_clearly_and_resumes(crawl_settings):
    catalog = Catalog.generate(96, seed=16)
    with start_server(catalog, faults=FaultConfig(rate_limit_every=3, rate_limit_burst=50)) as server:
        settings = crawl_settings(server, api_retries=3)
        with pytest.raises(SketchfabAPIError, match=r"HTTP 429 after retries .*resumes from the checkpoint"):
            crawl.crawl(settings, CrawlWindow(), checkpoint_key="storm")
        run = crawl_run(settings.db_url, "storm")
        assert run["status"] == "failed" and "HTTP 429" in run["error"] and run["pages"] == 2
        assert len(stored_uids(settings.db_url)) == 48
        server.set_faults(FaultConfig())
        stats = crawl.crawl(settings, CrawlWindow(), checkpoint_key="storm")
        assert stats.resumed and stats.upserted == 96 and stats.pages == 4 and stats.duplicates == 0
        assert server.stats.count("list", 200) == 4, "no page was fetched twice"
    assert crawl_run(settings.db_url, "storm") == {
        "status": "succeeded", "pages": 4, "attempts": 2, "error": None, "next_url": None,
    }  # fmt: skip
    assert len(stored_uids(settings.db_url)) == 96


def test_server_errors_and_proxy_pages_are_retried(crawl_settings):
    faults = FaultConfig(server_error_rate=0.3, html_200_every=3)
    catalog = Catalog.generate(24 * 8, seed=17)
    with start_server(catalog, faults=faults) as server:
        stats = crawl.crawl(crawl_settings(server), CrawlWindow())
        errors = sum(server.stats.count("list", s) for s in (500, 502, 503))
        lists_ok = server.stats.count("list", 200)
    assert stats.upserted == 24 * 8 and stats.complete
    assert errors >= 3 and lists_ok > stats.pages, "5xx and HTML-200 pages were met and retried"


@pytest.mark.parametrize("outage_after", [1, 2, 3])
def test_crawl_cut_off_at_any_page_resumes_without_gaps_or_duplicates(crawl_settings, outage_after):
    catalog = Catalog.generate(96, seed=18)
    with start_server(catalog, faults=FaultConfig(list_outage_after=outage_after)) as server:
        settings = crawl_settings(server, api_retries=2)
        with pytest.raises(SketchfabAPIError, match="HTTP 503"):
            crawl.crawl(settings, CrawlWindow(), checkpoint_key="outage")
        assert len(stored_uids(settings.db_url)) == 24 * outage_after
        assert crawl.read_watermark(settings.db_url) is None, "a failed crawl does not move the watermark"
        server.set_faults(FaultConfig())
        stats = crawl.crawl(settings, CrawlWindow(), checkpoint_key="outage")
        assert server.stats.count("list", 200) == 4, "the resumed crawl did not start over"
    assert stats.resumed and stats.upserted == 96 and stats.duplicates == 0 and stats.seen == 96
    assert stored_uids(settings.db_url) == sorted(m.uid for m in catalog.models)
    assert crawl.read_watermark(settings.db_url) == utc(catalog.models[0])


def test_pages_shifting_during_the_crawl_and_a_resume_give_no_duplicates(crawl_settings):
    catalog = Catalog.generate(72, seed=19)
    original = sorted(m.uid for m in catalog.models)
    faults = FaultConfig(shift_on_page=2, shift_publish=5, list_outage_after=2)
    with start_server(catalog, faults=faults) as server:
        settings = crawl_settings(server, api_retries=1)
        with pytest.raises(SketchfabAPIError):
            crawl.crawl(settings, CrawlWindow(), checkpoint_key="shift")
        server.set_faults(FaultConfig())
        stats = crawl.crawl(settings, CrawlWindow(), checkpoint_key="shift")
        # Five models were published after page 2: page 3 repeats the last five of page 2.
        assert (stats.upserted, stats.duplicates, stats.seen) == (72, 5, 77)
        assert stored_uids(settings.db_url) == original
        # They are newer than the watermark, so the next incremental crawl takes them.
        nxt = crawl.crawl(settings, crawl.incremental_window(settings.db_url, timedelta(minutes=1)))
        assert nxt.upserted >= 5 and len(stored_uids(settings.db_url)) == 77


def test_expired_stored_cursor_restarts_from_the_top_without_counting_twice(crawl_settings):
    catalog = Catalog.generate(72, seed=20)
    with start_server(catalog, faults=FaultConfig(list_outage_after=1)) as server:
        settings = crawl_settings(server, api_retries=1)
        with pytest.raises(SketchfabAPIError):
            crawl.crawl(settings, CrawlWindow(), checkpoint_key="expired")
        execute(
            settings.db_url,
            "UPDATE crawl_runs SET next_url = %s WHERE run_key = 'expired'",
            (f"{server.api_base_url}/v3/models?sort_by=-publishedAt&count=24&cursor=bm9wZQ",),
        )
        server.set_faults(FaultConfig())
        stats = crawl.crawl(settings, CrawlWindow(), checkpoint_key="expired")
    assert (stats.upserted, stats.duplicates) == (72, 24)
    assert len(stored_uids(settings.db_url)) == 72


def test_crawl_killed_mid_way_resumes_after_the_last_committed_page(crawl_settings):
    catalog = Catalog.generate(24 * 10, seed=21)
    with start_server(catalog, faults=FaultConfig(latency_ms=200)) as server:
        settings = crawl_settings(server)
        script = (
            "import sys; from sketchfab_similarity import crawl; "
            "from sketchfab_similarity.core.settings import Settings; "
            f"s = Settings(db_url={settings.db_url!r}, api_base_url={server.api_base_url!r}); "
            "crawl.crawl(s, crawl.CrawlWindow(), checkpoint_key='killed')"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "tools")])}
        proc = subprocess.Popen([sys.executable, "-c", script], env=env)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                rows = query(settings.db_url, "SELECT pages FROM crawl_runs WHERE run_key = 'killed'")
                if rows and rows[0][0] >= 3:
                    break
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        killed_at = crawl_run(settings.db_url, "killed")
        assert killed_at["status"] == "running" and 3 <= killed_at["pages"] < 10, killed_at
        assert len(stored_uids(settings.db_url)) == 24 * killed_at["pages"]
        stats = crawl.crawl(settings, CrawlWindow(), checkpoint_key="killed")
        fetched = server.stats.count("list", 200)
    assert stats.resumed and stats.upserted == 24 * 10 and stats.duplicates == 0 and stats.pages == 10
    assert fetched <= 10 + 1, "only the page in flight at the kill may have been fetched twice"
    assert stored_uids(settings.db_url) == sorted(m.uid for m in catalog.models)


def test_next_on_another_host_is_refused(crawl_settings):
    catalog = Catalog.generate(96, seed=22)
    with start_server(catalog, faults=FaultConfig(offsite_next_on_page=2)) as server:
        settings = crawl_settings(server)
        with pytest.raises(
            SketchfabAPIError, match=r"Refusing to follow http://evil\.example\.invalid/v3/models"
        ):
            crawl.crawl(settings, CrawlWindow(), checkpoint_key="offsite")
    assert len(stored_uids(settings.db_url)) == 48
    assert crawl_run(settings.db_url, "offsite")["status"] == "failed"


def test_persistent_html_200_is_a_clear_error(crawl_settings):
    with start_server(Catalog.generate(30, seed=23), faults=FaultConfig(html_200_every=1)) as server:
        settings = crawl_settings(server)
        with pytest.raises(SketchfabAPIError, match=r"expected JSON, got text/html.*after 3 attempts"):
            crawl.crawl(settings, CrawlWindow())


def test_bad_records_are_rejected_with_reasons_and_nasty_names_stored_verbatim(crawl_settings):
    catalog = Catalog.generate(40, seed=24, faults=FaultConfig(bad_records=True))
    long_unicode = ("Лампа 🚀👩\u200d🚀 مصباح \u202e" * 40)[:1000]
    catalog.models[7].name = long_unicode
    with start_server(catalog) as server:
        settings = crawl_settings(server)
        stats = crawl.crawl(settings, CrawlWindow(), checkpoint_key="bad")
        again = crawl.crawl(settings, CrawlWindow(), checkpoint_key="bad-again")
    names = dict(query(settings.db_url, "SELECT uid, name FROM sketchfab_models"))
    assert len(names) == 40
    by_kind = {r.kind: r for r in catalog.bad_records}
    assert names[by_kind["sql_name"].model.uid] == SQL_NAME
    assert names[by_kind["unicode_name"].model.uid] == UNICODE_NAME
    assert names[catalog.models[7].uid] == long_unicode
    invalid = [r for r in catalog.bad_records if not r.valid]
    assert stats.rejected == again.rejected == len(invalid) == 5
    assert stats.reject_reasons == {
        "uid is not 32 lowercase hex characters": 3,
        "publishedAt is not an ISO 8601 timestamp": 1,
        "name is 100000 characters, more than 1024": 1,
    }
    rejects = query(settings.db_url, "SELECT raw, reason, crawl_id FROM crawl_rejects ORDER BY reason")
    assert len(rejects) == 5, "a record rejected again is not stored twice"
    assert {r[0].get("uid") for r in rejects} >= {
        by_kind["bad_uid"].model.uid,
        by_kind["uppercase_uid"].model.uid,
    }
    assert any(len(r[0].get("name", "")) == 100_000 for r in rejects), "raw JSON kept whole"
    assert {r[2] for r in rejects} == {again.crawl_id}


def test_pacing_on_rate_limit_headers_avoids_429s(crawl_settings):
    faults = FaultConfig(rate_limit_per_minute=4, rate_limit_window_s=1.0)
    catalog = Catalog.generate(24 * 6, seed=25)
    with start_server(catalog, faults=faults) as server:
        settings = crawl_settings(server)
        client = SketchfabClient.from_settings(settings)
        stats = crawl.crawl(settings, CrawlWindow(), client=client)
        throttled = server.stats.count(status=429)
    assert stats.upserted == 24 * 6
    assert throttled == 0 and client.paced_s > 0


def test_token_is_sent_but_never_logged_or_stored(crawl_settings, caplog):
    token = "tok-9f8e7d6c5b4a-secret"
    faults = FaultConfig(rate_limit_every=3, rate_limit_burst=1, retry_after_s=0, server_error_rate=0.2)
    catalog = Catalog.generate(60, seed=26)
    caplog.set_level(logging.DEBUG)
    with start_server(catalog, faults=faults, token=token) as server:
        settings = crawl_settings(server, api_token=token)
        crawl.crawl(settings, CrawlWindow(), checkpoint_key="token")
        server.set_faults(FaultConfig(list_outage_after=1))
        with pytest.raises(SketchfabAPIError) as failure:
            crawl.crawl(settings, CrawlWindow(), checkpoint_key="token-2")
        assert server.stats.with_token > 0 and server.stats.without_token == 0
    assert "retry" in caplog.text.lower()
    dumps = query(
        settings.db_url,
        "SELECT concat((SELECT string_agg(raw::text, '') FROM sketchfab_models),"
        " (SELECT string_agg(row_to_json(c)::text, '') FROM crawl_runs c),"
        " (SELECT string_agg(value::text, '') FROM pipeline_state))",
    )[0][0]
    for text in (caplog.text, dumps, str(failure.value)):
        assert token not in text
