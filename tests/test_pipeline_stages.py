"""The five stages in order, without Airflow: real Postgres, real HTTP, real TensorFlow."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fake_sketchfab import Catalog, start_server
from helpers import assert_similarity_is_exact, query
from sketchfab_similarity import crawl, features, similarity, thumbnails, vectors

pytestmark = pytest.mark.integration

TABLES = ["sketchfab_models", "model_thumbnails", "model_embeddings", "model_similarity", "crawl_rejects"]


def run_all(settings) -> dict:
    out = {"crawl": crawl.crawl(settings, crawl.incremental_window(settings.db_url, timedelta(hours=1)))}
    out["download"] = thumbnails.download_thumbnails(settings)
    out["extract"] = features.extract_features(settings)
    out["load"] = vectors.load_vectors(settings, out["extract"].files)
    out["refresh"] = similarity.refresh_similarity(settings)
    return out


def snapshot(db_url: str) -> dict[str, list[tuple]]:
    cols = {
        "sketchfab_models": "uid, name, published_at, like_count, tags, categories, raw::text",
        "model_thumbnails": "uid, source_url, content_hash, stored_path, width, height, status, error",
        "model_embeddings": "uid, embedding::text, feature_version, content_hash, extracted_at",
        "model_similarity": "uid, rank, similar_uid, score, feature_version",
        "crawl_rejects": "raw::text, reason",
    }
    return {t: query(db_url, f"SELECT {c} FROM {t} ORDER BY 1, 2") for t, c in cols.items()}  # noqa: S608


def test_stages_end_to_end_and_rerun_changes_nothing(make_settings):
    catalog = Catalog.generate(40, seed=3)
    with start_server(catalog) as server:
        settings = make_settings(
            api_base_url=server.api_base_url, thumbnail_hosts=(server.media_host,), top_n=5
        )
        first = run_all(settings)
        assert first["crawl"].upserted == 40
        assert first["download"].fetched == 40 and first["download"].failed == 0
        assert first["extract"].extracted == 40
        assert first["load"].loaded == 40
        assert first["refresh"].rows == 40 * 5
        counts = {t: query(settings.db_url, f"SELECT count(*) FROM {t}")[0][0] for t in TABLES}  # noqa: S608
        assert counts == {
            "sketchfab_models": 40, "model_thumbnails": 40, "model_embeddings": 40,
            "model_similarity": 200, "crawl_rejects": 0,
        }  # fmt: skip
        assert assert_similarity_is_exact(settings.db_url, 5) == 200

        before = snapshot(settings.db_url)
        second = run_all(settings)
        assert second["download"].candidates == 0
        assert second["extract"].extracted == 0
        assert second["refresh"].skipped_unchanged
        assert snapshot(settings.db_url) == before


def test_similar_models_sql_function(make_settings):
    catalog = Catalog.generate(12, seed=4)
    with start_server(catalog) as server:
        settings = make_settings(
            api_base_url=server.api_base_url, thumbnail_hosts=(server.media_host,), top_n=3
        )
        run_all(settings)
    uid = catalog.models[0].uid
    rows = query(
        settings.db_url,
        "SELECT rank, uid, name, score, thumbnail_url, viewer_url FROM similar_models(%s, 3)",
        (uid,),
    )
    expected = query(
        settings.db_url, "SELECT similar_uid FROM model_similarity WHERE uid = %s ORDER BY rank", (uid,)
    )
    assert [r[1] for r in rows] == [e[0] for e in expected]
    assert [r[0] for r in rows] == [1, 2, 3]
    assert all(
        r[4].startswith("http://localhost:") and r[5].startswith("https://sketchfab.com/") for r in rows
    )
    # k smaller than N, unknown uid gives nothing.
    assert len(query(settings.db_url, "SELECT * FROM similar_models(%s, 2)", (uid,))) == 2
    assert query(settings.db_url, "SELECT * FROM similar_models('ffffffffffffffffffffffffffffffff')") == []
    # A model with a vector but no materialised rows falls back to the index search.
    query(settings.db_url, "DELETE FROM model_similarity WHERE uid = %s RETURNING 1", (uid,))
    fallback = query(settings.db_url, "SELECT uid, score FROM similar_models(%s, 3)", (uid,))
    assert [r[0] for r in fallback] == [r[1] for r in rows]
