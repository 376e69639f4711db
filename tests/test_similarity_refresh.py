"""refresh_similarity against the real database: incremental == full, parts, atomic publish."""

from __future__ import annotations

import threading
import time

import numpy as np
import psycopg2
import pytest
from helpers import assert_similarity_is_exact, execute, query
from sketchfab_similarity import similarity
from sketchfab_similarity.core.featurespec import FeatureSpec
from sketchfab_similarity.core.sharding import Shard
from sketchfab_similarity.core.store import FeatureBatch
from sketchfab_similarity.similarity import plan as refresh_plan
from sketchfab_similarity.vectors.load import LoadStats, load_batch
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.integration


def random_uids(rng: np.random.Generator, count: int) -> list[str]:
    return [bytes(rng.integers(0, 256, 16, dtype=np.uint8)).hex() for _ in range(count)]


class Vectors:
    """Unit vectors, by default with many exact ties: most are copies of a small pool of sparse vectors."""

    def __init__(self, rng: np.random.Generator, copies: float = 0.6) -> None:
        self.rng = rng
        self.copies = copies
        pool = (rng.random((12, 512)) < 0.02).astype(np.float32) + np.eye(12, 512, dtype=np.float32)
        self.pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)

    def make(self, count: int) -> np.ndarray:
        out = self.rng.normal(size=(count, 512)).astype(np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        copies = self.rng.random(count) < self.copies
        out[copies] = self.pool[self.rng.integers(0, len(self.pool), copies.sum())]
        return out


def put_vectors(settings, uids: list[str], vectors: np.ndarray, version: str | None = None) -> None:
    execute(
        settings.db_url,
        "INSERT INTO sketchfab_models (uid, name, published_at, raw, viewer_url) "
        "SELECT u, 'model ' || u, now(), '{}', 'https://sketchfab.com/3d-models/' || u "
        "FROM unnest(%s::text[]) u ON CONFLICT (uid) DO NOTHING",
        (uids,),
    )
    version = version or FeatureSpec.from_settings(settings).version
    hashes = [f"h{np.random.default_rng().integers(1 << 62):x}" for _ in uids]
    stats = LoadStats()
    load_batch(settings.db_url, FeatureBatch(uids, hashes, vectors, version), stats)
    assert stats.rejected == 0


def remove_models(settings, uids: list[str]) -> None:
    execute(settings.db_url, "DELETE FROM sketchfab_models WHERE uid = ANY(%s)", (uids,))


def table(db_url: str) -> list[tuple]:
    return query(
        db_url, "SELECT uid, rank, similar_uid, score, feature_version FROM model_similarity ORDER BY 1, 2"
    )


def current_uids(db_url: str) -> list[str]:
    return [r[0] for r in query(db_url, "SELECT uid FROM model_embeddings ORDER BY uid")]


@pytest.mark.parametrize(("seed", "n"), [(11, 6), (12, 3), (13, 10)])
def test_incremental_equals_full_rebuild_over_random_sequences(make_settings, monkeypatch, seed, n):
    # Take the incremental path whenever it is possible, however much it has to recompute.
    monkeypatch.setattr(refresh_plan, "INCREMENTAL_LIMIT", 1.0)
    rng = np.random.default_rng(seed)
    vectors = Vectors(rng)
    settings = make_settings(top_n=n, refresh_tile=32)
    modes = []
    for step in range(30):
        uids = current_uids(settings.db_url)
        op = rng.choice(["insert", "insert", "delete", "change", "mixed"]) if uids else "insert"
        if op in ("insert", "mixed"):
            count = int(rng.integers(1, 25))
            put_vectors(settings, random_uids(rng, count), vectors.make(count))
        if op in ("delete", "mixed") and uids:
            remove_models(
                settings, list(rng.choice(uids, min(len(uids), int(rng.integers(1, 6))), replace=False))
            )
        if op in ("change", "mixed") and uids:
            changed = list(rng.choice(uids, min(len(uids), int(rng.integers(1, 6))), replace=False))
            put_vectors(settings, changed, vectors.make(len(changed)))
        stats = similarity.refresh_similarity(settings)
        modes.append(stats.mode)
        assert stats.published or stats.skipped_unchanged
        incremental = table(settings.db_url)

        full = similarity.refresh_similarity(settings, full=True)
        assert full.mode == "full" and full.published
        assert full.rows_written == 0, f"step {step} ({op}): full rebuild differs from the incremental table"
        assert table(settings.db_url) == incremental
        if step % 6 == 5:
            assert_similarity_is_exact(settings.db_url, n)
    assert modes[0] == "full" and "full" not in modes[1:] and modes.count("incremental") >= 25, modes


def test_incremental_touches_only_affected_lists(make_settings):
    rng = np.random.default_rng(3)
    vectors = Vectors(rng)
    settings = make_settings(top_n=5)
    put_vectors(settings, random_uids(rng, 300), vectors.make(300))
    first = similarity.refresh_similarity(settings)
    assert first.mode == "full" and first.reason == "no published table yet" and first.rows == 300 * 5

    put_vectors(settings, random_uids(rng, 3), vectors.make(3))
    second = similarity.refresh_similarity(settings)
    assert (second.mode, second.new, second.changed, second.removed) == ("incremental", 3, 0, 0)
    assert second.recomputed == 3 and second.updated < 300
    assert second.rows == 303 * 5
    assert_similarity_is_exact(settings.db_url, 5)

    assert similarity.refresh_similarity(settings).skipped_unchanged


def test_feature_version_or_n_change_rebuilds_everything(make_settings):
    rng = np.random.default_rng(4)
    vectors = Vectors(rng)
    settings = make_settings(top_n=4)
    uids = random_uids(rng, 80)
    put_vectors(settings, uids, vectors.make(80))
    similarity.refresh_similarity(settings)

    other = make_settings(top_n=4, random_seed=99)
    put_vectors(other, uids, vectors.make(80))
    rebuilt = similarity.refresh_similarity(other)
    assert rebuilt.mode == "full" and rebuilt.reason.startswith("feature version changed")
    versions = query(other.db_url, "SELECT DISTINCT feature_version FROM model_similarity")
    assert versions == [(FeatureSpec.from_settings(other).version,)]
    assert_similarity_is_exact(other.db_url, 4)

    wider = similarity.refresh_similarity(other, top_n=7)
    assert wider.mode == "full" and wider.reason == "N changed from 4 to 7" and wider.rows == 80 * 7
    assert_similarity_is_exact(other.db_url, 7)


def test_hand_edited_table_is_repaired_by_a_full_rebuild(make_settings):
    rng = np.random.default_rng(5)
    settings = make_settings(top_n=3)
    put_vectors(settings, random_uids(rng, 30), Vectors(rng).make(30))
    similarity.refresh_similarity(settings)
    execute(settings.db_url, "DELETE FROM model_similarity WHERE rank = 2")
    # The next incremental refresh reads lists a new model enters, notices, and rebuilds.
    put_vectors(settings, random_uids(rng, 2), Vectors(rng).make(2))
    repaired = similarity.refresh_similarity(settings)
    assert repaired.mode == "full" and "differ from similarity_members" in repaired.reason
    assert_similarity_is_exact(settings.db_url, 3)
    # A forced full rebuild repairs any edit, touched or not.
    execute(settings.db_url, "UPDATE model_similarity SET score = 0 WHERE rank = 1")
    assert similarity.refresh_similarity(settings, full=True).rows_written == 32
    assert_similarity_is_exact(settings.db_url, 3)


def test_bookkeeping_with_an_odd_width_uid_is_rebuilt_not_a_crash(make_settings):
    rng = np.random.default_rng(9)
    settings = make_settings(top_n=3)
    put_vectors(settings, random_uids(rng, 20), Vectors(rng).make(20))
    similarity.refresh_similarity(settings)
    execute(settings.db_url, "INSERT INTO similarity_members VALUES ('short-uid', 1, 0, NULL, NULL)")
    put_vectors(settings, random_uids(rng, 2), Vectors(rng).make(2))
    repaired = similarity.refresh_similarity(settings)
    assert repaired.mode == "full" and "not 32 characters long" in repaired.reason
    assert_similarity_is_exact(settings.db_url, 3)
    assert query(settings.db_url, "SELECT uid FROM similarity_members WHERE uid = 'short-uid'") == []
    assert similarity.refresh_similarity(settings).skipped_unchanged


def test_parts_publish_once_when_the_last_finishes_and_match_a_single_refresh(make_settings):
    rng = np.random.default_rng(6)
    vectors = Vectors(rng)
    settings = make_settings(top_n=5, refresh_tile=64)
    put_vectors(settings, random_uids(rng, 200), vectors.make(200))
    before = table(settings.db_url)
    assert before == []
    results = [similarity.refresh_similarity(settings, shard=s, run_key="run-1") for s in Shard.all(3)]
    assert [r.published for r in results] == [False, False, True]
    assert sum(r.recomputed for r in results) == 200
    in_parts = table(settings.db_url)
    assert similarity.refresh_similarity(settings, full=True).rows_written == 0
    assert table(settings.db_url) == in_parts

    # Incremental, in parts, with a retry of a part that already ran.
    put_vectors(settings, random_uids(rng, 12), vectors.make(12))
    remove_models(settings, current_uids(settings.db_url)[:4])
    first = similarity.refresh_similarity(settings, shard=Shard(0, 2), run_key="run-2")
    again = similarity.refresh_similarity(settings, shard=Shard(0, 2), run_key="run-2")
    last = similarity.refresh_similarity(settings, shard=Shard(1, 2), run_key="run-2")
    assert (first.mode, first.published, again.published, last.published) == (
        "incremental",
        False,
        False,
        True,
    )
    assert similarity.refresh_similarity(settings, full=True).rows_written == 0
    assert_similarity_is_exact(settings.db_url, 5)
    assert query(settings.db_url, "SELECT count(*) FROM similarity_staging")[0][0] == 0


def test_keras_engine_rebuilds_the_same_table_whole_or_in_parts(make_settings):
    rng = np.random.default_rng(8)
    settings = make_settings(top_n=6, refresh_tile=64)
    put_vectors(settings, random_uids(rng, 300), Vectors(rng).make(300))
    similarity.refresh_similarity(settings.with_overrides(refresh_engine="numpy"), full=True)
    on_numpy = table(settings.db_url)
    keras = settings.with_overrides(refresh_engine="keras")
    assert similarity.refresh_similarity(keras, full=True).rows_written == 0
    parts = [similarity.refresh_similarity(keras, full=True, shard=s, run_key="keras") for s in Shard.all(2)]
    assert parts[-1].published and parts[-1].rows_written == 0
    assert table(settings.db_url) == on_numpy
    assert_similarity_is_exact(settings.db_url, 6)


def test_parts_that_saw_different_embeddings_refuse_to_publish(make_settings):
    rng = np.random.default_rng(7)
    vectors = Vectors(rng)
    settings = make_settings(top_n=3)
    put_vectors(settings, random_uids(rng, 40), vectors.make(40))
    similarity.refresh_similarity(settings, shard=Shard(0, 2), run_key="run-x")
    put_vectors(settings, random_uids(rng, 2), vectors.make(2))
    with pytest.raises(RuntimeError, match="saw different embeddings"):
        similarity.refresh_similarity(settings, shard=Shard(1, 2), run_key="run-x")
    assert table(settings.db_url) == []


def test_short_lists_take_new_models_even_below_their_last_entry(make_settings):
    rng = np.random.default_rng(10)
    settings = make_settings(top_n=10)
    base = Vectors(rng, copies=0.0).make(5)
    put_vectors(settings, random_uids(rng, 5), base)
    similarity.refresh_similarity(settings)
    far = -base.sum(axis=0)
    put_vectors(settings, random_uids(rng, 1), (far / np.linalg.norm(far))[None, :])
    stats = similarity.refresh_similarity(settings)
    assert (stats.mode, stats.recomputed, stats.updated) == ("incremental", 1, 5)
    assert stats.rows == 6 * 5
    assert_similarity_is_exact(settings.db_url, 10)


def test_tiny_tables(make_settings):
    rng = np.random.default_rng(8)
    settings = make_settings(top_n=5)
    assert similarity.refresh_similarity(settings).rows == 0
    uids = random_uids(rng, 1)
    put_vectors(settings, uids, Vectors(rng).make(1))
    assert similarity.refresh_similarity(settings).rows == 0
    put_vectors(settings, random_uids(rng, 2), Vectors(rng).make(2))
    assert similarity.refresh_similarity(settings).rows == 3 * 2
    remove_models(settings, current_uids(settings.db_url)[:2])
    assert similarity.refresh_similarity(settings).rows == 0
    assert query(settings.db_url, "SELECT count(*) FROM similarity_members")[0][0] == 1


def test_readers_see_the_old_table_or_the_new_one_never_a_short_list(make_settings):
    rng = np.random.default_rng(9)
    vectors = Vectors(rng, copies=0.0)
    settings = make_settings(top_n=20)
    # Not needed by these readers, and inserting 6,000 vectors into a live HNSW graph takes a while.
    execute(settings.db_url, "DROP INDEX IF EXISTS model_embeddings_hnsw_idx")
    stable = random_uids(rng, 3000)
    put_vectors(settings, stable, vectors.make(3000))
    similarity.refresh_similarity(settings)
    url = make_url(settings.db_url)
    stop = threading.Event()
    errors: list[str] = []
    short: list[tuple] = []
    seen_versions: set[str] = set()
    counts = [0] * 6

    def reader(slot: int) -> None:
        conn = psycopg2.connect(dbname=url.database, user=url.username, host=url.query["host"])
        conn.autocommit = True
        local = np.random.default_rng(slot)
        try:
            with conn.cursor() as cur:
                while not stop.is_set():
                    uid = stable[int(local.integers(len(stable)))]
                    try:
                        if slot % 2:
                            cur.execute("SELECT count(*) FROM similar_models(%s, 10)", (uid,))
                            (rows,) = cur.fetchone()
                            if rows != 10:
                                short.append(("similar_models", uid, rows))
                        else:
                            cur.execute(
                                "SELECT count(*), min(feature_version), max(feature_version) "
                                "FROM model_similarity WHERE uid = %s",
                                (uid,),
                            )
                            rows, low, high = cur.fetchone()
                            if rows != 20 or low != high:
                                short.append(("model_similarity", uid, rows))
                            seen_versions.add(low)
                    except Exception as exc:
                        errors.append(repr(exc))
                    counts[slot] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=reader, args=(slot,)) for slot in range(len(counts))]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        # A full rebuild that replaces every row (new feature version) ...
        other = make_settings(top_n=20, random_seed=1)
        put_vectors(other, stable, vectors.make(3000))
        assert similarity.refresh_similarity(other).mode == "full"
        # ... incremental refreshes with new, changed and removed models ...
        for _ in range(3):
            put_vectors(other, random_uids(rng, 30), vectors.make(30))
            put_vectors(other, stable[-5:], vectors.make(5))
            extra = [u for u in current_uids(other.db_url) if u not in set(stable)][:10]
            remove_models(other, extra)
            assert similarity.refresh_similarity(other).mode == "incremental"
        # ... and a forced rebuild.
        assert similarity.refresh_similarity(other, full=True).published
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert short == []
    assert min(counts) > 20, counts
    assert seen_versions == {FeatureSpec.from_settings(s).version for s in (settings, other)}
