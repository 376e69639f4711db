"""Full rebuild, incremental refresh and the pgvector way, with ratios measured in the same run.

1. Exact top-N of N random unit 512-d vectors: our kernel (symmetric blocked sgemm, group-maxima
   partial sort, float64 rescoring) against FAISS IndexFlatIP (exact) on the same vectors.
2. The same full rebuild end to end through refresh_similarity (read vectors, compute, stage, publish).
3. Incremental: k new vectors into the N, refresh_similarity, database writes included; then a
   forced full rebuild must write nothing (the incremental table is the full one).
4. The pgvector way on a subset: HNSW index + a materialised view of LATERAL index queries,
   its build time and its recall against the exact lists.

    python bench/bench_refresh.py            # 50,000 x 512, 500 new, pgvector way on 10,000
    python bench/bench_refresh.py --quick    # 10,000 x 512, 100 new, pgvector way on 2,000
    python bench/bench_refresh.py --keras    # also the Keras-device engine (the GPU path, if any)
"""

from __future__ import annotations

import argparse
import io
import logging
import time

import numpy as np
from similarity_bench_db import (
    add_models,
    connect,
    model_uids,
    openblas_kernels,
    print_table,
    random_unit,
    settings_for,
    temp_database,
)
from sketchfab_similarity import similarity
from sketchfab_similarity.core.featurespec import FeatureSpec
from sketchfab_similarity.core.store import FeatureBatch
from sketchfab_similarity.similarity import topn, topn_keras
from sketchfab_similarity.vectors.load import LoadStats, load_batch


def load(settings, uids: list[str], matrix: np.ndarray, version: str) -> None:
    for start in range(0, len(uids), 4096):
        stats = LoadStats()
        batch = FeatureBatch(
            uids[start : start + 4096],
            ["h"] * len(uids[start : start + 4096]),
            matrix[start : start + 4096],
            version,
        )
        load_batch(settings.db_url, batch, stats)
        assert stats.rejected == 0


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def faiss_top_n(matrix: np.ndarray, n: int) -> float:
    import faiss

    start = time.perf_counter()
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    index.search(matrix, n + 1)
    return time.perf_counter() - start


