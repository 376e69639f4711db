"""Run-level bookkeeping: one run at a time, shard plans for mapped tasks, run summaries.

Airflow's `max_active_runs` keeps scheduled and manual runs from overlapping, but it
counts each backfill's runs separately. The run lease closes that gap: a run works
only while it holds the lease, and takes it over only from a run that is no longer
active, so scheduled runs, manual runs and every backfill run take turns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg2.extras import Json

from .db import connect, state_value
from .sharding import Shard

STAGES = ("crawl_models", "download_thumbnails", "extract_features", "load_vectors", "refresh_similarity")
"""The pipeline's task ids, in order (a contract of DESIGN.md); the DAG, the run summary and the gallery use these."""
LEASE_KEY = "run_lease"
ACTIVE_RUN_STATES = frozenset({"queued", "running"})


@dataclass(frozen=True)
class LeaseDecision:
    acquired: bool
    reason: str


def try_acquire_run_lease(
    db_url: str, dag_id: str, run_id: str, run_state: Callable[[str, str], str | None]
) -> LeaseDecision:
    """Take the lease if it is free, already ours, or held by a run that is no longer active.

    `run_state(dag_id, run_id)` gives the holder's Airflow state (None if the run no
    longer exists). The lease row is locked while we decide, so two runs never both win.
    """
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO pipeline_state (name, value) VALUES (%s, '{}'::jsonb) ON CONFLICT (name) DO NOTHING",
            (LEASE_KEY,),
        )
        cur.execute("SELECT value FROM pipeline_state WHERE name = %s FOR UPDATE", (LEASE_KEY,))
        (held,) = cur.fetchone()
        holder_dag, holder_run = held.get("dag_id"), held.get("run_id")
        if holder_run == run_id and holder_dag == dag_id:
            return LeaseDecision(True, "this run already holds the lease")
        reason = "the lease was free"
        if holder_run:
            state = run_state(holder_dag, holder_run)
            if state in ACTIVE_RUN_STATES:
                return LeaseDecision(False, f"waiting for run {holder_run!r} of {holder_dag} ({state})")
            reason = f"took over from run {holder_run!r} ({state or 'no longer exists'})"
        cur.execute(
            "UPDATE pipeline_state SET value = %s, updated_at = now() WHERE name = %s",
            (Json({"dag_id": dag_id, "run_id": run_id}), LEASE_KEY),
        )
        return LeaseDecision(True, reason)


def release_run_lease(db_url: str, dag_id: str, run_id: str) -> bool:
    """Hand the lease back at the end of a run; a no-op if another run holds it."""
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE pipeline_state SET value = '{}'::jsonb, updated_at = now() "
            "WHERE name = %s AND value->>'dag_id' = %s AND value->>'run_id' = %s",
            (LEASE_KEY, dag_id, run_id),
        )
        return cur.rowcount == 1


def plan_shards(pending: int, shard_size: int, max_shards: int) -> list[Shard]:
    """Enough shards for `shard_size` items each, at least one (so the stage always runs), at most max."""
    count = min(max(1, math.ceil(pending / shard_size)), max_shards)
    return Shard.all(count)


