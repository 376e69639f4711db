"""The streaming embedding reader: rows parsed as the COPY arrives, sorted in place, held once."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import execute
from sketchfab_similarity.core import pgcopy
from sketchfab_similarity.core.featurespec import EMBEDDING_DIM
from sketchfab_similarity.core.store import FeatureBatch
from sketchfab_similarity.vectors.load import LoadStats, load_batch


def copy_payload(uids: list[str], matrix: np.ndarray) -> bytes:
    return pgcopy.copy_rows([np.array(uids, dtype="S"), matrix])


def feed(sink: pgcopy.RowSink, payload: bytes, rng: np.random.Generator) -> None:
    """In pieces of random sizes, as COPY data messages arrive (one row each, or less)."""
    at = 0
    while at < len(payload):
        step = int(rng.integers(1, 5000))
        sink.write(payload[at : at + step])
        at += step


@pytest.mark.parametrize("count", [0, 1, 7, 600])
def test_sink_parses_across_flushes_and_sorts_by_uid(monkeypatch, count):
    monkeypatch.setattr(pgcopy, "SINK_FLUSH", 10_000)  # several flushes, rows split between them
    rng = np.random.default_rng(count)
    uids = [f"{int(v):032x}" for v in rng.choice(10**9, count, replace=False)]
    matrix = rng.normal(size=(count, EMBEDDING_DIM)).astype(np.float32)
    sink = pgcopy.RowSink(count)
    feed(sink, copy_payload(uids, matrix), rng)
    assert sink.finish()
    order = np.argsort(uids)
    assert sink.uids.astype("U32").tolist() == sorted(uids)
    assert np.array_equal(sink.matrix.view(np.uint32), matrix[order].view(np.uint32))


def test_sink_refuses_an_unexpected_layout_or_count():
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(3, EMBEDDING_DIM)).astype(np.float32)
    short_uid = pgcopy.copy_rows([np.array(["abc", "d" * 32, "e" * 32], dtype="S"), matrix])
    sink = pgcopy.RowSink(3)
    sink.write(short_uid)
    assert not sink.finish()
    more_rows_than_counted = pgcopy.RowSink(2)
    more_rows_than_counted.write(copy_payload(["a" * 32, "b" * 32, "c" * 32], matrix))
    assert not more_rows_than_counted.finish()
    fewer = pgcopy.RowSink(4)
    fewer.write(copy_payload(["a" * 32, "b" * 32, "c" * 32], matrix))
    assert not fewer.finish()


@pytest.mark.parametrize("seed", range(4))
def test_permute_rows_in_place(seed):
    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=(200, 3)).astype(np.float32)
    head = np.arange(50) if seed == 0 else rng.permutation(50)  # rows already in place cost nothing
    order = np.concatenate([head, 50 + rng.permutation(150)])
    expected = matrix[order].copy()
    pgcopy.permute_rows(matrix, order)
    assert np.array_equal(matrix, expected)


@pytest.mark.integration
def test_read_embeddings_streams_a_table_loaded_out_of_uid_order(make_settings, monkeypatch):
    monkeypatch.setattr(pgcopy, "SINK_FLUSH", 50_000)
    settings = make_settings()
    rng = np.random.default_rng(9)
    uids = [f"{int(v):032x}" for v in rng.choice(10**12, 500, replace=False)]
    matrix = rng.normal(size=(500, EMBEDDING_DIM)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    execute(
        settings.db_url,
        "INSERT INTO sketchfab_models (uid, name, published_at, raw, viewer_url) "
        "SELECT u, u, now(), '{}', 'https://sketchfab.com/3d-models/' || u FROM unnest(%s::text[]) u",
        (uids,),
    )
    for part in np.array_split(rng.permutation(500), 3):  # three batches, each in random order
        stats = LoadStats()
        batch = FeatureBatch([uids[i] for i in part], ["h"] * len(part), matrix[part], "v1")
        load_batch(settings.db_url, batch, stats)
        assert stats.loaded == len(part)
    read_uids, read = pgcopy.read_embeddings(settings.db_url, "v1")
    order = np.argsort(uids)
    assert read_uids.tolist() == sorted(uids)
    assert np.array_equal(read.view(np.uint32), matrix[order].view(np.uint32))
    assert pgcopy.read_embeddings(settings.db_url, "v2")[1].shape == (0, EMBEDDING_DIM)
