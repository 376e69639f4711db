"""Thumbnail download throughput: `download_thumbnails` against a plain sequential `requests.get` loop.

Both fetch the same thumbnail URLs (the ones the pipeline chooses for the default
224 px input) from the bundled Sketchfab-compatible server, which runs in its own
process and adds a fixed latency (default 20 ms) to every request. The server
renders each thumbnail on first request and caches it, so every URL is requested
once before any timing: the figures measure the downloaders, not the renderer.

The pipeline timing covers the whole task: planning from the database, fetching,
full decode and validation, content-addressed storage and recording every row.
The sequential loop only fetches (`requests.get(url).content`). Pipeline figures are the
median of `--repeat` runs, each into an empty table and a new store.

    python bench/bench_download.py                 # 600 thumbnails, ~1 minute on 2 cores
    python bench/bench_download.py --quick         # 200 thumbnails
    python bench/bench_download.py --workers 16,32,64 --latency-ms 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT / "tools")]

import devenv  # noqa: E402
import requests  # noqa: E402
from sketchfab_similarity import crawl, thumbnails  # noqa: E402
from sketchfab_similarity.core import db  # noqa: E402
from sketchfab_similarity.core.settings import Settings  # noqa: E402

TARGET_RATIO = 20.0
TARGET_RATE = 300.0


def new_bench_database(libpq_uri: str) -> str:
    url, _ = devenv.create_database(libpq_uri, "bench_download")
    db.apply_schema(url)
    return url


def start_fake_server(models: int, latency_ms: float, workdir: Path) -> tuple[subprocess.Popen, dict]:
    """The bundled server in its own process, so it does not share the downloader's interpreter lock."""
    ready = workdir / "server.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tools")}
    cmd = [sys.executable, "-m", "fake_sketchfab", "--models", str(models), "--port", "0"]
    cmd += ["--faults", f"latency_ms={latency_ms}", "--ready-file", str(ready)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the fake Sketchfab server did not start")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def chosen_urls(settings: Settings) -> list[str]:
    return [t.url for t in thumbnails.pending_downloads(settings) if t.url]


def warm_server_cache(urls: list[str]) -> int:
    """Request every URL once, concurrently, so the server has rendered and cached them all."""
    with requests.Session() as session, ThreadPoolExecutor(16) as pool:
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=16))
        sizes = list(pool.map(lambda u: len(session.get(u, timeout=60).content), urls))
    return sum(sizes)


def sequential_loop(urls: list[str]) -> float:
    started = time.perf_counter()
    for url in urls:
        response = requests.get(url, timeout=30)
        response.raise_for_status()
        _ = response.content
    return time.perf_counter() - started


def pipeline_run(settings: Settings, store: Path, workers: int, expected: int) -> float:
    with db.connect(settings.db_url) as conn, conn.cursor() as cur:
        cur.execute("TRUNCATE model_thumbnails")
    run_settings = settings.with_overrides(thumbnail_store=str(store), download_workers=workers)
    started = time.perf_counter()
    stats = thumbnails.download_thumbnails(run_settings)
    elapsed = time.perf_counter() - started
    if stats.fetched != expected or stats.failed:
        raise RuntimeError(f"pipeline run incomplete: {stats}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=600, help="thumbnails to fetch (default 600)")
    parser.add_argument("--quick", action="store_true", help="200 thumbnails")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added per request (default 20)")
    parser.add_argument("--workers", default="", help="comma-separated concurrency (default: the setting's)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="pipeline runs per setting; the median is shown"
    )
    args = parser.parse_args()
    models = 200 if args.quick else args.models
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        workdir = Path(tmp)
        libpq_uri = devenv.start_postgres(workdir / "pg")
        server, info = start_fake_server(models, args.latency_ms, workdir)
        try:
            base = Settings(
                db_url=new_bench_database(libpq_uri),
                api_base_url=info["api_base_url"],
                thumbnail_hosts=(info["media_host"],),
                thumbnail_store=str(workdir / "unused"),
            )
            workers = [int(w) for w in args.workers.split(",") if w] or [base.download_workers]
            crawl.crawl(base, crawl.incremental_window(base.db_url, timedelta(0)))
            urls = chosen_urls(base)
            total_bytes = warm_server_cache(urls)
            print(
                f"{len(urls)} thumbnails ({total_bytes / len(urls) / 1024:.1f} KiB on average, as chosen for "
                f"{base.input_size} px input), {args.latency_ms:g} ms added per request, {os.cpu_count()} CPUs; "
                "server in its own process, thumbnails pre-rendered before timing",
                flush=True,
            )
            rows = [("sequential requests.get loop (fetch only)", sequential_loop(urls))]
            for w in workers:
                runs = [
                    pipeline_run(base, workdir / f"store-{w}-{k}", w, len(urls)) for k in range(args.repeat)
                ]
                label = f"download_thumbnails, {w} concurrent (+ validate, store, record)"
                rows.append((label, statistics.median(runs)))
        finally:
            server.terminate()
            server.wait(timeout=10)
            devenv.stop_postgres(workdir / "pg")

    baseline = len(urls) / rows[0][1]
    print(f"\n{'method':<62} {'seconds':>8} {'thumbs/s':>9} {'vs sequential':>14}")
    for label, seconds in rows:
        rate = len(urls) / seconds
        print(f"{label:<62} {seconds:>8.2f} {rate:>9.1f} {rate / baseline:>13.1f}x")
    best = max(len(urls) / s for _, s in rows[1:])
    verdict = "met" if best >= TARGET_RATE and best / baseline >= TARGET_RATIO else "NOT met"
    print(f"\ntarget (>= {TARGET_RATIO:g}x sequential and >= {TARGET_RATE:g} thumbnails/s): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
