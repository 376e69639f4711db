"""Bootstrap past the listing cap: a 200,000-model catalogue, 10,000 results per query.

The bundled Sketchfab-compatible server runs in its own process with the cap enforced per query
(filters + sort), as the real API does. On an empty database, `crawl_models` pages the newest-first
listing until the cap, then goes on through slices it plans on the way. Reported:

- coverage: distinct models stored / models in the catalogue (target 100%);
- listing pages fetched / the minimum possible (models / 24 per page; target at most 1.3x);
- models/s of the sliced bootstrap against a plain single-listing crawl of the same server in the
  same run (the crawler on the unsliced newest-first listing, which stops at the cap).

    python bench/bench_crawl.py                    # 200,000 models, cap 10,000 (several minutes)
    python bench/bench_crawl.py --quick            # 40,000 models, cap 2,000
    python bench/bench_crawl.py --models 500000 --cap 10000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT / "tools")]

import devenv  # noqa: E402
from sketchfab_similarity import crawl  # noqa: E402
from sketchfab_similarity.core import db  # noqa: E402
from sketchfab_similarity.core.settings import Settings  # noqa: E402
from sketchfab_similarity.crawl.crawler import CrawlFilters, CrawlWindow  # noqa: E402

PAGE = 24
TARGET_PAGES_RATIO = 1.3


def start_server(models: int, cap: int, workdir: Path) -> tuple[subprocess.Popen, dict]:
    """The server in its own process, so it does not share the crawler's interpreter lock."""
    ready = workdir / "server.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tools")}
    cmd = [sys.executable, "-m", "fake_sketchfab", "--models", str(models), "--port", "0"]
    cmd += ["--listing-cap", str(cap), "--ready-file", str(ready)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the local Sketchfab server did not start")
        time.sleep(0.2)
    return proc, json.loads(ready.read_text())


def new_database(libpq_uri: str, name: str) -> str:
    url, _ = devenv.create_database(libpq_uri, name)
    db.apply_schema(url)
    return url


def count_models(db_url: str) -> int:
    with db.connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(DISTINCT uid) FROM sketchfab_models")
        return int(cur.fetchone()[0])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=200_000)
    parser.add_argument("--cap", type=int, default=10_000, help="results one query yields at most")
    parser.add_argument("--quick", action="store_true", help="40,000 models, cap 2,000")
    args = parser.parse_args()
    models, cap = (40_000, 2_000) if args.quick else (args.models, args.cap)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-crawl-") as tmp:
        workdir = Path(tmp)
        libpq_uri = devenv.start_postgres(workdir / "pg")
        server, info = start_server(models, cap, workdir)
        try:
            print(
                f"catalogue of {models:,} models, listing cap {cap:,} per query, {os.cpu_count()} CPUs",
                flush=True,
            )
            plain = Settings(
                db_url=new_database(libpq_uri, "bench_crawl_plain"), api_base_url=info["api_base_url"]
            )
            plain = plain.with_overrides(api_listing_cap=cap)
            t0 = time.perf_counter()
            # The plain listing, as the crawler paged it before slicing: it ends at the cap.
            base = crawl.crawl(plain, CrawlWindow(), CrawlFilters(max_models=cap))
            plain_s = time.perf_counter() - t0
            plain_rate = base.upserted / plain_s

            sliced = Settings(
                db_url=new_database(libpq_uri, "bench_crawl_sliced"), api_base_url=info["api_base_url"]
            )
            sliced = sliced.with_overrides(api_listing_cap=cap)
            t0 = time.perf_counter()
            stats = crawl.crawl(sliced, crawl.incremental_window(sliced.db_url, timedelta(hours=1)))
            sliced_s = time.perf_counter() - t0
            stored = count_models(sliced.db_url)
        finally:
            server.terminate()
            server.wait(timeout=30)
            devenv.stop_postgres(workdir / "pg")

    minimum = -(-models // PAGE)
    coverage = stored / models
    pages_ratio = stats.pages / minimum
    rate = stored / sliced_s
    rows = [
        (
            "plain single listing (stops at the cap)",
            f"{base.upserted:,} models",
            f"{base.pages:,} pages",
            plain_rate,
        ),
        ("sliced bootstrap", f"{stored:,} models", f"{stats.pages:,} pages", rate),
    ]
    for name, n, pages, r in rows:
        print(f"  {name:<42} {n:>16} {pages:>14} {r:>9.0f} models/s")
    print(
        f"coverage {coverage:.2%} (target 100%); pages {stats.pages:,} vs minimum {minimum:,} = "
        f"{pages_ratio:.3f}x (target <= {TARGET_PAGES_RATIO}x); {stats.slices_crawled} slices, "
        f"{stats.slices_split} split on the way, {stats.slices_capped} capped; "
        f"{stats.requests:,} requests, {stats.duplicates:,} records seen twice"
    )
    print(
        f"models/s: sliced bootstrap / plain listing = {rate / plain_rate:.2f}x; bootstrap took {sliced_s:.0f}s"
    )
    ok = coverage == 1.0 and pages_ratio <= TARGET_PAGES_RATIO
    print("OK" if ok else "BELOW TARGET")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
