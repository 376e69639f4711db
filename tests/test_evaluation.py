"""The evaluation on a small database filled by the real stages: the similarity_quality row, checked in SQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_sketchfab import Catalog, FaultConfig, start_server
from helpers import execute, model_jpeg, query
from sketchfab_similarity import crawl, evaluation, features, similarity, thumbnails, vectors
from sketchfab_similarity.evaluation.__main__ import main as evaluation_main

pytestmark = pytest.mark.integration


@pytest.fixture
def pipeline(make_settings):
    """40 models (five per shape class) through crawl .. refresh; models 1 and 2 serve model 0's picture."""
    catalog = Catalog.generate(40, seed=3)
    same = ("image/jpeg", model_jpeg(catalog.models[0]))
    bodies = {m.uid: same for m in catalog.models[:3]}
    with start_server(catalog, faults=FaultConfig(thumbnail_bodies=bodies)) as server:
        settings = make_settings(
            api_base_url=server.api_base_url, thumbnail_hosts=(server.media_host,), top_n=12
        )
        crawl.crawl(settings, crawl.CrawlWindow())
        thumbnails.download_thumbnails(settings)
    extracted = features.extract_features(settings)
    vectors.load_vectors(settings, extracted.files)
    similarity.refresh_similarity(settings)
    return catalog, settings


def readme_quality_sql() -> list[str]:
    """The statements of the README's Quality SQL block."""
    section = (Path(__file__).parents[1] / "README.md").read_text().split("## Quality", 1)[1]
    block = section.split("```sql\n", 1)[1].split("```", 1)[0]
    code = "\n".join(line.split("--")[0] for line in block.splitlines())
    return [statement.strip() for statement in code.split(";") if statement.strip()]


def sql_precision_at_10(db_url: str) -> float:
    """Independently of the evaluation code: mean share of the first 10 sharing a category, over the
    queries that have a category (the others have no ground truth)."""
    (value,) = query(
        db_url,
        """
        SELECT avg(share) FROM (
            SELECT s.uid, avg((q.categories && r.categories)::int) AS share
            FROM model_similarity s
            JOIN sketchfab_models q ON q.uid = s.uid JOIN sketchfab_models r ON r.uid = s.similar_uid
            WHERE s.rank <= 10 AND cardinality(q.categories) > 0 GROUP BY s.uid
        ) per_query
        """,
    )[0]
    return float(value)


def test_evaluation_writes_one_row_per_run_with_the_metrics(pipeline):
    catalog, settings = pipeline
    stored = dict(query(settings.db_url, "SELECT uid, categories FROM sketchfab_models"))
    categorised = [m for m in catalog.models if stored[m.uid]]
    assert len(categorised) >= 30, "most generated models have categories (some, as on Sketchfab, none)"
    assert all(m.shape_class == stored[m.uid][0] for m in categorised), (
        "the shape class is the first category"
    )
    settings = settings.with_overrides(hubness_rerank="csls", csls_k=5)
    quality = evaluation.evaluate(settings, run_id="manual__1")
    rows = query(
        settings.db_url,
        "SELECT feature_version, run_id, models, sample_size, precision_at_10, random_precision_at_10, "
        "colour_precision_at_10, coverage, hubness_skewness, hubness_gini, near_duplicate_pairs, metrics "
        "FROM similarity_quality",
    )
    assert len(rows) == 1
    version, run_id, models, sample, p10, random_p10, colour_p10, cov, skew, gini, dups, stored = rows[0]
    assert (run_id, models, sample) == ("manual__1", 40, 40)
    assert version == query(settings.db_url, "SELECT DISTINCT feature_version FROM model_similarity")[0][0]
    assert p10 == pytest.approx(sql_precision_at_10(settings.db_url))
    assert random_p10 is not None and colour_p10 is not None
    assert set(stored["methods"]) == {"published", "random", "colour", "csls"}, "the sample is the whole pool"
    # The stored JSON and the columns say the same.
    assert stored["methods"]["colour"]["precision"]["10"] == pytest.approx(colour_p10)
    (sql_coverage,) = query(
        settings.db_url,
        "SELECT count(DISTINCT similar_uid)::float / (SELECT count(*) FROM model_embeddings) "
        "FROM model_similarity WHERE rank <= 10",
    )[0]
    assert cov == pytest.approx(sql_coverage)
    assert gini >= 0 and skew == pytest.approx(stored["hubness"]["skewness"])
    top = stored["hubness"]["top_hubs"]
    (top_count,) = query(
        settings.db_url,
        "SELECT count(*) FROM model_similarity WHERE rank <= 10 GROUP BY similar_uid ORDER BY 1 DESC LIMIT 1",
    )[0]
    assert top[0][1] == top_count and len(top) == 10
    assert sum(stored["hubness"]["histogram"]) == 40
    # Models 0, 1 and 2 have the same picture: three pairs at cosine 1.
    same = sorted(m.uid for m in catalog.models[:3])
    assert dups == 3
    assert sorted({u for a, b, _ in stored["near_duplicates"]["pairs"] for u in (a, b)}) == same
    # Every precision is a share, and none is claimed beyond the lists' length.
    for method in stored["methods"].values():
        for value in method["precision"].values():
            assert value is None or 0.0 <= value <= 1.0
    assert stored["methods"]["published"]["precision"]["20"] is None, "k above top_n is not claimed"
    assert quality["methods"]["csls"]["pool"] == 40

    for statement in readme_quality_sql():
        assert query(settings.db_url, statement), f"no rows from the README example:\n{statement}"

    evaluation.evaluate(settings, run_id="manual__1")
    assert query(settings.db_url, "SELECT count(*) FROM similarity_quality") == [(1,)], (
        "a rerun replaces its row"
    )
    evaluation_main(
        ["--db-url", settings.db_url, "--thumbnail-store", settings.thumbnail_store, "--run-id", "cli"]
    )
    assert query(settings.db_url, "SELECT run_id FROM similarity_quality ORDER BY run_id") == [
        ("cli",),
        ("manual__1",),
    ]


def test_a_small_sample_adds_the_fair_embedding_opponent_and_broken_thumbnails_are_recorded(pipeline):
    _, settings = pipeline
    (victim,) = query(settings.db_url, "SELECT uid FROM model_thumbnails ORDER BY uid LIMIT 1")[0]
    execute(
        settings.db_url,
        "UPDATE model_thumbnails SET stored_path = 'zz/missing.jpg' WHERE uid = %s",
        (victim,),
    )
    quality = evaluation.evaluate(settings.with_overrides(evaluation_sample_size=40), run_id="r")
    assert quality["colour_failures"]["count"] == 1
    assert "FileNotFoundError" in quality["colour_failures"]["examples"][victim]
    assert quality["methods"]["colour"]["pool"] == 39

    small = evaluation.evaluate(
        settings.with_overrides(evaluation_sample_size=16, evaluation_seed=1), run_id="s"
    )
    assert small["sample_size"] == 16 and small["methods"]["published"]["pool"] == 40
    assert small["methods"]["embedding_sample"]["pool"] == small["methods"]["colour"]["pool"] <= 16
    again = evaluation.evaluate(
        settings.with_overrides(evaluation_sample_size=16, evaluation_seed=1), run_id="s"
    )
    assert again["methods"] == small["methods"], "same seed, same numbers"


def test_nothing_published_is_an_error(make_settings):
    settings = make_settings()
    with pytest.raises(evaluation.NothingToEvaluate, match="model_similarity is empty"):
        evaluation.evaluate(settings, run_id="x")
    assert query(settings.db_url, "SELECT count(*) FROM similarity_quality") == [(0,)]
