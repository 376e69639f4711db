"""Stage 5, refresh_similarity: the exact top-N table, kept up to date incrementally.

A refresh first makes a plan (`plan.py`) by comparing `model_embeddings` (current feature
version) with `similarity_members`, the record of which vector every published list was
computed from:

- **nothing changed**: done;
- **incremental**: lists of new and changed models, and of models whose list contains a
  changed or removed model, are computed from scratch against all models; every other
  list only takes in the new models that beat its current last entry. The work grows
  with (changed lists) x (all models), not with the square of the table;
- **full**: when the feature version or N changes, when asked, when the incremental
  work would cost more than a rebuild, or when a list read back does not match the
  bookkeeping (a hand-edited table).

Lists are computed by `compute.py`, with scores from `topn` (blocked matrix products,
partial sorting, float64 rescoring), so every score is a pure function of the two vectors
and an incremental refresh produces exactly the table a full rebuild would.

Computed lists (only their changed entries, for lists updated in place) go to the staging
tables; the last part to finish publishes them into `model_similarity` in one transaction
that updates, inserts and deletes only rows that differ (`publish.py`). Readers keep their
MVCC snapshot, so they see the old table or the new one, never a mix, and never wait for a
lock (a table swap would need an exclusive lock; see bench/bench_publish.py). A refresh can
be split into parts (`refresh_parts`) that run as parallel mapped Airflow tasks on several
workers, each computing the lists of its shard of uids.
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np

from ..core.featurespec import FeatureSpec
from ..core.progress import Progress, lap
from ..core.settings import Settings
from ..core.sharding import WHOLE, Shard
from .compute import compute, compute_full
from .plan import BookkeepingMismatch, Plan, RefreshStats, make_plan, read_state
from .publish import finish_part, write_staging

# The stage's pieces, for benchmarks and tests that drive them one at a time.
__all__ = [
    "Plan",
    "RefreshStats",
    "compute_full",
    "finish_part",
    "make_plan",
    "refresh_similarity",
    "write_staging",
]

log = logging.getLogger(__name__)


def refresh_similarity(
    settings: Settings,
    full: bool = False,
    top_n: int | None = None,
    shard: Shard = WHOLE,
    run_key: str | None = None,
) -> RefreshStats:
    """Bring model_similarity up to date for the current feature version.

    With `shard` = part i of n, computes that part's lists; the last of the n parts of the
    same `run_key` to finish publishes all of them at once.
    """
    version = FeatureSpec.from_settings(settings).version
    n = top_n or settings.top_n
    run_key = run_key or uuid.uuid4().hex
    clock = time.perf_counter()
    seconds = {}
    plan = make_plan(settings.db_url, version, n, full=full, parts=shard.count)
    clock = lap(seconds, "plan", clock)
    log_plan(plan)
    progress = Progress("refresh", total=len(plan.uids) // shard.count, unit="lists", log=log)
    try:
        lists = compute(plan, shard, settings, progress)
    except BookkeepingMismatch as exc:
        log.warning("%s: rebuilding model_similarity from scratch", exc)
        plan = make_plan(settings.db_url, version, n, parts=shard.count, reason=f"{exc}")
        log_plan(plan)
        lists = compute(plan, shard, settings, progress)
    clock = lap(seconds, "compute", clock)
    stats = RefreshStats(
        models=len(plan.uids),
        feature_version=version,
        mode=plan.mode,
        reason=plan.reason,
        new=len(plan.new) - plan.changed if plan.mode != "full" else len(plan.uids),
        changed=plan.changed,
        removed=len(plan.gone),
        part=shard.index,
        parts=shard.count,
        seconds=seconds,
    )
    if plan.mode == "none":
        stats.skipped_unchanged = True
        stats.rows = read_state(settings.db_url).get("rows", 0)
        return stats
    stats.recomputed = int(np.isin(lists.rows, plan.recompute).sum())
    stats.updated = len(lists.rows) - stats.recomputed
    write_staging(settings.db_url, plan, shard.index, lists)
    clock = lap(seconds, "stage", clock)
    finish_part(settings.db_url, plan, run_key, shard.index, shard.count, stats)
    lap(seconds, "publish", clock)
    progress.finish(
        f"{plan.mode}: {len(lists.rows)} lists computed ({stats.recomputed} from scratch, {stats.updated} "
        f"updated)"
        + (f"; published, {stats.rows_written} rows written, {stats.rows} rows" if stats.published else "")
        + "; "
        + ", ".join(f"{k} {v:.2f}s" for k, v in stats.seconds.items())
    )
    return stats


def log_plan(plan: Plan) -> None:
    log.info(
        "refresh plan %s: %s (%s); %d models, %d new or changed (%d changed), %d removed, %d lists to recompute",
        plan.plan_id, plan.mode, plan.reason, len(plan.uids), len(plan.new), plan.changed, len(plan.gone),
        len(plan.recompute) if plan.mode != "none" else 0,
    )  # fmt: skip
