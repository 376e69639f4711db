"""Every vectors-side stage at catalogue scale: time, peak RSS and rows/s, each against a baseline
measured in the same run, then on-disk sizes; `--exponents` turns runs at several sizes into growth
exponents.

A throw-away embedded Postgres gets N models with random unit 512-d vectors, and then, stage by stage:

  load         load_batch (binary COPY + upsert), vs text COPY + upsert of a sample
  base table   the published table of N x 20 rows, written through the refresh's own staging and
               publish (parts of 100,000 lists). Its lists are synthetic: each model's list holds
               the 20 scores of a real exact list (of a sample row) and distinct other models. An
               exact full rebuild of 1M vectors takes hours on 2 cores (see "exact rebuild"), and
               the incremental run below does the same work on either table: it reads the same
               vectors and bookkeeping, checks each kept list against its real-looking last score
               and rewrites the lists new models enter.
  incremental  2,000 new models: refresh_similarity (plan, compute, stage, publish), vs the read
               floor (a binary COPY of every vector into a null sink) and the products alone
  queries      similar_models(uid, 10), 8 clients (pgbench), quiet and during the publish of a
               second incremental run, vs pgbench -S quiet and during a third run's publish; and
               similar_models next to one busy process that is not Postgres (what sharing the CPU
               alone costs, with no lock or write involved)
  planning     plan_downloads (its first look at every model, then a run later with 2,000 new) and
               pending_extractions with 2,000 pending of N known, recording
               2,000 download results; EXPLAIN of each pending query; vs a count(*) of the table
  exact rebuild  the full exact top-N of S and S/2 random vectors (the refresh's CPU kernel),
               extrapolated by its square to N and to 5M
  HNSW         CREATE INDEX CONCURRENTLY ... USING hnsw at N (settings printed), vs the load rate

Stages that hold vectors run in child processes so each peak RSS is that stage's own (the
server's memory is not included). Results go to --out as JSON. One module on purpose, longer
than most: every stage shares one database built once per run (building 1M models takes minutes),
and the report and the exponents read the same result layout.

    python bench/bench_scale.py --models 100000 --out /tmp/scale-100k.json
    python bench/bench_scale.py --models 1000000 --out /tmp/scale-1m.json
    python bench/bench_scale.py --exponents /tmp/scale-100k.json /tmp/scale-300k.json /tmp/scale-1m.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from bench_load import text_copy
from bench_queries import pgbench_binary
from similarity_bench_db import (
    connect,
    fmt,
    model_uids,
    print_table,
    random_unit,
    settings_for,
    temp_database,
)

NEW = 2000
TOP_N = 20
CHUNK = 4096
BASE_PART = 100_000
CLIENTS = 8


def child_main(stage: str, args: dict) -> dict:
    """Run one stage in this (child) process; returns its figures."""
    from sketchfab_similarity import similarity
    from sketchfab_similarity.core.featurespec import FeatureSpec
    from sketchfab_similarity.core.progress import Progress
    from sketchfab_similarity.core.sharding import Shard
    from sketchfab_similarity.similarity import compute, duplicates, refresh, topn

    settings = settings_for(args["db_url"], top_n=TOP_N)
    version = FeatureSpec.from_settings(settings).version
    out: dict = {}
    if stage == "base":
        total = args["models"]
        parts = max(1, math.ceil(total / BASE_PART))
        start = time.perf_counter()
        plan = refresh.make_plan(settings.db_url, version, TOP_N, full=True, parts=parts)
        out["plan_full_s"] = time.perf_counter() - start
        rng = np.random.default_rng(0)
        sample = rng.choice(total, min(total, 512), replace=False)
        _, profiles = topn.top_n_rows(plan.matrix, sample, TOP_N)
        stride = max(1, (total - 1) // TOP_N)
        out["stage_s"] = out["publish_s"] = 0.0
        for part in range(parts):
            rows = np.arange(part * BASE_PART, min(total, (part + 1) * BASE_PART))
            indices = (rows[:, None] + 1 + np.arange(TOP_N) * stride) % total
            lists = compute.Lists(rows, indices, profiles[rows % len(sample)])
            clock = time.perf_counter()
            refresh.write_staging(settings.db_url, plan, part, lists)
            out["stage_s"] += time.perf_counter() - clock
            clock = time.perf_counter()
            stats = refresh.RefreshStats()
            refresh.finish_part(settings.db_url, plan, "base", part, parts, stats, lists=len(rows))
            out["publish_s"] += time.perf_counter() - clock
        out["rows"] = stats.rows
    elif stage == "read_floor":
        from sketchfab_similarity.core.db import connect as db_connect

        class Null(io.RawIOBase):
            def write(self, data) -> int:
                return len(data)

        start = time.perf_counter()
        with db_connect(settings.db_url) as conn, conn.cursor() as cur:
            cur.copy_expert(
                cur.mogrify(
                    "COPY (SELECT uid, embedding FROM model_embeddings WHERE feature_version = %s) "
                    "TO STDOUT (FORMAT binary)",
                    (version,),
                ).decode(),
                Null(),
            )
        out["seconds"] = time.perf_counter() - start
    elif stage == "products":  # BLAS alone: NEW query rows against N columns, in refresh tiles
        x = np.empty((args["models"], 512), np.float32)
        for first in range(0, len(x), CHUNK):
            x[first : first + CHUNK] = random_unit(len(x[first : first + CHUNK]), seed=first)
        q = x[:NEW].copy()
        start = time.perf_counter()
        for column in range(0, len(x), settings.refresh_tile):
            q @ x[column : column + settings.refresh_tile].T
        out["seconds"] = time.perf_counter() - start
    elif stage == "refresh":
        stats = similarity.refresh_similarity(settings)
        out.update(mode=stats.mode, new=stats.new, seconds=stats.seconds, updated=stats.updated,
                   rows_written=stats.rows_written, rows=stats.rows)  # fmt: skip
    elif stage == "refresh_held":  # a refresh that publishes when told to (queries measured meanwhile)
        start = time.perf_counter()
        plan = refresh.make_plan(settings.db_url, version, TOP_N)
        lists = compute.compute(plan, Shard(0, 1), settings, Progress("refresh", total=1))
        refresh.write_staging(settings.db_url, plan, 0, lists)
        out["before_publish_s"] = time.perf_counter() - start
        print("READY", flush=True)
        sys.stdin.readline()
        out["publish_from"] = time.time()
        stats = refresh.RefreshStats()
        refresh.finish_part(settings.db_url, plan, "held", 0, 1, stats, lists=len(lists.rows))
        out["publish_to"] = time.time()
        out["rows_written"] = stats.rows_written
    elif stage == "rebuild":
        for size in (args["sample"] // 2, args["sample"]):
            x = random_unit(size, seed=7)
            start = time.perf_counter()
            duplicates.top_n_all(x, TOP_N)
            out[str(size)] = time.perf_counter() - start
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM; ru_maxrss would include the parent's from before exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(stage: str, **args) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", stage, json.dumps(args)], capture_output=True, text=True
    )
    if result.returncode:
        raise SystemExit(f"stage {stage} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def add_models(socket_dir: str, start: int, stop: int, thumbnails: bool) -> None:
    """Models start..stop-1 (uids lpad(to_hex(i), 32, '0')), with one thumbnail image each and,
    when `thumbnails`, a stored 'ok' thumbnail."""
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO sketchfab_models (uid, name, published_at, raw, viewer_url, thumbnails)
            SELECT lpad(to_hex(i), 32, '0'), 'model ' || i, '2026-01-01'::timestamptz + i * interval '1 second',
                   '{}', 'https://sketchfab.com/3d-models/' || lpad(to_hex(i), 32, '0'),
                   jsonb_build_array(jsonb_build_object('url', 'https://media.sketchfab.com/' || i || '.jpeg',
                                                        'width', 256, 'height', 256))
            FROM generate_series(%s, %s) i
            """,
            (start, stop - 1),
        )
        if thumbnails:
            cur.execute(
                "INSERT INTO model_thumbnails (uid, source_url, content_hash, stored_path, status) "
                "SELECT lpad(to_hex(i), 32, '0'), 'https://media.sketchfab.com/' || i || '.jpeg', 'h', "
                "'t/' || i, 'ok' FROM generate_series(%s, %s) i",
                (start, stop - 1),
            )


