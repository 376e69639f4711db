"""Atomic publish: MVCC update in one transaction (what refresh_similarity does) against a table swap.

Both replace every row of model_similarity (N models x top-20; a new feature version) while
8 readers call similar_models(uid, 10) in a loop. Reported per method: time until the new
table is visible, how long readers were locked out, reader latency (p50, p99, max) during the
publish, errors and short lists.

    python bench/bench_publish.py                   # 20,000 models (about a minute)
    python bench/bench_publish.py --models 50000    # 1,000,000 rows (about three minutes)
    python bench/bench_publish.py --quick           # 10,000 models
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path

import numpy as np
import psycopg2
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
from sketchfab_similarity.core.db import SQL_DIR
from sketchfab_similarity.core.progress import Progress
from sketchfab_similarity.core.sharding import WHOLE
from sketchfab_similarity.core.store import FeatureBatch
from sketchfab_similarity.similarity import refresh
from sketchfab_similarity.vectors.load import LoadStats, load_batch

READERS = 8


class Readers:
    """Threads calling similar_models(uid, 10) until stopped; latencies recorded while `window` is set."""

    def __init__(self, socket_dir: str, uids: list[str]) -> None:
        self.socket_dir, self.uids = socket_dir, uids
        self.stop, self.window = threading.Event(), threading.Event()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.short = 0
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(READERS)]

    def run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        conn = psycopg2.connect(dbname="postgres", user="postgres", host=self.socket_dir)
        conn.autocommit = True  # one statement per transaction (`with conn` would open one for good)
        with conn.cursor() as cur:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    cur.execute(
                        "SELECT count(*) FROM similar_models(%s, 10)",
                        (self.uids[rng.integers(len(self.uids))],),
                    )
                    if cur.fetchone()[0] != 10:
                        self.short += 1
                except psycopg2.Error as exc:
                    self.errors.append(str(exc).splitlines()[0])
                if self.window.is_set():
                    self.latencies.append(time.perf_counter() - start)
        conn.close()

    def __enter__(self) -> Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def measure(self, fn) -> tuple[float, list[float], int, list[str]]:
        self.latencies, self.errors, self.short = [], [], 0
        time.sleep(0.3)
        self.window.set()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        time.sleep(0.3)
        self.window.clear()
        return elapsed, list(self.latencies), self.short, list(self.errors)


def staged_plan(settings, socket_dir: str, version: str) -> refresh.Plan:
    """Every vector re-tagged with a new feature version, all lists computed and staged."""
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute("UPDATE model_embeddings SET feature_version = %s", (version,))
    plan = refresh.make_plan(settings.db_url, version, settings.top_n)
    lists = refresh.compute_full(plan, WHOLE, settings.refresh_tile, "numpy", Progress("bench"))
    refresh.write_staging(settings.db_url, plan, 0, lists)
    return plan


def mvcc_publish(settings, plan: refresh.Plan) -> dict:
    stats = similarity.RefreshStats()
    refresh.finish_part(settings.db_url, plan, f"bench-{plan.version}", 0, 1, stats, lists=len(plan.uids))
    assert stats.published and stats.rows_written >= stats.rows
    return {"locked": 0.0, "attempts": 1}


def swap_publish(socket_dir: str, plan: refresh.Plan) -> dict:
    """Build a new table beside the old one, then rename it into place and drop the old one."""
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS model_similarity_next")
        cur.execute(
            "CREATE TABLE model_similarity_next (LIKE model_similarity INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        cur.execute(
            "INSERT INTO model_similarity_next SELECT uid, rank, similar_uid, score, %s FROM similarity_staging",
            (plan.version,),
        )
        cur.execute("ALTER TABLE model_similarity_next ADD PRIMARY KEY (uid, rank)")
        cur.execute("ANALYZE model_similarity_next")
        # The renames need an exclusive lock: wait a bounded time for running readers (new ones
        # queue behind the waiting lock), and try again rather than stall every reader. The wait
        # must outlast deadlock_timeout (1 s), or an autovacuum of the old table is never told to yield.
        errors = []
        for attempt in range(1, 11):
            start = time.perf_counter()
            try:
                cur.execute("BEGIN")
                cur.execute("SET LOCAL lock_timeout = '2s'")
                cur.execute("ALTER TABLE model_similarity RENAME TO model_similarity_old")
                cur.execute("ALTER TABLE model_similarity_next RENAME TO model_similarity")
                cur.execute("DROP TABLE model_similarity_old CASCADE")  # takes the view with it
                cur.execute((Path(SQL_DIR) / "061_similarity_sql.sql").read_text())  # so recreate it
                cur.execute("COMMIT")
                return {"locked": time.perf_counter() - start, "attempts": attempt}
            except psycopg2.errors.LockNotAvailable as exc:
                errors.append(str(exc).splitlines()[0])
                cur.execute("ROLLBACK")
        raise RuntimeError(f"table swap: no exclusive lock in 10 attempts: {errors[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="10,000 models")
    args = parser.parse_args()
    if args.quick:
        args.models = 10_000
    logging.basicConfig(level=logging.WARNING)
    uids = model_uids(args.models)
    matrix = random_unit(args.models, seed=0)
    results = []
    with temp_database() as (db_url, socket_dir):
        settings = settings_for(db_url, top_n=20)
        add_models(socket_dir, uids, thumbnails=True)
        with connect(socket_dir) as conn, conn.cursor() as cur:
            cur.execute("DROP INDEX IF EXISTS model_embeddings_hnsw_idx")
        for start in range(0, args.models, 4096):
            batch = FeatureBatch(
                uids[start : start + 4096],
                ["h"] * len(uids[start : start + 4096]),
                matrix[start : start + 4096],
                "v0",
            )
            load_batch(db_url, batch, LoadStats())
        mvcc_publish(settings, staged_plan(settings, socket_dir, "v0"))
        with Readers(socket_dir, uids) as readers:
            readers.measure(lambda: None)  # warm up
            for name, version, publish in (
                ("MVCC: update changed rows in one transaction", "v1", lambda p: mvcc_publish(settings, p)),
                ("table swap: build beside, rename, drop old", "v2", lambda p: swap_publish(socket_dir, p)),
            ):
                plan = staged_plan(settings, socket_dir, version)
                info: dict = {}
                elapsed, latencies, short, errors = readers.measure(
                    lambda p=plan, f=publish, out=info: out.update(f(p))
                )
                lat = np.array(latencies) * 1000
                results.append(
                    [name, elapsed, info["locked"], info["attempts"], float(np.percentile(lat, 50)), float(np.percentile(lat, 99)),
                     float(lat.max()), len(lat), short, len(errors)]
                )  # fmt: skip
                if errors:
                    print(f"  {name}: first error: {errors[0]}")
    print_table(
        f"Replacing all {args.models * 20:,} rows of model_similarity under {READERS} readers of similar_models(uid, 10)",
        [
            "publish",
            "seconds",
            "exclusive lock s",
            "tries",
            "p50 ms",
            "p99 ms",
            "max ms",
            "queries",
            "short",
            "errors",
        ],
        results,
    )


if __name__ == "__main__":
    main()