def combine(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge the XComs of mapped task instances: numbers add up, flags are or-ed, lists concatenate,
    dicts merge.

    Other values must agree across parts (e.g. every shard's feature version).
    """
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key not in out:
                out[key] = (
                    dict(value)
                    if isinstance(value, dict)
                    else list(value)
                    if isinstance(value, list)
                    else value
                )
            elif isinstance(value, bool):
                out[key] = out[key] or value  # a flag holds for the run if any part set it
            elif not isinstance(value, int | float | list | dict):
                if value != out[key]:
                    raise ValueError(f"mapped tasks disagree on {key!r}: {out[key]!r} vs {value!r}")
            elif isinstance(value, list):
                out[key].extend(value)
            elif isinstance(value, dict):
                merged = out[key]
                for k, v in value.items():
                    both_numbers = isinstance(v, int | float) and isinstance(merged.get(k), int | float)
                    merged[k] = merged[k] + v if both_numbers else v
            else:
                out[key] += value
    return out


FAILURE_COUNTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "crawl_models": ("rejected", ("seen",)),
    "download_thumbnails": ("failed", ("fetched", "failed")),
    "extract_features": ("failed", ("extracted", "failed")),
    "load_vectors": ("rejected", ("loaded", "rejected")),
}
"""Per stage: the count of failed items and the counts that add up to all its items."""


def failed_stages(
    counts: Mapping[str, Mapping[str, Any]], max_share: float, min_items: int
) -> dict[str, str]:
    """Stages that failed for too many of their items, each with the counts and reasons why.

    A stage fails the run when every item failed, or, with at least `min_items` items, when more
    than `max_share` of them failed: a run that achieved nothing must not end green, a run with a
    few bad thumbnails must.
    """
    out: dict[str, str] = {}
    for stage, (failed_key, total_keys) in FAILURE_COUNTS.items():
        stage_counts = counts.get(stage) or {}
        failed = int(stage_counts.get(failed_key) or 0)
        total = sum(int(stage_counts.get(k) or 0) for k in total_keys)
        if total == 0 or failed == 0:
            continue
        if failed >= total or (total >= min_items and failed > max_share * total):
            reasons = {
                k: v
                for k, v in stage_counts.items()
                if isinstance(v, dict) and all(isinstance(n, int) for n in v.values())
            }
            why = "; ".join(f"{r}: {n}" for d in reasons.values() for r, n in sorted(d.items()))
            out[stage] = f"{failed} of {total} items failed" + (f" ({why})" if why else "")
    refresh = counts.get("refresh_similarity") or {}
    if refresh.get("published") is False and refresh.get("skipped_unchanged") is False:
        out["refresh_similarity"] = (
            "the refresh computed its lists but no part published them (a part that finished earlier "
            "was lost?); clear every refresh_similarity task of this run"
        )
    return out


def lease_problem(db_url: str, dag_id: str, run_id: str) -> str | None:
    """Why this run may not work now (another run holds the lease, or none does); None if it holds it.

    start_run takes the lease; every later task checks it again, so a task of an old run that is
    cleared and rerun while another run works cannot write underneath that run.
    """
    with connect(db_url) as conn, conn.cursor() as cur:
        held = state_value(cur, LEASE_KEY)
    if held.get("dag_id") == dag_id and held.get("run_id") == run_id:
        return None
    if not held.get("run_id"):
        return "no run holds the run lease (this run finished or was taken over); clear start_run to take it again"
    return f"run {held['run_id']!r} of {held.get('dag_id')} holds the run lease now; this run may not write"


def record_run(
    db_url: str,
    *,
    dag_id: str,
    run_id: str,
    run_type: str,
    data_interval: tuple[datetime | None, datetime | None],
    feature_version: str | None,
    counts: Mapping[str, Any],
) -> None:
    """Upsert the run's summary into `pipeline_runs` (a rerun of the same run replaces it)."""
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO pipeline_runs
                (run_id, dag_id, run_type, data_interval_start, data_interval_end, feature_version, counts)
            VALUES (%s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (dag_id, run_id) DO UPDATE SET
                run_type = EXCLUDED.run_type,
                data_interval_start = EXCLUDED.data_interval_start,
                data_interval_end = EXCLUDED.data_interval_end,
                feature_version = EXCLUDED.feature_version,
                counts = EXCLUDED.counts, finished_at = now()
            """,
            (run_id, dag_id, run_type, *data_interval, feature_version, Json(dict(counts))),
        )


def mapped_results(parts: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The XComs of a mapped task in one request (iterating Airflow's lazy sequence probes past its end)."""
    return list(parts[:])


# Per stage, the counts worth a line in the run summary, with why items failed (the full results stay
# in each task's XCom).
SUMMARY_FIELDS = dict(
    zip(
        STAGES,
        (
            ("pages", "seen", "upserted", "rejected", "reject_reasons", "slices_crawled", "deleted"),
            ("candidates", "fetched", "failed", "stored_new", "failures_by_reason"),
            ("extracted", "failed"),
            ("loaded", "changed", "rejected", "rejects_by_reason"),
            ("models", "rows", "published", "skipped_unchanged"),
        ),
        strict=True,
    )
)


def run_counts(results: Mapping[str, Any]) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """(feature version, per-stage summary fields) from each stage's XCom or its mapped XComs."""
    counts: dict[str, dict[str, Any]] = {}
    feature_version = None
    for stage, result in results.items():
        merged = combine([result] if isinstance(result, Mapping) else mapped_results(result))
        feature_version = merged.get("feature_version") or feature_version
        fields = SUMMARY_FIELDS.get(stage, tuple(k for k, v in merged.items() if isinstance(v, int)))
        counts[stage] = {k: merged[k] for k in fields if k in merged}
    return feature_version, counts
