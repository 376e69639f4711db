"""SIGKILL a stage's process mid-way, rerun, and compare every table and the store with a run that
was never interrupted: identical, once storage gc has removed what the killed process left (the
`.tmp` of a write cut short, the feature files of an extraction whose load never came).

Crawl and download are killed from outside once their first work is committed (they write as they
go); extraction, load, staging and publish kill themselves at an exact point (the child process
wraps one function of the stage), so the test knows the kill fell inside the transaction or
between the files it names."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
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
from sketchfab_similarity.core.store import FEATURE_KEY, ArtifactStore
from sketchfab_similarity.thumbnails.gc import collect_garbage

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["crawl", "download", "extract", "load", "refresh"]
FEATURE_CHUNK = 24  # images per feature file in the killed process: 96 models make 4 files

CHILD_PRELUDE = """
import importlib, os, signal
from sketchfab_similarity import crawl, features, similarity, thumbnails, vectors
from sketchfab_similarity.core.settings import Settings
s = Settings(**SETTINGS)
features.extract.CHUNK_SIZE = FEATURE_CHUNK

def kill_after(module, attribute, calls):
    '''SIGKILL this process when the `calls`-th call of module.attribute returns.'''
    owner = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, seen = getattr(owner, name), []
    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(1)
        if len(seen) == calls:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(owner, name, wrapper)
"""


@dataclass(frozen=True)
class Case:
    """Where a stage is killed: what runs before it in the test, what the killed process runs, how
    the kill is decided, and the first stage a rerun repeats."""

    done_before: tuple[str, ...]
    child: str
    rerun_from: str
    kill_when: str | None = None
    """Crawl and download are killed from outside once some, not all, of their work is committed
    (this query says so); the others kill themselves at an exact point (`kill_after`)."""


CASES = {
    "crawl": Case((), "crawl.crawl(s, crawl.CrawlWindow(), checkpoint_key='matrix')", "crawl",
                  kill_when="SELECT pages >= 1 FROM crawl_runs WHERE run_key = 'matrix'"),
    "download": Case(("crawl",), "thumbnails.download_thumbnails(s)", "download",
                     kill_when="SELECT count(*) >= 1 FROM model_thumbnails"),
    # The first feature file is written, the second chunk is being extracted.
    "extract": Case(("crawl", "download"),
                    "kill_after('sketchfab_similarity.core.store', 'ArtifactStore.write_features', 1)\n"
                    "features.extract_features(s)", "extract"),
    # Inside the transaction of the second feature file: its rows are built, not yet committed.
    "load": Case(("crawl", "download"),
                 "r = features.extract_features(s)\n"
                 "kill_after('sketchfab_similarity.vectors.load', 'copy_rows', 2)\n"
                 "vectors.load_vectors(s, r.files, remove_loaded=True)", "load"),
    # A refresh over the first feature file's vectors staged its lists and died before publishing;
    # the rerun sees more vectors, so its plan differs and the abandoned staging must not leak in.
    "stage": Case(("crawl", "download"),
                  "r = features.extract_features(s)\n"
                  "vectors.load_vectors(s, sorted(r.files)[:1])\n"
                  "kill_after('sketchfab_similarity.similarity.refresh', 'write_staging', 1)\n"
                  "similarity.refresh_similarity(s)", "load"),
    # Every statement of the publish transaction has run; the commit has not.
    "publish": Case(("crawl", "download"),
                    "r = features.extract_features(s)\n"
                    "vectors.load_vectors(s, r.files, remove_loaded=True)\n"
                    "kill_after('sketchfab_similarity.similarity.publish', 'publish', 1)\n"
                    "similarity.refresh_similarity(s)", "refresh"),
}  # fmt: skip


def checksum(settings: Settings) -> dict[str, object]:
    """What the pipeline derived, without its own bookkeeping timestamps; the store's files by hash."""
    tables = {
        "models": "SELECT uid, name, published_at, like_count, tags, raw::text FROM sketchfab_models ORDER BY uid",
        "thumbnails": "SELECT uid, source_url, status, content_hash, stored_path, width, height, error, attempts "
        "FROM model_thumbnails ORDER BY uid",
        "vectors": "SELECT uid, embedding::text, feature_version, content_hash FROM model_embeddings ORDER BY uid",
        "similarity": "SELECT * FROM model_similarity ORDER BY uid, rank",
        "members": "SELECT * FROM similarity_members ORDER BY uid",
        "published": "SELECT value FROM pipeline_state WHERE name = 'similarity'",
        "leftovers": "SELECT (SELECT count(*) FROM similarity_staging), (SELECT count(*) FROM "
        "similarity_staging_lists), (SELECT count(*) FROM similarity_parts)",
        "rejects": "SELECT raw::text, reason FROM crawl_rejects ORDER BY 1, 2",
    }
    out: dict[str, object] = {name: query(settings.db_url, sql) for name, sql in tables.items()}
    collect_garbage(settings, dry_run=False, min_age_s=0)
    store = ArtifactStore(settings.thumbnail_store)
    out["store"] = sorted((f.key, hashlib.sha256(store.get(f.key)).hexdigest()) for f in store.files())
    return out


