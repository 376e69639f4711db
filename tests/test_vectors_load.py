"""load_vectors against the real database: binary COPY, checks, reruns, the HNSW index, SQL search."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import add_catalogue, execute, query
from sketchfab_similarity import similarity, vectors
from sketchfab_similarity.core import pgcopy
from sketchfab_similarity.core.db import connect
from sketchfab_similarity.core.featurespec import FeatureSpec
from sketchfab_similarity.core.settings import Settings, environment_values
from sketchfab_similarity.core.store import ArtifactStore, FeatureBatch
from sketchfab_similarity.tasks import refresh_parts
from sketchfab_similarity.vectors import hnsw
from sketchfab_similarity.vectors.load import LoadStats


def unit_vectors(rng: np.random.Generator, count: int) -> np.ndarray:
    out = rng.normal(size=(count, 512)).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def uids_for(count: int, offset: int = 0) -> list[str]:
    return [f"{0x10000000 * (i % 16) + i + offset:032x}" for i in range(count)]


def add_models(db_url: str, uids: list[str]) -> None:
    execute(
        db_url,
        "INSERT INTO sketchfab_models (uid, name, published_at, raw, viewer_url) "
        "SELECT u, 'model ' || u, now(), '{}', 'https://sketchfab.com/3d-models/' || u "
        "FROM unnest(%s::text[]) u ON CONFLICT (uid) DO NOTHING",
        (uids,),
    )


def stored(db_url: str) -> dict[str, np.ndarray]:
    rows = query(db_url, "SELECT uid, embedding::text FROM model_embeddings")
    return {u: np.array([float(x) for x in e.strip("[]").split(",")], dtype=np.float32) for u, e in rows}


def test_copy_payload_is_the_same_packed_row_by_row_or_as_one_array():
    rng = np.random.default_rng(0)
    columns = [
        np.array([b"a" * 32, b"b" * 32]),
        rng.normal(size=(2, 512)).astype(np.float32),
        np.array([7, -1], np.int32),
        np.array([2**40, -5], np.int64),
        np.array([0.5, -0.25], np.float32),
    ]
    assert pgcopy.copy_rows(columns) == pgcopy._copy_rows_packed(columns)


def test_refresh_parts_come_from_the_environment():
    def parts(environ):
        return refresh_parts(Settings(**environment_values(environ)))

    assert parts({}) == [{"index": 0, "count": 1}]
    assert parts({"AIRFLOW_VAR_SIMILARITY_REFRESH_PARTS": "3"})[2] == {"index": 2, "count": 3}
    with pytest.raises(ValueError, match="similarity_refresh_parts must be >= 1, got 0"):
        parts({"AIRFLOW_VAR_SIMILARITY_REFRESH_PARTS": "0"})
    with pytest.raises(ValueError, match="similarity_refresh_parts must be an integer"):
        parts({"AIRFLOW_VAR_SIMILARITY_REFRESH_PARTS": "two"})


@pytest.mark.integration
def test_vectors_round_trip_bit_exact_through_binary_copy(make_settings):
    settings = make_settings()
    rng = np.random.default_rng(1)
    uids = uids_for(300)
    add_models(settings.db_url, uids)
    matrix = unit_vectors(rng, 300)
    matrix[0, :5] = [1e-38, -0.0, 3.4e38 / 1e38, np.float32(1 / 3), -1e-45]  # odd floats survive too
    matrix[0] /= np.linalg.norm(matrix[0])
    stats = LoadStats()
    vectors.load_batch(settings.db_url, FeatureBatch(uids, ["c" * 64] * 300, matrix, "v1"), stats)
    assert (stats.loaded, stats.changed, stats.rejected) == (300, 300, 0)
    read_uids, read = pgcopy.read_embeddings(settings.db_url, "v1")
    assert read_uids.tolist() == sorted(uids)
    order = np.argsort(uids)
    assert np.array_equal(read.view(np.uint32), matrix[order].view(np.uint32))
    assert all(np.array_equal(v, matrix[uids.index(u)]) for u, v in stored(settings.db_url).items())


@pytest.mark.integration
def test_bad_vectors_are_rejected_with_their_reason_and_the_batch_goes_on(make_settings):
    settings = make_settings()
    rng = np.random.default_rng(2)
    uids = uids_for(8)
    add_models(settings.db_url, uids[:7])  # uids[7] has no model row
    matrix = unit_vectors(rng, 8)
    matrix[1, 3] = np.nan
    matrix[2, 0] = np.inf
    matrix[3] *= 2.0
    batch_uids = uids[:4] + ["NOT-A-UID", uids[5], uids[5], uids[7]]
    stats = LoadStats()
    vectors.load_batch(settings.db_url, FeatureBatch(batch_uids, ["h"] * 8, matrix, "v1"), stats)
    assert stats.loaded == 2 and stats.rejected == 6
    assert set(stored(settings.db_url)) == {uids[0], uids[5]}
    reasons = stats.reject_reasons
    assert reasons[uids[1]].startswith("not finite") and reasons[uids[2]].startswith("not finite")
    assert reasons[uids[3]].startswith("norm: 2")
    assert reasons["NOT-A-UID"].startswith("uid:")
    assert reasons[uids[5]].startswith("duplicate")  # the earlier row; the later one is stored
    assert np.array_equal(stored(settings.db_url)[uids[5]], matrix[6])
    assert reasons[uids[7]].startswith("unknown model")
    assert stats.rejects_by_reason == {
        "not finite": 2,
        "norm": 1,
        "uid": 1,
        "duplicate": 1,
        "unknown model": 1,
    }

    wrong_dim = FeatureBatch(uids[:2], ["h", "h"], np.ones((2, 300), np.float32) / np.sqrt(300), "v1")
    more = LoadStats()
    vectors.load_batch(settings.db_url, wrong_dim, more)
    assert more.rejected == 2 and more.reject_reasons[uids[0]].startswith(
        "dimension: vectors have shape (2, 300)"
    )


@pytest.mark.integration
def test_rerun_is_harmless_and_only_real_changes_are_written(make_settings):
    settings = make_settings()
    rng = np.random.default_rng(3)
    uids = uids_for(50)
    add_models(settings.db_url, uids)
    matrix = unit_vectors(rng, 50)
    batch = FeatureBatch(uids, [f"h{i}" for i in range(50)], matrix, "v1")
    vectors.load_batch(settings.db_url, batch, LoadStats())
    before = query(
        settings.db_url, "SELECT uid, embedding::text, extracted_at FROM model_embeddings ORDER BY uid"
    )
    again = LoadStats()
    vectors.load_batch(settings.db_url, batch, again)
    assert (again.loaded, again.changed) == (50, 0)
    assert (
        query(settings.db_url, "SELECT uid, embedding::text, extracted_at FROM model_embeddings ORDER BY uid")
        == before
    )
    changed = matrix.copy()
    changed[4] = unit_vectors(rng, 1)[0]
    third = LoadStats()
    vectors.load_batch(settings.db_url, FeatureBatch(uids, batch.content_hashes, changed, "v1"), third)
    assert third.changed == 1


def write_files(settings, uids: list[str], matrix: np.ndarray, chunk: int) -> list[str]:
    store = ArtifactStore(settings.thumbnail_store)
    version = FeatureSpec.from_settings(settings).version
    keys = []
    for start in range(0, len(uids), chunk):
        part = uids[start : start + chunk]
        batch = FeatureBatch(part, [f"hash-{u}" for u in part], matrix[start : start + chunk], version)
        keys.append(store.write_features(batch))
    return keys


def index_state(db_url: str) -> tuple:
    return query(
        db_url,
        "SELECT i.indisvalid, c.reloptions FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
        "WHERE c.relname = 'model_embeddings_hnsw_idx'",
    )[0]


@pytest.mark.integration
def test_bulk_load_rebuilds_the_index_small_loads_keep_it(make_settings):
    settings = make_settings()
    rng = np.random.default_rng(4)
    uids = uids_for(400)
    add_models(settings.db_url, uids)
    matrix = unit_vectors(rng, 400)
    first = vectors.load_vectors(settings, write_files(settings, uids[:300], matrix[:300], 128))
    assert (first.files, first.loaded, first.index) == (3, 300, "built")
    assert index_state(settings.db_url) == (True, ["m=16", "ef_construction=64"])

    small_files = write_files(settings, uids[300:310], matrix[300:310], 128)
    damaged = "features/test/damaged.npz"
    ArtifactStore(settings.thumbnail_store).put(damaged, b"not a zip file")
    small = vectors.load_vectors(settings, [damaged, *small_files])
    assert (small.loaded, small.index, list(small.failed_files)) == (10, "unchanged", [damaged])
    rerun = vectors.load_vectors(settings, write_files(settings, uids[:300], matrix[:300], 128))
    assert (rerun.changed, rerun.index) == (0, "unchanged")

    tuned = settings.with_overrides(hnsw_m=8, hnsw_ef_construction=32, hnsw_ef_search=64)
    assert vectors.load_vectors(tuned, []).index == "rebuilt"
    assert index_state(settings.db_url) == (True, ["m=8", "ef_construction=32"])
    configs = query(
        settings.db_url,
        "SELECT proname, proconfig FROM pg_proc WHERE proname IN ('similar_models_search', 'similar_to_vector')",
    )
    assert all("hnsw.ef_search=64" in config for _, config in configs) and len(configs) == 2

    execute(
        settings.db_url,
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'model_embeddings_hnsw_idx'::regclass",
    )
    assert hnsw.ensure_hnsw_index(tuned) == "rebuilt (was invalid)"
    assert index_state(settings.db_url)[0] is True


@pytest.mark.integration
def test_similar_models_probes_names_and_thumbnails_through_hash_indexes(make_settings):
    """Its 2k probes by uid are most of a call's cost: one bucket page each, not a btree descent."""
    settings = make_settings()
    add_catalogue(settings.db_url, 20000)
    for sql in (
        "INSERT INTO model_similarity (uid, rank, similar_uid, score, feature_version) "
        "SELECT lpad(to_hex(u), 32, '0'), r, lpad(to_hex(u + r), 32, '0'), 1.0 / r, 'f' "
        "FROM generate_series(1, 2000) u, generate_series(1, 10) r",
        "ANALYZE sketchfab_models, model_thumbnails, model_similarity",
    ):
        execute(settings.db_url, sql)
    uid = f"{7:032x}"
    plan = "\n".join(
        r[0] for r in query(settings.db_url, "EXPLAIN SELECT * FROM similar_models(%s, 10)", (uid,))
    )
    assert "sketchfab_models_uid_hash_idx" in plan and "model_thumbnails_uid_hash_idx" in plan, plan
    got = query(settings.db_url, "SELECT rank, uid, thumbnail_url FROM similar_models(%s, 10)", (uid,))
    assert got == [(r, f"{7 + r:032x}", f"https://media.example/{7 + r:032x}") for r in range(1, 11)]


