"""Crawling past the listing cap: slices, the slice map, resumes, backfills, gaps, refusals.

A local server with a low cap (60 results per query) and catalogues several times larger.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from fake_sketchfab import Catalog, FaultConfig, start_server
from helpers import query
from sketchfab_similarity import crawl
from sketchfab_similarity.crawl.crawler import CrawlWindow
from sketchfab_similarity.crawl.sketchfab import SketchfabClient
from sketchfab_similarity.crawl.sliced import SliceRefused

pytestmark = pytest.mark.integration

CAP = 60
FAST = dict(api_backoff_s=0.01, api_retry_after_cap_s=0.05, api_max_pace_sleep_s=3.0, api_listing_cap=CAP)


def utc(model) -> datetime:
    return model.published_at.replace(tzinfo=UTC)


@pytest.fixture
def settings_for(make_settings):
    def make(server, **overrides):
        return make_settings(api_base_url=server.api_base_url, **{**FAST, **overrides})

    return make


def stored(db_url: str) -> list[str]:
    return [r[0] for r in query(db_url, "SELECT uid FROM sketchfab_models ORDER BY uid")]


def leaves(db_url: str) -> list[tuple]:
    return query(
        db_url,
        "SELECT (filters->>'min_face_count')::bigint, (filters->>'max_face_count')::bigint, filters, last_size "
        "FROM crawl_slices WHERE status = 'active' ORDER BY 1, 2 NULLS LAST, filters::text",
    )


def assert_map_covers_every_face_count(db_url: str) -> None:
    """Leaves meet end to end from 0 to no bound (facet children share one face count)."""
    rows = leaves(db_url)
    ranges = sorted({(lo, hi) for lo, hi, _, _ in rows}, key=lambda r: (r[0], r[1] is None, r[1]))
    assert ranges[0][0] == 0 and ranges[-1][1] is None
    for (_, hi), (lo, _) in zip(ranges, ranges[1:], strict=False):
        assert lo == hi + 1, f"gap or overlap between slices at {hi} / {lo}: {ranges}"
    assert all(size is not None and size < CAP for *_, size in rows), "every leaf ends before the cap"


class FailAfter:
    """A client that dies (like a killed worker) after `n` listing pages."""

    def __init__(self, client: SketchfabClient, n: int) -> None:
        self.client, self.left = client, n

    def __getattr__(self, name):
        return getattr(self.client, name)

    def get_page(self, url):
        if self.left <= 0:
            raise KeyboardInterrupt("killed")
        self.left -= 1
        return self.client.get_page(url)


def test_bootstrap_crawls_a_catalogue_far_past_the_cap(settings_for):
    catalog = Catalog.generate(700, seed=21)
    with start_server(catalog, listing_cap=CAP) as server:
        settings = settings_for(server)
        stats = crawl.crawl(settings, crawl.incremental_window(settings.db_url, timedelta(hours=1)))
        pages = server.stats.count("list", 200)
    assert stored(settings.db_url) == sorted(m.uid for m in catalog.models)
    assert any(not m.categories for m in catalog.models), "models in no category are covered too"
    assert stats.upserted == 700, "every model upserted exactly once"
    assert stats.complete and stats.slices_crawled > 700 // CAP and stats.slices_capped == 0
    assert crawl.read_watermark(settings.db_url) == utc(catalog.models[0])
    assert_map_covers_every_face_count(settings.db_url)
    print(f"{pages} listing pages for 700 models; {stats.slices_crawled} slices")
    assert pages < 2.0 * 700 / 24 + 40, f"{pages} listing pages for 700 models"


def test_a_crawl_killed_mid_bootstrap_resumes_without_gaps_or_repeats(settings_for):
    catalog = Catalog.generate(500, seed=22)
    with start_server(catalog, listing_cap=CAP) as server:
        settings = settings_for(server)
        window = crawl.incremental_window(settings.db_url, timedelta(hours=1))
        kills = 0
        for n in (7, 5, 9, 4, 6, 11, 5, 8, 7, 6, 9, 10, 12, 13):  # die after n pages, again and again
            try:
                stats = crawl.crawl(
                    settings, window, client=FailAfter(SketchfabClient.from_settings(settings), n)
                )
                break
            except KeyboardInterrupt:
                kills += 1
        else:
            stats = crawl.crawl(settings, window)
    assert kills >= 3
    assert stored(settings.db_url) == sorted(m.uid for m in catalog.models)
    assert stats.upserted == 500 and stats.resumed, "each model once across all the attempts"
    (runs,) = query(settings.db_url, "SELECT count(*), max(attempts) FROM crawl_runs")
    assert runs[0] == 1 and runs[1] == kills + 1
    assert_map_covers_every_face_count(settings.db_url)


def test_a_backfill_of_an_old_interval_takes_exactly_it_through_the_slice_map(settings_for):
    catalog = Catalog.generate(600, seed=23)
    since, until = utc(catalog.models[480]), utc(catalog.models[430])  # far older than the newest CAP
    expected = sorted(m.uid for m in catalog.models if since <= utc(m) < until)
    with start_server(catalog, listing_cap=CAP) as server:
        settings = settings_for(server)
        stats = crawl.crawl(settings, CrawlWindow(since=since, until=until, incremental=False))
        assert stored(settings.db_url) == expected and len(expected) == 50
        assert stats.slices_crawled > 0 and crawl.read_watermark(settings.db_url) is None
        # With a map built by a bootstrap, a backfill reuses it (no slice planned anew).
        crawl.crawl(settings, CrawlWindow(), checkpoint_key="bootstrap")
        (before,) = query(settings.db_url, "SELECT count(*) FROM crawl_slices")
        older = utc(catalog.models[560]), utc(catalog.models[520])
        again = crawl.crawl(settings, CrawlWindow(since=older[0], until=older[1], incremental=False))
    assert query(settings.db_url, "SELECT count(*) FROM crawl_slices") == [before]
    assert again.upserted == 40 and again.slices_split == 0


def test_an_incremental_run_after_a_gap_larger_than_the_cap_misses_nothing(settings_for):
    catalog = Catalog.generate(300, seed=24)
    with start_server(catalog, listing_cap=CAP) as server:
        settings = settings_for(server)
        crawl.crawl(
            settings, crawl.incremental_window(settings.db_url, timedelta(minutes=1)), checkpoint_key="a"
        )
        published = server.publish(4 * CAP)  # the pipeline was off while 240 models came out
        stats = crawl.crawl(
            settings, crawl.incremental_window(settings.db_url, timedelta(minutes=1)), checkpoint_key="b"
        )
    assert stored(settings.db_url) == sorted(m.uid for m in catalog.models)
    assert {m.uid for m in published} <= set(stored(settings.db_url))
    assert stats.slices_crawled > 0 and stats.complete
    assert crawl.read_watermark(settings.db_url) == utc(published[0])


def test_a_slice_the_api_refuses_is_reported_with_its_filters(settings_for, monkeypatch):
    catalog = Catalog.generate(200, seed=25)
    faults = FaultConfig(refused_filters=frozenset({"min_face_count", "max_face_count"}))
    monkeypatch.setattr(SketchfabClient, "slice_endpoint", "/v3/models")  # the one the server refuses
    with start_server(catalog, faults=faults, listing_cap=CAP) as server:
        settings = settings_for(server)
        with pytest.raises(SliceRefused) as err:
            crawl.crawl(settings, CrawlWindow())
    message = str(err.value)
    assert "refused slice faces 0.." in message and "min_face_count" in message and "HTTP 400" in message
    assert "Unknown filter" in message
    (status,) = query(settings.db_url, "SELECT status, error FROM crawl_runs")
    assert status[0] == "failed" and "refused slice" in status[1]


def test_a_new_run_after_an_unfinished_first_load_skips_the_slices_already_paged(settings_for):
    catalog = Catalog.generate(500, seed=26)
    with start_server(catalog, listing_cap=CAP) as server:
        settings = settings_for(server)
        window = crawl.incremental_window(settings.db_url, timedelta(hours=1))
        client = FailAfter(SketchfabClient.from_settings(settings), 14)
        with pytest.raises(KeyboardInterrupt):
            crawl.crawl(settings, window, client=client, checkpoint_key="monday")
        paged = [
            r[0]
            for r in query(settings.db_url, "SELECT id FROM crawl_slices WHERE last_complete_at IS NOT NULL")
        ]
        assert len(paged) >= 2
        # Monday's run gave up for good; Tuesday's run is a new crawl (no watermark yet: a first load again).
        stats = crawl.crawl(
            settings, crawl.incremental_window(settings.db_url, timedelta(hours=1)), checkpoint_key="tuesday"
        )
    assert stored(settings.db_url) == sorted(m.uid for m in catalog.models)
    assert stats.complete and crawl.read_watermark(settings.db_url) == utc(catalog.models[0])
    tuesday = [
        r[0]
        for r in query(
            settings.db_url,
            "SELECT p.slice_id FROM crawl_slice_passes p JOIN crawl_runs r ON r.id = p.crawl_id "
            "WHERE r.run_key = 'tuesday'",
        )
    ]
    assert tuesday and not set(paged) & set(tuesday), "slices Monday paged to their end are not paged again"
    assert_map_covers_every_face_count(settings.db_url)


def test_a_gap_past_the_cap_with_no_slice_map_yet_builds_one_for_the_window(settings_for):
    catalog = Catalog.generate(30, seed=27)  # ends more than a page before the cap: one listing, the root
    with start_server(catalog, listing_cap=CAP) as server:
        settings = settings_for(server)
        first = crawl.crawl(
            settings, crawl.incremental_window(settings.db_url, timedelta(minutes=1)), checkpoint_key="a"
        )
        assert first.slices_split == 0 and len(leaves_any(settings.db_url)) == 1
        published = server.publish(5 * CAP)
        stats = crawl.crawl(
            settings, crawl.incremental_window(settings.db_url, timedelta(minutes=1)), checkpoint_key="b"
        )
    assert stored(settings.db_url) == sorted(m.uid for m in catalog.models) and len(published) == 5 * CAP
    assert stats.slices_crawled > 1 and stats.complete
    assert crawl.read_watermark(settings.db_url) == utc(published[0])
    kinds = query(
        settings.db_url,
        "SELECT DISTINCT kind FROM crawl_slice_passes p JOIN crawl_runs r ON r.id = p.crawl_id WHERE r.run_key = 'b'",
    )
    assert kinds == [("window",)], "the slices stop at the window's start, not at the end of the catalogue"


def leaves_any(db_url: str) -> list[tuple]:
    return query(db_url, "SELECT id FROM crawl_slices WHERE status = 'active'")
