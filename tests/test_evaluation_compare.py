"""The feature-choice comparison on stored thumbnails: real Postgres, real HTTP, real TensorFlow."""

from __future__ import annotations

import json

import pytest
from fake_sketchfab import Catalog, start_server
from sketchfab_similarity import crawl, evaluation, features, similarity, thumbnails, vectors
from sketchfab_similarity.compare_features import main as compare_main
from sketchfab_similarity.evaluation.compare import DEFAULT_VARIANTS, format_table, winner

pytestmark = pytest.mark.integration


def test_compare_prints_every_variant_beside_the_baselines(make_settings, tmp_path, capsys):
    catalog = Catalog.generate(16, seed=12)
    with start_server(catalog) as server:
        settings = make_settings(
            api_base_url=server.api_base_url, thumbnail_hosts=(server.media_host,), input_size=64, top_n=10
        )
        crawl.crawl(settings, crawl.CrawlWindow())
        thumbnails.download_thumbnails(settings)
    out = tmp_path / "compare.json"
    compare_main(
        ["--db-url", settings.db_url, "--thumbnail-store", settings.thumbnail_store, "--weights", "random",
         "--input-size", "64", "--sample-size", "16", "--json", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    names = [r["name"] for r in results]
    assert names == ["baseline: colour histogram", "baseline: random"] + [v.name for v in DEFAULT_VARIANTS]
    dims = {r["name"]: r["dims"] for r in results}
    assert dims["block5_pool flattened (the post)"] == 2 * 2 * 512, "64 px: a 2 x 2 x 512 block5_pool map"
    assert dims["block5_pool avg (pipeline default)"] == 512 and dims["baseline: colour histogram"] == 512
    sizes = {r["name"]: r.get("input_size") for r in results}
    assert sizes["block5_pool avg, input x2"] == 128 and sizes["block5_pool max"] == 64
    for r in results:
        assert all(v is None or 0.0 <= v <= 1.0 for v in r["precision"].values()), r["name"]
        assert r["seconds_per_image"] >= 0.0
    assert results[1]["near_duplicates"] is None, "random lists have no scores"
    assert sum(line.startswith("| ") for line in printed.splitlines()) == len(results) + 1, "header + rows"
    assert "Best precision@10: " in printed
    assert "not ImageNet features" in printed
    assert not winner([{**r, "precision": {int(k): v for k, v in r["precision"].items()}} for r in results])[
        "name"
    ].startswith("baseline")

    # The pipeline's own vectors for the same 16 thumbnails give the same lists as the default variant
    # (engines agree within 1e-4, so a near-tie may swap: allow one swap's worth).
    extracted = features.extract_features(settings)
    vectors.load_vectors(settings, extracted.files)
    similarity.refresh_similarity(settings)
    published = evaluation.evaluate(settings, run_id="r")["methods"]["published"]["precision"]
    default = next(r for r in results if r["name"] == "block5_pool avg (pipeline default)")["precision"]
    for k in ("1", "5", "10"):
        assert default[k] == pytest.approx(published[k], abs=0.05), k


def test_format_table_and_winner_by_hand():
    rows = [
        {"name": "baseline: random", "dims": 0, "seconds_per_image": 0.0, "precision": {10: 0.9, 5: 0.9},
         "tags_jaccard": {10: 0.1}, "coverage": 1.0, "skewness": 0.0, "gini": 0.0, "near_duplicates": None},
        {"name": "a", "dims": 512, "seconds_per_image": 0.002, "precision": {10: 0.5, 5: 0.4},
         "tags_jaccard": {10: 0.2}, "coverage": 0.5, "skewness": 1.234, "gini": 0.3, "near_duplicates": 2},
        {"name": "b", "dims": 512, "seconds_per_image": 0.001, "precision": {10: 0.5, 5: 0.6},
         "tags_jaccard": {10: None}, "coverage": 0.5, "skewness": 1.0, "gini": 0.3, "near_duplicates": 0},
    ]  # fmt: skip
    assert winner(rows)["name"] == "b", "ties on precision@10 go to precision@5; baselines never win"
    table = format_table(rows).splitlines()
    assert len(table) == 5 and table[1] == "|" + "---|" * 12
    assert table[3] == "| a | 512 | 2.0 | n/a | 0.400 | 0.500 | n/a | 0.200 | 0.500 | 1.23 | 0.300 | 2 |"
    assert "| n/a |" in table[4] and table[2].endswith("|  |")