def load_vectors(db_url: str, start: int, stop: int, version: str) -> float:
    from sketchfab_similarity.core.store import FeatureBatch
    from sketchfab_similarity.vectors.load import LoadStats, load_batch

    seconds = 0.0
    for first in range(start, stop, CHUNK):
        count = min(CHUNK, stop - first)
        batch = FeatureBatch(model_uids(count, first), ["h"] * count, random_unit(count, seed=first), version)
        clock = time.perf_counter()
        stats = LoadStats()
        load_batch(db_url, batch, stats)
        seconds += time.perf_counter() - clock
        assert stats.loaded == count and not stats.rejected, stats
    return seconds


def pgbench(socket_dir: str, args: list[str], seconds: int) -> np.ndarray:
    """Per-transaction (end time s since the epoch, latency ms) of CLIENTS clients for `seconds`."""
    with tempfile.TemporaryDirectory() as logs:
        subprocess.run(
            [pgbench_binary(), "-h", socket_dir, "-U", "postgres", "-n", "-M", "prepared", "-c", str(CLIENTS),
             "-j", "2", "-T", str(seconds), "-l", "--log-prefix", f"{logs}/tx", *args, "postgres"],
            capture_output=True, check=True,
        )  # fmt: skip
        rows = [line.split() for f in Path(logs).glob("tx*") for line in f.read_text().splitlines()]
    return np.array([(int(r[4]) + int(r[5]) / 1e6, int(r[2]) / 1000) for r in rows]).reshape(-1, 2)


