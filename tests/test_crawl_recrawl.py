"""Re-crawls keep the catalogue true: deleted models leave every list, changed thumbnails are
extracted again. All five stages, real Postgres, real HTTP, real TensorFlow (random weights, 32 px)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fake_sketchfab import Catalog, start_server
from helpers import assert_similarity_is_exact, query
from sketchfab_similarity import crawl, features, similarity, thumbnails, vectors
from sketchfab_similarity.crawl.state import CrawlWindow

pytestmark = pytest.mark.integration

CAP = 48


def stages(settings, window: CrawlWindow, full_recrawl: bool = False, key: str | None = None) -> dict:
    out = {"crawl": crawl.crawl(settings, window, checkpoint_key=key, full_recrawl=full_recrawl)}
    out["download"] = thumbnails.download_thumbnails(settings)
    out["extract"] = features.extract_features(settings)
    out["load"] = vectors.load_vectors(settings, out["extract"].files)
    out["refresh"] = similarity.refresh_similarity(settings)
    return out


def similarity_rows(db_url: str) -> list[tuple]:
    return query(
        db_url, "SELECT uid, rank, similar_uid, round(score::numeric, 5) FROM model_similarity ORDER BY 1, 2"
    )


def test_full_recrawl_drops_deleted_models_and_reextracts_changed_thumbnails(make_settings):
    catalog = Catalog.generate(64, seed=31)
    with start_server(catalog, listing_cap=CAP) as server:
        settings = make_settings(
            api_base_url=server.api_base_url,
            thumbnail_hosts=(server.media_host,),
            api_listing_cap=CAP,
            crawl_recrawl_percent=0,  # only the explicit full re-crawl below revisits old models
        )
        first = stages(settings, crawl.incremental_window(settings.db_url, timedelta(hours=1)), key="first")
        assert first["crawl"].upserted == 64 and first["crawl"].slices_crawled > 0
        assert first["load"].loaded == 64

        gone = [m.uid for m in catalog.models[3:64:13]]  # spread over the catalogue, old ones too
        changed = [m.uid for m in catalog.models[9:64:13]]
        for uid in gone:
            server.remove(uid)
        for uid in changed:
            server.change_thumbnail(uid)
        before = dict(query(settings.db_url, "SELECT uid, embedding::text FROM model_embeddings"))
        hashes = dict(query(settings.db_url, "SELECT uid, content_hash FROM model_thumbnails"))

        # An ordinary run sees nothing of this: the newest-first listing never shows old models again.
        quiet = crawl.crawl(settings, crawl.incremental_window(settings.db_url, timedelta(hours=1)))
        assert quiet.deleted == 0

        second = stages(settings, CrawlWindow(), full_recrawl=True, key="recrawl")
        detail_checks = server.stats.count("detail")
    db = settings.db_url
    assert second["crawl"].deleted == 5 and detail_checks >= 5
    assert sorted(
        r[0] for r in query(db, "SELECT uid FROM sketchfab_models WHERE deleted_at IS NOT NULL")
    ) == sorted(gone)
    assert query(db, "SELECT count(*) FROM sketchfab_models") == [(64,)], "deleted models are kept, marked"
    assert query(db, "SELECT count(*) FROM model_thumbnails WHERE uid = ANY(%s)", (gone,)) == [(0,)]
    assert query(db, "SELECT count(*) FROM model_embeddings WHERE uid = ANY(%s)", (gone,)) == [(0,)]
    assert query(
        db, "SELECT count(*) FROM model_similarity WHERE uid = ANY(%s) OR similar_uid = ANY(%s)", (gone, gone)
    ) == [(0,)], "no deleted model in any list"
    for uid in gone:
        assert query(db, "SELECT * FROM similar_models(%s)", (uid,)) == []
    assert second["download"].fetched == 5, "only the changed thumbnails are fetched again"
    after = dict(query(db, "SELECT uid, embedding::text FROM model_embeddings"))
    new_hashes = dict(query(db, "SELECT uid, content_hash FROM model_thumbnails"))
    for uid in changed:
        assert after[uid] != before[uid] and new_hashes[uid] != hashes[uid], f"{uid} kept its old vector"
    assert all(after[u] == before[u] for u in after if u not in changed)
    assert second["extract"].extracted == 5

    assert_similarity_is_exact(db, settings.top_n)
    incremental = similarity_rows(db)
    similarity.refresh_similarity(settings, full=True)
    assert similarity_rows(db) == incremental, "the incremental table equals a full rebuild"

    # A deleted model is not downloaded again, and nothing is left to do.
    plan = thumbnails.plan.plan_downloads(settings)
    assert plan.tasks == [] and not any(u in gone for u in (t.uid for t in plan.tasks))


def test_rolling_recrawl_revisits_a_share_of_the_slices_each_run(make_settings):
    catalog = Catalog.generate(200, seed=32)
    with start_server(catalog, listing_cap=CAP) as server:
        settings = make_settings(
            api_base_url=server.api_base_url, api_listing_cap=CAP, crawl_recrawl_percent=50
        )
        window = crawl.incremental_window(settings.db_url, timedelta(minutes=1))
        crawl.crawl(settings, window, checkpoint_key="bootstrap")
        (leaves,) = query(settings.db_url, "SELECT count(*) FROM crawl_slices WHERE status = 'active'")[0]
        victim = catalog.models[150].uid
        server.remove(victim)
        runs = []
        for run in range(2):
            window = crawl.incremental_window(settings.db_url, timedelta(minutes=1))
            runs.append(crawl.crawl(settings, window, checkpoint_key=f"daily-{run}"))
    assert [r.slices_crawled for r in runs] == [leaves // 2, leaves - leaves // 2]
    assert sum(r.deleted for r in runs) == 1
    assert query(settings.db_url, "SELECT uid FROM sketchfab_models WHERE deleted_at IS NOT NULL") == [
        (victim,)
    ]
    (stale,) = query(
        settings.db_url,
        "SELECT count(*) FROM crawl_slices s JOIN crawl_runs r ON r.run_key = 'daily-0' "
        "WHERE s.status = 'active' AND s.last_complete_at < r.started_at",
    )
    assert stale == (0,), "after 100% in shares, every slice was paged again"
