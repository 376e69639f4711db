"""SIGKILL a stage's process mid-way, rerun, and compare every table and the store with a run that
was never interrupted: identical (the store may keep a `.tmp` of the killed write; gc removes it)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import devenv
import psutil
import pytest
from fake_sketchfab import Catalog, FaultConfig, start_server
from helpers import query
from processes import kill_all
from sketchfab_similarity import crawl, features, similarity, thumbnails, vectors
from sketchfab_similarity.core import db
from sketchfab_similarity.core.settings import Settings
from sketchfab_similarity.core.store import ArtifactStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
STAGE_SCRIPT = {
    "crawl": "crawl.crawl(s, crawl.CrawlWindow(), checkpoint_key='matrix')",
    "download": "thumbnails.download_thumbnails(s)",
}
KILL_WHEN = {  # the stage has committed some of its work, not all
    "crawl": "SELECT pages >= 1 FROM crawl_runs WHERE run_key = 'matrix'",
    "download": "SELECT count(*) >= 1 FROM model_thumbnails",
}


def checksum(settings: Settings) -> dict[str, object]:
    """What the pipeline derived, without its own bookkeeping timestamps; the store's files by hash."""
    tables = {
        "models": "SELECT uid, name, published_at, like_count, tags, raw::text FROM sketchfab_models ORDER BY uid",
        "thumbnails": "SELECT uid, source_url, status, content_hash, stored_path, width, height, error, attempts "
        "FROM model_thumbnails ORDER BY uid",
        "vectors": "SELECT uid, embedding::text, feature_version, content_hash FROM model_embeddings ORDER BY uid",
        "similarity": "SELECT * FROM model_similarity ORDER BY uid, rank",
        "rejects": "SELECT raw::text, reason FROM crawl_rejects ORDER BY 1, 2",
    }
    out: dict[str, object] = {name: query(settings.db_url, sql) for name, sql in tables.items()}
    store = ArtifactStore(settings.thumbnail_store)
    out["store"] = sorted(
        (f.key, hashlib.sha256(store.get(f.key)).hexdigest())
        for f in store.files()
        if not f.key.endswith(".tmp") and not f.key.startswith("features/")
    )
    return out


def run_rest(settings: Settings, after: str) -> None:
    stages = ["crawl", "download", "extract", "load", "refresh"]
    extracted = None
    for stage in stages[stages.index(after) :]:
        if stage == "crawl":
            crawl.crawl(settings, crawl.CrawlWindow(), checkpoint_key="matrix")
        elif stage == "download":
            thumbnails.download_thumbnails(settings)
        elif stage == "extract":
            extracted = features.extract_features(settings)
        elif stage == "load":
            vectors.load_vectors(settings, extracted.files, remove_loaded=True)
        else:
            similarity.refresh_similarity(settings)


def settings_on(pg_uri: str, name: str, tmp_path: Path, server) -> Settings:
    url, _ = devenv.create_database(pg_uri, name)
    db.apply_schema(url)
    return Settings(
        db_url=url,
        api_base_url=server.api_base_url,
        thumbnail_store=str(tmp_path / name),
        thumbnail_hosts=(server.media_host,),
        vgg16_weights="random",
        input_size=32,
        top_n=4,
        download_workers=1,
    )


@pytest.mark.parametrize("stage", ["crawl", "download"])
def test_a_stage_killed_mid_way_and_rerun_ends_identical_to_an_uninterrupted_run(pg_uri, tmp_path, stage):
    catalog = Catalog.generate(96, seed=50)
    with start_server(catalog, faults=FaultConfig(latency_ms=120)) as server:
        reference = settings_on(pg_uri, f"matrix_ref_{stage}", tmp_path, server)
        run_rest(reference, "crawl")
        victim = settings_on(pg_uri, f"matrix_kill_{stage}", tmp_path, server)
        if stage == "download":
            crawl.crawl(victim, crawl.CrawlWindow(), checkpoint_key="matrix")
        script = (
            "from sketchfab_similarity import crawl, thumbnails\n"
            "from sketchfab_similarity.core.settings import Settings\n"
            f"s = Settings(**{ {k: getattr(victim, k) for k in ('db_url', 'api_base_url', 'thumbnail_store', 'thumbnail_hosts', 'vgg16_weights', 'input_size', 'top_n', 'download_workers')}!r})\n"
            + STAGE_SCRIPT[stage]
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "tools")])}
        proc = subprocess.Popen([sys.executable, "-c", script], env=env)
        try:
            while proc.poll() is None:
                rows = query(victim.db_url, KILL_WHEN[stage])
                if rows and rows[0][0]:
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)  # returns early if the process ends
            assert proc.poll() is None, "the stage finished before it could be killed mid-way"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                kill_all([psutil.Process(proc.pid)])
        run_rest(victim, stage)
    assert checksum(victim) == checksum(reference)