def percentiles(lat: np.ndarray) -> tuple[float, float, int]:
    if not len(lat):
        return math.nan, math.nan, 0
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), len(lat)


def explain(socket_dir: str, sql: str, params: dict) -> list[str]:
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + sql, params)
        return [r[0] for r in cur.fetchall()]


def planning(db_url: str, socket_dir: str, version: str, models: int) -> dict:
    """Download and extraction planning with NEW pending each, and recording NEW download results.

    The first download plan looks at every model once (what the migration that added
    `thumbnails_due` costs, and a change of input size); the timed one comes a run later, after
    its results were recorded and NEW more models were crawled, and looks only at those."""
    from sketchfab_similarity.core.sharding import WHOLE
    from sketchfab_similarity.features.extract import pending_extractions
    from sketchfab_similarity.thumbnails.download import DownloadResult, record_results
    from sketchfab_similarity.thumbnails.plan import plan_downloads, plan_query

    settings = settings_for(db_url, top_n=TOP_N)
    out = {}
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE sketchfab_models, model_thumbnails, model_embeddings")
        start = time.perf_counter()
        cur.execute("SELECT count(*) FROM sketchfab_models m JOIN model_thumbnails t USING (uid)")
        out["known"] = cur.fetchone()[0]
        out["count_s"] = time.perf_counter() - start
    start = time.perf_counter()
    first = plan_downloads(settings)
    out["plan_downloads_first_s"] = time.perf_counter() - start
    out["download_first_looked_at"] = first.looked_at
    results = [DownloadResult(t.uid, t.url, "ok", "h" + t.uid, "t/" + t.uid, 256, 256) for t in first.tasks]
    start = time.perf_counter()
    record_results(db_url, results)
    out["record_s"] = time.perf_counter() - start
    add_models(socket_dir, models + 5 * NEW, models + 6 * NEW, thumbnails=False)  # the next crawl's
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE thumbnails_due")  # autovacuum's work after the first plan's deletes
    start = time.perf_counter()
    plan = plan_downloads(settings)
    out["plan_downloads_s"] = time.perf_counter() - start
    out["download_pending"] = len(plan.tasks)
    out["download_looked_at"] = plan.looked_at
    start = time.perf_counter()
    pending = pending_extractions(db_url, version)
    out["pending_extractions_s"] = time.perf_counter() - start
    out["extraction_pending"] = len(pending)
    out["explain_downloads"] = explain(socket_dir, plan_query(WHOLE), {})
    out["explain_extractions"] = explain(
        socket_dir,
        "SELECT t.uid, t.stored_path, t.content_hash FROM model_thumbnails t LEFT JOIN model_embeddings e "
        "ON e.uid = t.uid WHERE t.status = 'ok' AND (%(force)s OR e.uid IS NULL OR e.feature_version <> "
        "%(version)s OR e.content_hash <> t.content_hash) ORDER BY t.uid",
        {"force": False, "version": version},
    )
    return out


