"""load_vectors against a naive per-row INSERT and a text COPY, with ratios measured in the same run.

All three write the same random unit 512-d vectors into `model_embeddings` (upsert by uid)
with no HNSW index on the table (the loader drops it for a bulk load and rebuilds it after;
that build is timed on its own). The baselines run on a sample, since they are slow.

    python bench/bench_load.py              # 50,000 vectors, baselines on 2,000 / 10,000
    python bench/bench_load.py --quick      # 10,000 vectors, baselines on 1,000 / 5,000
"""

from __future__ import annotations

import argparse
import io
import logging
import tempfile
import time

import numpy as np
from similarity_bench_db import (
    add_models,
    connect,
    model_uids,
    print_table,
    random_unit,
    settings_for,
    temp_database,
)
from sketchfab_similarity import vectors
from sketchfab_similarity.core.store import ArtifactStore, FeatureBatch

VERSION = "bench"
UPSERT = """
    INSERT INTO model_embeddings AS e (uid, embedding, feature_version, content_hash)
    SELECT s.uid, s.embedding, %s, s.content_hash FROM staging s
    ON CONFLICT (uid) DO UPDATE SET embedding = EXCLUDED.embedding, content_hash = EXCLUDED.content_hash
"""


def vector_literals(matrix: np.ndarray) -> list[str]:
    """pgvector text literals. Nine significant digits round-trip every float32 exactly; one
    %-format per vector is the fastest exact text formatting we found in Python (5x faster than
    formatting each element)."""
    vector_format = "[" + ",".join(["%.9g"] * matrix.shape[1]) + "]"
    return [vector_format % tuple(vector) for vector in matrix.tolist()]


def naive_inserts(socket_dir: str, uids: list[str], matrix: np.ndarray) -> float:
    """One INSERT ... ON CONFLICT per vector, pgvector's text literal, one transaction."""
    start = time.perf_counter()
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute("BEGIN")
        for uid, vector in zip(uids, vector_literals(matrix), strict=True):
            cur.execute(
                "INSERT INTO model_embeddings (uid, embedding, feature_version, content_hash) "
                "VALUES (%s, %s::vector, %s, 'h') ON CONFLICT (uid) DO UPDATE SET embedding = EXCLUDED.embedding",
                (uid, vector, VERSION),
            )
        cur.execute("COMMIT")
    return time.perf_counter() - start


def text_copy(socket_dir: str, uids: list[str], matrix: np.ndarray) -> float:
    """Text COPY into staging, then one upsert (formatting the text is part of the cost)."""
    start = time.perf_counter()
    lines = "".join(
        f"{uid}\t{vector}\th\n" for uid, vector in zip(uids, vector_literals(matrix), strict=True)
    )
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute(
            "CREATE TEMP TABLE staging (uid text, embedding vector(512), content_hash text) ON COMMIT DROP"
        )
        cur.copy_expert("COPY staging FROM STDIN", io.StringIO(lines))
        cur.execute(UPSERT, (VERSION,))
        cur.execute("COMMIT")
    return time.perf_counter() - start


def feature_files(store_root: str, uids: list[str], matrix: np.ndarray, chunk: int = 2048) -> list[str]:
    """The files extract_features writes (2,048 vectors each)."""
    store = ArtifactStore(store_root)
    keys = []
    for start in range(0, len(uids), chunk):
        part = uids[start : start + chunk]
        keys.append(
            store.write_features(
                FeatureBatch(part, [f"h{u}" for u in part], matrix[start : start + chunk], VERSION)
            )
        )
    return keys


def reset(socket_dir: str) -> None:
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE model_embeddings")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vectors", type=int, default=50_000)
    parser.add_argument("--naive-sample", type=int, default=2_000)
    parser.add_argument("--text-sample", type=int, default=10_000)
    parser.add_argument("--live-index-sample", type=int, default=1_000)
    parser.add_argument("--quick", action="store_true", help="10,000 vectors, smaller baseline samples")
    args = parser.parse_args()
    if args.quick:
        args.vectors, args.naive_sample, args.text_sample, args.live_index_sample = 10_000, 1_000, 5_000, 500
    logging.basicConfig(level=logging.WARNING)
    total = args.vectors + args.live_index_sample
    uids = model_uids(total)
    matrix = random_unit(total, seed=0)

    with temp_database() as (db_url, socket_dir):
        add_models(socket_dir, uids)
        with connect(socket_dir) as conn, conn.cursor() as cur:
            cur.execute("DROP INDEX IF EXISTS model_embeddings_hnsw_idx")
        naive = naive_inserts(socket_dir, uids[: args.naive_sample], matrix[: args.naive_sample])
        reset(socket_dir)
        text = text_copy(socket_dir, uids[: args.text_sample], matrix[: args.text_sample])
        reset(socket_dir)

        store = tempfile.mkdtemp(prefix="bench-store-")
        settings = settings_for(db_url, store, vgg16_weights="random")
        keys = feature_files(store, uids[: args.vectors], matrix[: args.vectors])
        loaded = vectors.load_vectors(settings, keys)  # empty table: bulk path, index built after
        assert loaded.loaded == args.vectors and loaded.index == "built", loaded
        load_s = loaded.seconds["check"] + loaded.seconds["load"]
        rerun = vectors.load_vectors(settings, keys)
        assert rerun.changed == 0 and rerun.index == "unchanged"

        extra = feature_files(store + "/extra", uids[args.vectors :], matrix[args.vectors :])
        live = vectors.load_vectors(settings.with_overrides(thumbnail_store=store + "/extra"), extra)
        assert live.index == "unchanged" and live.loaded == args.live_index_sample

    rate = args.vectors / load_s
    rows = [
        [
            f"naive INSERT per row ({args.naive_sample:,})",
            args.naive_sample / naive,
            rate / (args.naive_sample / naive),
        ],
        [
            f"text COPY + upsert ({args.text_sample:,})",
            args.text_sample / text,
            rate / (args.text_sample / text),
        ],
        [f"load_vectors: files, checks, binary COPY + upsert ({args.vectors:,})", rate, 1.0],
        [
            f"  rerun of the same files (nothing written, {rerun.seconds['load']:.2f}s)",
            args.vectors / rerun.seconds["load"],
            "",
        ],
        [
            f"  into a live HNSW index ({args.live_index_sample:,} new, incremental)",
            args.live_index_sample / live.seconds["load"],
            "",
        ],
    ]
    print_table(
        "Loading 512-d vectors into model_embeddings (no HNSW index during the load unless stated)",
        ["method", "vectors/s", "load_vectors is x faster"],
        rows,
    )
    print(
        "  load_vectors phases: "
        + ", ".join(f"{phase} {seconds:.2f}s" for phase, seconds in loaded.seconds.items())
    )
    print(
        f"  HNSW index (m=16, ef_construction=64) built after the bulk load: {loaded.seconds['index']:.1f}s "
        f"for {args.vectors:,} vectors ({args.vectors / loaded.seconds['index']:,.0f}/s), CONCURRENTLY"
    )


if __name__ == "__main__":
    main()
