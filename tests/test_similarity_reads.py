"""What an incremental refresh reads: counted, not timed.

An exact list for a new model needs its score against every vector, so every vector is read,
once per run. Everything else an incremental run reads is bounded by the models that changed:
the bookkeeping is one row per model (read once), published lists are read only for the lists a
new model enters, and the number of statements does not depend on the size of the table.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
from helpers import assert_similarity_is_exact, query
from sketchfab_similarity import similarity
from sketchfab_similarity.similarity import compute, plan, publish, refresh
from test_similarity_refresh import put_vectors, random_uids, remove_models

pytestmark = pytest.mark.integration


class Reads:
    """Counts statements sent by the refresh and rows returned by each of its readers."""

    def __init__(self, monkeypatch) -> None:
        self.statements: list[str] = []
        self.rows: dict[str, list[int]] = {}
        real_connect = plan.connect
        reads = self

        class Cursor:
            def __init__(self, cur) -> None:
                self.cur = cur

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                self.cur.close()

            def execute(self, sql, params=None):
                reads.statements.append(str(sql))
                return self.cur.execute(sql, params)

            def copy_expert(self, sql, file):
                reads.statements.append(str(sql))
                return self.cur.copy_expert(sql, file)

            def __getattr__(self, name):
                return getattr(self.cur, name)

        class Connection:
            def __init__(self, conn) -> None:
                self.conn = conn

            def cursor(self, *args, **kwargs):
                return Cursor(self.conn.cursor(*args, **kwargs))

        @contextmanager
        def counting_connect(db_url):
            with real_connect(db_url) as conn:
                yield Connection(conn)

        for module in (plan, compute, publish):  # the refresh's modules, where they look `connect` up
            monkeypatch.setattr(module, "connect", counting_connect)
        for module, name, size in (
            (plan, "read_embeddings", lambda out: len(out[0])),
            (plan, "read_members", len),
            (compute, "old_lists", len),
            (plan, "lists_containing", len),
        ):
            monkeypatch.setattr(module, name, self.counted(name, getattr(module, name), size))

    def counted(self, name, fn, size):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.rows.setdefault(name, []).append(size(out))
            return out

        return wrapper

    def clear(self) -> None:
        self.statements.clear()
        self.rows.clear()


def vectors(rng: np.random.Generator, count: int) -> np.ndarray:
    out = rng.normal(size=(count, 512)).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def incremental_reads(
    make_settings, monkeypatch, models: int, seed: int
) -> tuple[Reads, refresh.RefreshStats]:
    rng = np.random.default_rng(seed)
    settings = make_settings(top_n=5)
    put_vectors(settings, random_uids(rng, models), vectors(rng, models))
    assert similarity.refresh_similarity(settings).mode == "full"
    reads = Reads(monkeypatch)
    put_vectors(settings, random_uids(rng, 6), vectors(rng, 6))
    stats = similarity.refresh_similarity(settings)
    assert (stats.mode, stats.new) == ("incremental", 6)
    assert_similarity_is_exact(settings.db_url, 5)
    return reads, stats


@pytest.mark.parametrize("models", [400, 1200])
def test_an_incremental_run_reads_each_vector_once_and_lists_only_where_new_models_enter(
    make_settings, monkeypatch, models
):
    reads, stats = incremental_reads(make_settings, monkeypatch, models, seed=models)
    # Every vector once (the exact list of a new model needs them all), the bookkeeping once.
    assert reads.rows["read_embeddings"] == [models + 6]
    assert reads.rows["read_members"] == [models]
    # Published lists: only the tails of the lists new models enter, never the whole table.
    assert len(reads.rows["old_lists"]) == 1
    assert reads.rows["old_lists"][0] <= stats.updated * 5 < models * 5 // 4
    # No model changed or was removed: no list needs to be searched for them.
    assert reads.rows["lists_containing"] == [0]
    # A fixed number of statements, whatever the size of the table (compared across sizes below).
    assert len(reads.statements) == STATEMENTS_PER_INCREMENTAL_RUN, reads.statements


STATEMENTS_PER_INCREMENTAL_RUN = 24
"""Including the count of staged lists that publish checks before it writes (lost staging fails loudly)."""
"""Counted once; the test above checks it at two table sizes, so it cannot grow with the table."""


def test_changed_and_removed_models_read_only_the_lists_that_hold_them(make_settings, monkeypatch):
    rng = np.random.default_rng(5)
    settings = make_settings(top_n=5)
    uids = random_uids(rng, 500)
    put_vectors(settings, uids, vectors(rng, 500))
    similarity.refresh_similarity(settings)
    reads = Reads(monkeypatch)
    put_vectors(settings, uids[:2], vectors(rng, 2))
    remove_models(settings, uids[2:4])
    holders = query(
        settings.db_url,
        "SELECT count(DISTINCT uid) FROM model_similarity WHERE similar_uid = ANY(%s)",
        (uids[:4],),
    )[0][0]
    stats = similarity.refresh_similarity(settings)
    assert (stats.mode, stats.changed, stats.removed) == ("incremental", 2, 2)
    assert reads.rows["read_embeddings"] == [498] and reads.rows["read_members"] == [500]
    assert reads.rows["lists_containing"] == [holders]  # keyed by the replaced models, see README "Scale"
    assert stats.recomputed <= holders + 2
    assert_similarity_is_exact(settings.db_url, 5)