def sizes(socket_dir: str) -> list[tuple[str, str, int]]:
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT c.relname, CASE c.relkind WHEN 'i' THEN 'index' ELSE 'table' END, "
            "pg_relation_size(c.oid) + CASE WHEN c.reltoastrelid <> 0 THEN pg_total_relation_size(c.reltoastrelid) "
            "ELSE 0 END FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i') AND pg_relation_size(c.oid) > 1000000 "
            "AND c.relname NOT LIKE 'pgbench%%' "
            "ORDER BY 3 DESC"
        )
        return cur.fetchall()


def run(args) -> dict:
    from sketchfab_similarity.core.featurespec import FeatureSpec

    total = args.models
    r: dict = {"models": total, "new": NEW, "top_n": TOP_N, "load_average_before": os.getloadavg()}
    with temp_database({"shared_buffers": args.shared_buffers}) as (db_url, socket_dir):
        settings = settings_for(db_url, top_n=TOP_N)
        version = FeatureSpec.from_settings(settings).version
        with connect(socket_dir) as conn, conn.cursor() as cur:
            # The HNSW index is built at the end, timed on its own.
            cur.execute("DROP INDEX IF EXISTS model_embeddings_hnsw_idx")
            cur.execute("SHOW shared_buffers")
            r["shared_buffers"] = cur.fetchone()[0]
            # Whether the kernel had huge pages reserved for the buffer pool (vm.nr_hugepages):
            # with 4 kB pages every probe into a large pool also misses the TLB.
            cur.execute("SHOW huge_pages_status")
            r["huge_pages"] = cur.fetchone()[0]
        # Models: N with vectors, 3 x NEW more that get vectors later (one incremental run and two
        # held publishes), NEW with a thumbnail but no vector (pending extraction), NEW without a
        # thumbnail (pending download).
        clock = time.perf_counter()
        add_models(socket_dir, 0, total + 4 * NEW, thumbnails=True)
        add_models(socket_dir, total + 4 * NEW, total + 5 * NEW, thumbnails=False)
        r["models_s"] = time.perf_counter() - clock
        log(f"{total + 5 * NEW:,} models in {r['models_s']:.1f}s")

        sample = min(total, args.text_sample)
        r["text_copy_s"] = text_copy(socket_dir, model_uids(sample), random_unit(sample, seed=99))
        r["text_copy_rows"] = sample
        with connect(socket_dir) as conn, conn.cursor() as cur:
            cur.execute("TRUNCATE model_embeddings")
        r["load_s"] = load_vectors(db_url, 0, total, version)
        r["load_parent_rss_mib"] = peak_rss_mib()
        with connect(socket_dir) as conn, conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE model_embeddings")
        log(
            f"loaded in {r['load_s']:.1f}s ({total / r['load_s']:,.0f}/s); text COPY {sample / r['text_copy_s']:,.0f}/s"
        )

        r["base"] = in_child("base", db_url=db_url, models=total)
        log(f"base table: {r['base']}")
        load_vectors(db_url, total, total + NEW, version)
        r["read_floor"] = in_child("read_floor", db_url=db_url)
        r["products"] = in_child("products", db_url=db_url, models=total + NEW)
        r["incremental"] = in_child("refresh", db_url=db_url)
        log(f"incremental: {r['incremental']}")

        # Queries: pgbench -S and similar_models quiet, each while another run publishes, and
        # similar_models next to a busy process that is not Postgres (CPU sharing alone).
        subprocess.run([pgbench_binary(), "-h", socket_dir, "-U", "postgres", "-i", "-q", "-s", "10", "postgres"],
                       capture_output=True, check=True)  # fmt: skip
        with connect(socket_dir) as conn, conn.cursor() as cur:
            cur.execute("VACUUM ANALYZE")
        script = Path(tempfile.mkdtemp()) / "similar.sql"
        script.write_text(
            f"\\set i random(0, {total - 1})\nSELECT * FROM similar_models(lpad(to_hex(:i::bigint), 32, '0'), 10);\n"
        )
        r["pgbench_S"] = percentiles(pgbench(socket_dir, ["-S"], args.seconds)[:, 1])
        pgbench(socket_dir, ["-f", str(script)], args.seconds)  # untimed: a serving database's cache is warm
        r["similar_quiet"] = percentiles(pgbench(socket_dir, ["-f", str(script)], args.seconds)[:, 1])
        with busy_cpu():
            r["similar_next_to_busy"] = percentiles(
                pgbench(socket_dir, ["-f", str(script)], args.seconds)[:, 1]
            )
        for key, workload, block in (("similar", ["-f", str(script)], 1), ("pgbench_S", ["-S"], 2)):
            load_vectors(db_url, total + block * NEW, total + (block + 1) * NEW, version)
            published, during = while_publishing(db_url, socket_dir, workload, args.publish_seconds)
            window = (during[:, 0] >= published["publish_from"]) & (
                during[:, 0] <= published["publish_to"] + 0.001
            )
            r[f"{key}_during_publish"] = percentiles(during[window, 1])
            r[f"{key}_around_publish"] = percentiles(during[:, 1])
            r.setdefault("publish_window", published)
        log(
            f"queries: -S {r['pgbench_S']}, quiet {r['similar_quiet']}, publishing {r['similar_during_publish']}"
        )

        r["planning"] = planning(db_url, socket_dir, version, total)
        log(f"planning: { {k: v for k, v in r['planning'].items() if not k.startswith('explain')} }")
        r["sizes"] = sizes(socket_dir)
        r["rebuild"] = in_child("rebuild", db_url=db_url, sample=min(args.rebuild_sample, total))
        log(f"exact rebuild sample: {r['rebuild']}")
        if args.hnsw:
            r["hnsw"] = hnsw_build(settings, socket_dir, args.hnsw_memory)
            log(f"hnsw: {r['hnsw']}")
    r["load_average_after"] = os.getloadavg()
    return r


