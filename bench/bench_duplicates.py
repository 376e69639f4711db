"""Identical vectors cost nothing extra: full exact top-N with and without clusters of copies.

Each case runs in its own process (so peak RSS is its own): N random unit 512-d vectors, either
all distinct or with a share of them copies of a few vectors; the exact top-N of every row
as the refresh computes it (grouping identical vectors, then the blocked search). Ratios are
against the all-distinct case of the same run. The plain search (no grouping) is shown on a
smaller table for contrast: its cost grows with the square of a cluster.

    python bench/bench_duplicates.py                 # 50,000 vectors, 40% in 4 clusters
    python bench/bench_duplicates.py --models 10000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
from similarity_bench_db import print_table, random_unit


def make(models: int, share: float, clusters: int, seed: int = 1) -> np.ndarray:
    x = random_unit(models, seed)
    if share:
        rng = np.random.default_rng(seed + 1)
        copies = rng.choice(models, int(share * models), replace=False)
        sources = rng.choice(np.setdiff1d(np.arange(models), copies), clusters, replace=False)
        x[copies] = x[sources[rng.integers(0, clusters, len(copies))]]
    return x


def child(models: int, share: float, clusters: int, grouped: bool, n: int) -> None:
    from sketchfab_similarity.similarity import duplicates, topn

    x = make(models, share, clusters)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if grouped:
        duplicates.top_n_all(x, n)
    else:
        topn.top_n_all(x, n)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "input_mib": before / 1024}))


def run_case(models: int, share: float, clusters: int, grouped: bool, n: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps([models, share, clusters, grouped, n])],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=50_000)
    parser.add_argument("--share", type=float, default=0.4)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--top-n", type=int, default=20)
    parser.add_argument("--plain-models", type=int, default=6000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*json.loads(args.child))
        return
    rows = []
    for label, models, share, grouped in (
        ("all distinct (baseline)", args.models, 0.0, True),
        (f"{args.share:.0%} in {args.clusters} clusters, grouped", args.models, args.share, True),
        ("plain search, all distinct", args.plain_models, 0.0, False),
        ("plain search, 2/3 in 1 cluster", args.plain_models, 2 / 3, False),
        ("grouped, 2/3 in 1 cluster", args.plain_models, 2 / 3, True),
    ):
        clusters = args.clusters if models == args.models else 1
        result = run_case(models, share, clusters, grouped, args.top_n)
        rows.append((label, models, result))
    base = {m: r for label, m, r in rows if "all distinct" in label}
    print_table(
        f"Exact top-{args.top_n} of random unit 512-d vectors, one process per case (peak RSS includes "
        "the input matrix and the interpreter)",
        ["case", "models", "seconds", "x time", "peak RSS MiB", "x RSS"],
        [
            [
                label,
                m,
                r["seconds"],
                r["seconds"] / base[m]["seconds"],
                r["peak_mib"],
                r["peak_mib"] / base[m]["peak_mib"],
            ]
            for label, m, r in rows
        ],
    )


if __name__ == "__main__":
    main()