@pytest.mark.integration
def test_sql_functions_and_view(make_settings):
    settings = make_settings(top_n=5)
    rng = np.random.default_rng(5)
    uids = uids_for(60)
    add_models(settings.db_url, uids)
    matrix = unit_vectors(rng, 60)
    vectors.load_vectors(settings, write_files(settings, uids, matrix, 64))
    similarity.refresh_similarity(settings)
    uid = uids[10]
    listed = query(
        settings.db_url,
        "SELECT similar_uid, score FROM model_similarity WHERE uid = %s ORDER BY rank",
        (uid,),
    )
    got = query(
        settings.db_url, "SELECT rank, uid, name, score, viewer_url FROM similar_models(%s, 3)", (uid,)
    )
    assert [r[0] for r in got] == [1, 2, 3] and [r[1] for r in got] == [u for u, _ in listed[:3]]
    assert got[0][2] == f"model {listed[0][0]}" and got[0][4].endswith(listed[0][0])
    assert query(settings.db_url, "SELECT * FROM similar_models('ffffffffffffffffffffffffffffffff', 5)") == []
    assert len(query(settings.db_url, "SELECT * FROM similar_models(%s, 50)", (uid,))) == 5  # capped by top_n

    view = query(
        settings.db_url,
        "SELECT rank, similar_uid, similar_name, score FROM model_recommendations WHERE uid = %s ORDER BY rank",
        (uid,),
    )
    assert [(r[1], r[3]) for r in view] == listed and view[0][2] == f"model {listed[0][0]}"

    # Ad-hoc search by vector: its own vector comes first; exact neighbours follow (60 vectors:
    # the HNSW graph with ef_search=100 finds them all).
    literal = "[" + ",".join(repr(float(x)) for x in matrix[10]) + "]"
    found = query(
        settings.db_url, "SELECT rank, uid, score FROM similar_to_vector(%s::vector, 4)", (literal,)
    )
    assert [r[1] for r in found] == [uid] + [u for u, _ in listed[:3]]
    assert abs(found[0][2] - 1.0) < 1e-6
    assert (
        query(
            settings.db_url, "SELECT * FROM similar_to_vector(%s::vector, 3, 'no-such-version')", (literal,)
        )
        == []
    )

    # A model found deleted on Sketchfab leaves the answers at once (its list entries go at the
    # next refresh); the list stays k long.
    execute(settings.db_url, "UPDATE sketchfab_models SET deleted_at = now() WHERE uid = %s", (listed[0][0],))
    got = query(settings.db_url, "SELECT rank, uid FROM similar_models(%s, 3)", (uid,))
    assert got == [(1, listed[1][0]), (2, listed[2][0]), (3, listed[3][0])]
    execute(settings.db_url, "UPDATE sketchfab_models SET deleted_at = NULL WHERE uid = %s", (listed[0][0],))

    # A model that has a vector but no list yet is answered from the index.
    execute(settings.db_url, "DELETE FROM model_similarity WHERE uid = %s", (uid,))
    fallback = query(settings.db_url, "SELECT uid FROM similar_models(%s, 3)", (uid,))
    assert [r[0] for r in fallback] == [u for u, _ in listed[:3]]


def readme_sql_examples() -> list[str]:
    """The statements of the README's "SQL for users" block, in order."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## SQL for users", 1)[1]
    block = section.split("```sql\n", 1)[1].split("```", 1)[0]
    code = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in code.split(";") if statement.strip()]


@pytest.mark.integration
def test_readme_sql_examples_run_as_written(make_settings):
    settings = make_settings(top_n=5)
    uids = uids_for(40)
    add_models(settings.db_url, uids)
    vectors.load_vectors(
        settings, write_files(settings, uids, unit_vectors(np.random.default_rng(9), 40), 64)
    )
    similarity.refresh_similarity(settings)
    statements = readme_sql_examples()
    assert len(statements) >= 6
    example_uids = sorted(set(re.findall(r"'([0-9a-f]{32})'", "\n".join(statements))))
    assert example_uids, "the examples name models by uid"
    with connect(settings.db_url) as conn, conn.cursor() as cur:
        for statement in statements:
            for example, uid in zip(example_uids, uids, strict=False):
                statement = statement.replace(example, uid)
            cur.execute(statement)
            if statement.upper().startswith("SELECT"):
                assert cur.fetchall(), f"no rows from the README example:\n{statement}"