@contextlib.contextmanager
def busy_cpu() -> Iterator[None]:
    """One process spinning on a core meanwhile, the way a publish's backend does, but holding no lock."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def while_publishing(
    db_url: str, socket_dir: str, workload: list[str], seconds: int
) -> tuple[dict, np.ndarray]:
    """`workload` run by pgbench for `seconds` while an incremental refresh publishes; the refresh
    is planned, computed and staged first, and told to publish 2 s into the queries."""
    held = subprocess.Popen(
        [sys.executable, __file__, "--child", "refresh_held", json.dumps({"db_url": db_url})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    while (line := held.stdout.readline()) and line.strip() != "READY":
        pass
    runs: list[np.ndarray] = []
    queries = threading.Thread(target=lambda: runs.append(pgbench(socket_dir, workload, seconds)))
    queries.start()
    time.sleep(2)
    held.stdin.write("go\n")
    held.stdin.flush()
    published = json.loads(held.stdout.read().strip().splitlines()[-1])
    held.wait()
    queries.join()
    return published, runs[0]


def hnsw_build(settings, socket_dir: str, memory: str) -> dict:
    from sketchfab_similarity.vectors.hnsw import HNSW_INDEX, ensure_hnsw_index

    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute("SHOW max_parallel_maintenance_workers")
        workers = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM model_embeddings")
        rows = cur.fetchone()[0]
    start = time.perf_counter()
    ensure_hnsw_index(settings.with_overrides(hnsw_build_memory=memory))
    seconds = time.perf_counter() - start
    with connect(socket_dir) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_relation_size(%s)", (HNSW_INDEX,))
        size = cur.fetchone()[0]
    return {"seconds": seconds, "rows": rows, "bytes": size, "m": settings.hnsw_m,
            "ef_construction": settings.hnsw_ef_construction, "maintenance_work_mem": memory,
            "max_parallel_maintenance_workers": workers}  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def report(r: dict) -> None:
    n = r["models"]
    inc = r["incremental"]
    secs = inc["seconds"]
    inc_total = sum(secs.values())
    base = r["base"]
    rows = n * TOP_N
    text_rate = r["text_copy_rows"] / r["text_copy_s"]
    load_rate = n / r["load_s"]
    reb = {int(k): v for k, v in r["rebuild"].items() if k.isdigit()}
    small, big = sorted(reb)
    exponent = math.log(reb[big] / reb[small]) / math.log(big / small)
    table = [
        ["bulk load (load_batch, binary COPY)", r["load_s"], n, load_rate, f"{load_rate / text_rate:.2f} x text COPY", r["load_parent_rss_mib"]],
        ["  baseline: text COPY + upsert", r["text_copy_s"], r["text_copy_rows"], text_rate, "1", ""],
        ["full plan (read every vector)", base["plan_full_s"], n, n / base["plan_full_s"], "", base["peak_rss_mib"]],
        [f"stage {rows:,} rows (binary COPY)", base["stage_s"], rows, rows / base["stage_s"], "1", ""],
        [f"publish {rows:,} rows into an empty table", base["publish_s"], rows, rows / base["publish_s"],
         f"{base['publish_s'] / base['stage_s']:.2f} x staging", ""],
        [f"incremental run, {NEW:,} new: total", inc_total, NEW, NEW / inc_total, "", inc["peak_rss_mib"]],
        ["  plan (reads every vector)", secs["plan"], n + NEW, (n + NEW) / secs["plan"],
         f"{secs['plan'] / r['read_floor']['seconds']:.2f} x read floor", ""],
        ["  baseline: COPY every vector to a null sink", r["read_floor"]["seconds"], n + NEW,
         (n + NEW) / r["read_floor"]["seconds"], "1", r["read_floor"]["peak_rss_mib"]],
        ["  compute", secs["compute"], NEW, NEW / secs["compute"],
         f"{secs['compute'] / r['products']['seconds']:.2f} x products alone", ""],
        [f"  baseline: products alone ({NEW:,} x {n + NEW:,})", r["products"]["seconds"], NEW, "", "1", ""],
        [f"  stage ({inc['updated']:,} lists updated)", secs["stage"], inc["rows_written"], "", "", ""],
        [f"  publish ({inc['rows_written']:,} rows written)", secs["publish"], inc["rows_written"], "", "", ""],
        [f"exact full rebuild, {small:,} random", reb[small], small, small / reb[small], "", ""],
        [f"exact full rebuild, {big:,} random", reb[big], big, big / reb[big], f"growth exponent {exponent:.2f}", r["rebuild"]["peak_rss_mib"]],
        [f"  extrapolated to {n:,} (x (N/S)^2)", reb[big] * (n / big) ** 2, n, "", "", ""],
        ["  extrapolated to 5,000,000", reb[big] * (5e6 / big) ** 2, 5_000_000, "", "", ""],
    ]  # fmt: skip
    if "hnsw" in r:
        h = r["hnsw"]
        table.append([f"HNSW build (m={h['m']}, ef_construction={h['ef_construction']}, maintenance_work_mem="
                      f"{h['maintenance_work_mem']}, max_parallel_maintenance_workers={h['max_parallel_maintenance_workers']})",
                      h["seconds"], h["rows"], h["rows"] / h["seconds"], f"{load_rate / (h['rows'] / h['seconds']):.1f}x slower than load", ""])  # fmt: skip
    print_table(
        f"Scale: {n:,} models x 512-d, top-{TOP_N}, 2 cores",
        ["stage", "seconds", "rows", "rows/s", "vs baseline", "peak RSS MiB"],
        table,
    )
    q = [
        ["pgbench -S (baseline), quiet", *r["pgbench_S"]],
        ["pgbench -S (baseline), during a publish", *r["pgbench_S_during_publish"]],
        ["similar_models(uid, 10), quiet", *r["similar_quiet"]],
        ["similar_models(uid, 10), next to one busy process", *r["similar_next_to_busy"]],
        ["similar_models(uid, 10), during a publish", *r["similar_during_publish"]],
        ["similar_models(uid, 10), whole window around it", *r["similar_around_publish"]],
    ]
    pub = r["publish_window"]
    print_table(
        f"Queries, {CLIENTS} clients, prepared, shared_buffers {r['shared_buffers']}, huge pages "
        f"{r.get('huge_pages', '?')} (publish of an incremental run: "
        f"{pub['publish_to'] - pub['publish_from']:.2f}s, {pub['rows_written']:,} rows written)",
        ["workload", "p50 ms", "p99 ms", "queries"], q,
    )  # fmt: skip
    p = r["planning"]
    print_table(
        f"Planning with {p['known']:,} known models (count(*) of models x thumbnails: {p['count_s']:.2f}s)",
        ["step", "seconds", "pending / rows", "vs count(*)"],
        [[f"plan_downloads, first (looks at all {p['download_first_looked_at']:,} once)", p["plan_downloads_first_s"],
          p["download_first_looked_at"], p["plan_downloads_first_s"] / p["count_s"]],
         [f"plan_downloads, next run (looks at {p['download_looked_at']:,} listed)", p["plan_downloads_s"],
          p["download_pending"], p["plan_downloads_s"] / p["count_s"]],
         ["pending_extractions", p["pending_extractions_s"], p["extraction_pending"], p["pending_extractions_s"] / p["count_s"]],
         ["record_results (download outcomes)", p["record_s"], NEW, ""]],
    )  # fmt: skip
    for key in ("explain_downloads", "explain_extractions"):
        print(f"\n  EXPLAIN {key.split('_')[1]} pending:")
        print("\n".join("    " + line for line in p[key]))
    total_bytes = sum(s[2] for s in r["sizes"])
    print_table(
        "On-disk sizes", ["relation", "kind", "MiB", "bytes per model"],
        [[name, kind, b / 2**20, b / n] for name, kind, b in r["sizes"]] + [["all of the above", "", total_bytes / 2**20, total_bytes / n]],
    )  # fmt: skip


FIGURES = {
    "load s": lambda r: r["load_s"],
    "stage N x 20 s": lambda r: r["base"]["stage_s"],
    "publish N x 20 s": lambda r: r["base"]["publish_s"],
    "incremental total s": lambda r: sum(r["incremental"]["seconds"].values()),
    "  plan s": lambda r: r["incremental"]["seconds"]["plan"],
    "  compute s": lambda r: r["incremental"]["seconds"]["compute"],
    "  stage s": lambda r: r["incremental"]["seconds"]["stage"],
    "  publish s": lambda r: r["incremental"]["seconds"]["publish"],
    "incremental peak RSS MiB": lambda r: r["incremental"]["peak_rss_mib"],
    "similar_models p99 ms (quiet)": lambda r: r["similar_quiet"][1],
    "similar_models p99 ms (publishing)": lambda r: r["similar_during_publish"][1],
    "plan_downloads s": lambda r: r["planning"]["plan_downloads_s"],
    "plan_downloads first s": lambda r: r["planning"].get("plan_downloads_first_s", math.nan),
    "pending_extractions s": lambda r: r["planning"]["pending_extractions_s"],
    "disk MiB": lambda r: sum(s[2] for s in r["sizes"]) / 2**20,
    "HNSW build s": lambda r: r["hnsw"]["seconds"] if "hnsw" in r else math.nan,
}


def exponents(paths: list[str]) -> None:
    runs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda r: r["models"])
    sizes_ = [r["models"] for r in runs]
    rows = []
    for name, get in FIGURES.items():
        values = [get(r) for r in runs]
        logs = [
            (math.log(s), math.log(v)) for s, v in zip(sizes_, values, strict=True) if v and v == v and v > 0
        ]
        slope = np.polyfit(*zip(*logs, strict=True), 1)[0] if len(logs) >= 2 else math.nan
        rows.append([name, *values, slope])
    print_table("Growth: value at each size, and the exponent b of value ~ N^b (least squares on logs)",
                ["figure", *[fmt(s) for s in sizes_], "exponent"], rows)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=100_000)
    parser.add_argument("--text-sample", type=int, default=20_000)
    parser.add_argument("--seconds", type=int, default=8, help="per quiet query workload")
    parser.add_argument(
        "--publish-seconds", type=int, default=12, help="query window around the held publish"
    )
    parser.add_argument("--rebuild-sample", type=int, default=50_000)
    parser.add_argument("--no-hnsw", dest="hnsw", action="store_false")
    parser.add_argument(
        "--shared-buffers",
        default=f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 4 // 2**20}MB",
        help="the server's shared_buffers (default a quarter of RAM, the usual setting for a database host)",
    )
    parser.add_argument("--hnsw-memory", default="4GB", help="maintenance_work_mem for the HNSW build")
    parser.add_argument("--out", help="write the figures here as JSON")
    parser.add_argument("--exponents", nargs="+", metavar="JSON", help="growth exponents of earlier runs")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        print(json.dumps(child_main(args.child[0], json.loads(args.child[1]))))
        return
    if args.exponents:
        exponents(args.exponents)
        return
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    report(result)


if __name__ == "__main__":
    main()