def run_stage(settings: Settings, stage: str, extracted: list[str] | None = None) -> list[str] | None:
    """One stage as a run does it; returns the feature files an extraction wrote. A load retry gets
    the keys its XCom holds: given none, every feature file in the store."""
    if stage == "crawl":
        crawl.crawl(settings, crawl.CrawlWindow(), checkpoint_key="matrix")
    elif stage == "download":
        thumbnails.download_thumbnails(settings)
    elif stage == "extract":
        return features.extract_features(settings).files
    elif stage == "load":
        if extracted is None:
            store = ArtifactStore(settings.thumbnail_store)
            extracted = [f.key for f in store.files() if FEATURE_KEY.fullmatch(f.key)]
        vectors.load_vectors(settings, extracted, remove_loaded=True)
    else:
        similarity.refresh_similarity(settings)
    return None


def run_rest(settings: Settings, after: str) -> None:
    """Every stage from `after` on."""
    extracted = None
    for stage in STAGES[STAGES.index(after) :]:
        extracted = run_stage(settings, stage, extracted)


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


def start_child(victim: Settings, stage: str) -> subprocess.Popen:
    fields = ("db_url", "api_base_url", "thumbnail_store", "thumbnail_hosts", "vgg16_weights", "input_size",
              "top_n", "download_workers")  # fmt: skip
    script = (
        CHILD_PRELUDE.replace("SETTINGS", repr({k: getattr(victim, k) for k in fields})).replace(
            "FEATURE_CHUNK", str(FEATURE_CHUNK)
        )
        + CASES[stage].child
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "tools")])}
    return subprocess.Popen([sys.executable, "-c", script], env=env)


def kill_when_committed(proc: subprocess.Popen, victim: Settings, committed: str) -> None:
    while proc.poll() is None:
        rows = query(victim.db_url, committed)
        if rows and rows[0][0]:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.05)  # returns early if the process ends
    assert proc.poll() is None, "the stage finished before it could be killed mid-way"
    proc.send_signal(signal.SIGKILL)


@pytest.fixture(scope="module")
def uninterrupted(pg_uri, tmp_path_factory):
    """One server for every case, and the checksum of a run that was never interrupted."""
    with start_server(Catalog.generate(96, seed=50)) as server:
        reference = settings_on(pg_uri, "matrix_reference", tmp_path_factory.mktemp("matrix"), server)
        run_rest(reference, "crawl")
        yield server, checksum(reference)


@pytest.mark.parametrize("stage", list(CASES))
def test_a_stage_killed_mid_way_and_rerun_ends_identical_to_an_uninterrupted_run(
    uninterrupted, pg_uri, tmp_path, stage
):
    server, expected = uninterrupted
    case = CASES[stage]
    victim = settings_on(pg_uri, f"matrix_kill_{stage}", tmp_path, server)
    for before in case.done_before:
        run_stage(victim, before)
    if case.kill_when:  # slow answers, so the kill falls between the first commit and the last
        server.set_faults(FaultConfig(latency_ms=120))
    proc = start_child(victim, stage)
    try:
        if case.kill_when:
            kill_when_committed(proc, victim, case.kill_when)
        proc.wait(timeout=300)
        assert proc.returncode == -signal.SIGKILL, (
            f"the {stage} process was not killed (exit {proc.returncode})"
        )
    finally:
        server.set_faults(FaultConfig())
        if proc.poll() is None:
            kill_all([psutil.Process(proc.pid)])
    run_rest(victim, case.rerun_from)
    assert checksum(victim) == expected