def pgvector_way(
    socket_dir: str, matrix: np.ndarray, n: int, ef_search: int
) -> tuple[float, float, float, float]:
    """(index build s, view build s, recall@n, our exact kernel s) on its own table."""
    uids = model_uids(len(matrix))
    exact, ours = timed(topn.top_n_all, matrix, n)
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE pgv (uid text PRIMARY KEY, embedding vector(512))")
        text = "".join(
            f"{u}\t[{','.join(map(repr, v.tolist()))}]\n" for u, v in zip(uids, matrix, strict=True)
        )
        cur.copy_expert("COPY pgv FROM STDIN", io.StringIO(text))
        cur.execute("SET maintenance_work_mem = '1GB'")
        _, build = timed(
            cur.execute,
            "CREATE INDEX ON pgv USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)",
        )
        cur.execute(f"SET hnsw.ef_search = {max(ef_search, n + 1):d}")
        _, view = timed(
            cur.execute,
            "CREATE MATERIALIZED VIEW pgv_top AS SELECT q.uid, n.similar_uid FROM pgv q CROSS JOIN LATERAL ("
            " SELECT e.uid AS similar_uid FROM pgv e WHERE e.uid <> q.uid"
            " ORDER BY e.embedding <=> q.embedding LIMIT %s) n",
            (n,),
        )
        cur.execute("SELECT uid, similar_uid FROM pgv_top")
        found = cur.fetchall()
    position = {u: i for i, u in enumerate(uids)}
    truth = {(i, int(j)) for i in range(len(uids)) for j in exact[0][i]}
    hits = sum((position[u], position[s]) in truth for u, s in found)
    return build, view, hits / len(truth), ours


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=50_000)
    parser.add_argument("--new", type=int, default=500)
    parser.add_argument("--top-n", type=int, default=20)
    parser.add_argument("--pgvector-models", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="10,000 models, 100 new, pgvector way on 2,000")
    parser.add_argument("--keras", action="store_true", help="also time the Keras engine (GPU when visible)")
    args = parser.parse_args()
    if args.quick:
        args.models, args.new, args.pgvector_models = 10_000, 100, 2_000
    logging.basicConfig(level=logging.WARNING)
    print(f"{args.models:,} x 512 random unit vectors, top-{args.top_n}; BLAS kernels: {openblas_kernels()}")

    matrix = random_unit(args.models + args.new, seed=0)
    base, extra = matrix[: args.models], matrix[args.models :]
    exact, ours = timed(topn.top_n_all, base, args.top_n)
    theirs = faiss_top_n(base, args.top_n)
    compute_rows = [
        ["FAISS IndexFlatIP (exact, k=N+1)", theirs, 1.0],
        ["ours: symmetric blocked sgemm + partial sort + float64 rescoring", ours, ours / theirs],
    ]
    if args.keras:
        from sketchfab_similarity.core.backend import gpu_available

        device = "GPU" if gpu_available() else "CPU"
        topn_keras.top_n_rows(base[:1000], np.arange(1000), args.top_n)  # warm-up: backend start, kernels
        on_device, keras_s = timed(topn_keras.top_n_rows, base, np.arange(len(base)), args.top_n)
        assert all(np.array_equal(a, b) for a, b in zip(on_device, exact, strict=True)), (
            "Keras engine differs"
        )
        compute_rows.append(
            [f"ours, Keras engine on the {device} (identical lists)", keras_s, keras_s / theirs]
        )

    with temp_database() as (db_url, socket_dir):
        settings = settings_for(db_url, top_n=args.top_n)
        version = FeatureSpec.from_settings(settings).version
        uids = model_uids(args.models + args.new)
        add_models(socket_dir, uids)
        with connect(socket_dir) as conn, conn.cursor() as cur:
            cur.execute(
                "DROP INDEX IF EXISTS model_embeddings_hnsw_idx"
            )  # not used here; keeps the loads fast
        load(settings, uids[: args.models], base, version)
        full, full_s = timed(similarity.refresh_similarity, settings)
        assert full.mode == "full" and full.rows == args.models * args.top_n

        load(settings, uids[args.models :], extra, version)
        inc, inc_s = timed(similarity.refresh_similarity, settings)
        assert inc.mode == "incremental" and inc.new == args.new
        check = similarity.refresh_similarity(settings, full=True)
        assert check.rows_written == 0, "the incremental table differs from a full rebuild"

        build, view, recall, ours_small = pgvector_way(
            socket_dir, random_unit(args.pgvector_models, seed=1), args.top_n, settings.hnsw_ef_search
        )

    print_table(
        f"Full rebuild, exact top-{args.top_n} of {args.models:,} x 512 (compute only)",
        ["method", "seconds", "vs FAISS"],
        compute_rows,
    )
    print_table(
        "Refresh end to end through refresh_similarity (read vectors, compute, stage, publish)",
        ["refresh", "seconds", "vs full", "lists computed", "rows written"],
        [
            [
                f"full rebuild, {args.models:,} models",
                full_s,
                1.0,
                full.recomputed + full.updated,
                full.rows_written,
            ],
            [
                f"incremental, {args.new:,} new",
                inc_s,
                inc_s / full_s,
                inc.recomputed + inc.updated,
                inc.rows_written,
            ],
        ],
    )
    print(
        f"  incremental == full rebuild: yes (a forced full rebuild afterwards wrote {check.rows_written} rows)"
    )
    print_table(
        f"The pgvector way on {args.pgvector_models:,} vectors: HNSW (m=16, ef_construction=64, ef_search="
        f"{max(settings.hnsw_ef_search, args.top_n + 1)}) + materialised view of LATERAL queries",
        ["method", "seconds", "vs ours", f"recall@{args.top_n}"],
        [
            ["ours, exact", ours_small, 1.0, 1.0],
            ["HNSW index build", build, build / ours_small, ""],
            ["materialised view of LATERAL queries", view, view / ours_small, recall],
            ["pgvector total", build + view, (build + view) / ours_small, recall],
        ],
    )


if __name__ == "__main__":
    main()
