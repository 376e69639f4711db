"""Refresh publishing: each part stages its lists; the last part of a run to finish publishes
them into `model_similarity` in one transaction that writes only rows that differ."""

from __future__ import annotations

import io
import logging

import numpy as np

from ..core.db import connect, set_state_value, state_value
from ..core.pgcopy import copy_rows
from . import topn
from .compute import Lists
from .plan import STATE_KEY, Plan, RefreshStats

log = logging.getLogger(__name__)

# Arbitrary constant: one publish at a time.
_PUBLISH_LOCK_KEY = 0x5F1A_0005


def write_staging(db_url: str, plan: Plan, part: int, lists: Lists) -> None:
    """This part's lists into the staging tables (replacing what an earlier try left)."""
    count, k = lists.indices.shape
    entries = np.ones(count * k, bool) if lists.changed is None else lists.changed.ravel()
    uids = plan.uids.astype("S")
    rows = copy_rows(
        [
            np.full(entries.sum(), np.bytes_(plan.plan_id)),
            np.full(entries.sum(), part, np.int32),
            np.repeat(uids[lists.rows], k)[entries],
            np.tile(np.arange(1, k + 1, dtype=np.int32), count)[entries],
            uids[lists.indices.ravel()[entries]],
            lists.scores.ravel()[entries].astype(np.float32),
        ]
    )
    # One row per list; an empty list (a table of one model) has no last entry: NULLs, so text COPY.
    if k:
        summary = copy_rows(
            [
                np.full(count, np.bytes_(plan.plan_id)),
                np.full(count, part, np.int32),
                uids[lists.rows],
                plan.hashes[lists.rows],
                np.full(count, k, np.int32),
                lists.scores[:, -1].astype(np.float32),
                uids[lists.indices[:, -1]],
            ]
        )
        summary_sql = "COPY similarity_staging_lists FROM STDIN (FORMAT binary)"
    else:
        summary = "".join(
            f"{plan.plan_id}\t{part}\t{plan.uids[row]}\t{plan.hashes[row]}\t0\t\\N\t\\N\n"
            for row in lists.rows.tolist()
        ).encode()
        summary_sql = "COPY similarity_staging_lists FROM STDIN"
    with connect(db_url) as conn, conn.cursor() as cur:
        for table in ("similarity_staging", "similarity_staging_lists"):
            cur.execute(f"DELETE FROM {table} WHERE plan_id = %s AND part = %s", (plan.plan_id, part))  # noqa: S608
        cur.copy_expert("COPY similarity_staging FROM STDIN (FORMAT binary)", io.BytesIO(rows))
        cur.copy_expert(summary_sql, io.BytesIO(summary))


def publish(cur, plan: Plan, shrinks: bool) -> tuple[int, int]:
    """Move the staged lists into model_similarity: one transaction, only differing rows written.

    Returns (rows written, rows in model_similarity)."""
    params = {"plan": plan.plan_id, "version": plan.version, "gone": plan.gone}
    if plan.mode == "full":  # whole-table joins: hash them in memory
        cur.execute("SET LOCAL work_mem = '256MB'")
    else:  # a few changed rows of a big table: probe its primary key instead of hashing it all
        cur.execute("SET LOCAL enable_hashjoin = off")
        cur.execute("SET LOCAL enable_mergejoin = off")
    # Rows of abandoned runs go first, so the statements below read whole tables: the planner
    # then sizes them right without ANALYZE (fresh tables have no statistics for plan_id).
    for table in ("similarity_staging", "similarity_staging_lists"):
        cur.execute(f"DELETE FROM {table} WHERE plan_id <> %(plan)s", params)  # noqa: S608
    if plan.mode == "full":
        cur.execute(
            "DELETE FROM model_similarity s WHERE NOT EXISTS "
            "(SELECT 1 FROM similarity_staging_lists l WHERE l.uid = s.uid)",
            params,
        )
    else:
        cur.execute("DELETE FROM model_similarity WHERE uid = ANY(%(gone)s)", params)
    written = cur.rowcount
    if shrinks:  # rows past the end of lists that got shorter
        cur.execute(
            "DELETE FROM model_similarity s USING similarity_staging_lists l "
            "WHERE s.uid = l.uid AND s.rank > l.list_length",
            params,
        )
        written += cur.rowcount
    # Changed rows are updated in place (no indexed column changes: mostly heap-only updates),
    # missing rows inserted, identical rows left alone.
    cur.execute(
        """
        MERGE INTO model_similarity s
        USING similarity_staging n
        ON s.uid = n.uid AND s.rank = n.rank
        WHEN MATCHED AND (s.similar_uid <> n.similar_uid OR s.score <> n.score OR s.feature_version <> %(version)s)
            THEN UPDATE SET similar_uid = n.similar_uid, score = n.score, feature_version = %(version)s
        WHEN NOT MATCHED
            THEN INSERT (uid, rank, similar_uid, score, feature_version)
                 VALUES (n.uid, n.rank, n.similar_uid, n.score, %(version)s)
        """,
        params,
    )
    written += cur.rowcount
    if plan.mode == "full":
        cur.execute(
            "DELETE FROM similarity_members m WHERE NOT EXISTS "
            "(SELECT 1 FROM similarity_staging_lists l WHERE l.uid = m.uid)",
            params,
        )
    else:
        cur.execute("DELETE FROM similarity_members WHERE uid = ANY(%(gone)s)", params)
    cur.execute(
        """
        INSERT INTO similarity_members AS m (uid, vector_hash, list_length, last_score, last_uid)
        SELECT uid, vector_hash, list_length, last_score, last_uid
        FROM similarity_staging_lists
        ON CONFLICT (uid) DO UPDATE SET
            vector_hash = EXCLUDED.vector_hash, list_length = EXCLUDED.list_length,
            last_score = EXCLUDED.last_score, last_uid = EXCLUDED.last_uid
        WHERE (m.vector_hash, m.list_length, m.last_score, m.last_uid)
              IS DISTINCT FROM (EXCLUDED.vector_hash, EXCLUDED.list_length, EXCLUDED.last_score, EXCLUDED.last_uid)
        """,
        params,
    )
    cur.execute("SELECT coalesce(sum(list_length), 0), count(*) FROM similarity_members")
    rows, models = cur.fetchone()
    state = {
        "feature_version": plan.version,
        "top_n": plan.n,
        "plan_id": plan.plan_id,
        "mode": plan.mode,
        "models": models,
        "rows": int(rows),
    }
    set_state_value(cur, STATE_KEY, state)
    # Everything staged was computed against the table just replaced: none of it is usable any
    # more. TRUNCATE also returns the space at once (only refresh tasks use these tables).
    cur.execute("TRUNCATE similarity_staging, similarity_staging_lists, similarity_parts")
    return written, int(rows)


class StalePlan(RuntimeError):
    """model_similarity was published by another plan since this one was made: its diff no longer applies."""


class LostStaging(RuntimeError):
    """Staged lists of finished parts are gone (a server crash empties the unlogged staging tables)."""


def finish_part(
    db_url: str, plan: Plan, run_key: str, part: int, parts: int, stats: RefreshStats, *, lists: int
) -> None:
    """Record this part as done with the number of `lists` it staged; the part that completes the run publishes.

    Before publishing, the staged lists are counted against what the parts recorded: the staging
    tables are unlogged, so a server crash empties them while the (logged) part records survive,
    and publishing what is left would silently publish nothing. That case fails loudly instead,
    as does a plan whose base is no longer the published table (a cleared task of an old run).
    """
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO similarity_parts (run_key, part, parts, plan_id, lists) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (run_key, part) DO UPDATE SET parts = EXCLUDED.parts, plan_id = EXCLUDED.plan_id, "
            "lists = EXCLUDED.lists, finished_at = now()",
            (run_key, part, parts, plan.plan_id, lists),
        )
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_PUBLISH_LOCK_KEY,))
        cur.execute(
            "SELECT count(*), count(DISTINCT plan_id), bool_and(plan_id = %s) FROM similarity_parts "
            "WHERE run_key = %s",
            (plan.plan_id, run_key),
        )
        done, plans, same = cur.fetchone()
        if done < parts:
            log.info(
                "part %d of %d done; %d of %d finished, the last one publishes", part, parts, done, parts
            )
            return
        if plans > 1 or not same:
            raise RuntimeError(
                "The parts of this refresh saw different embeddings (model_embeddings changed while it "
                "ran); clear the run's refresh_similarity tasks to compute them again."
            )
        state = state_value(cur, STATE_KEY)
        if state.get("plan_id") == plan.plan_id:
            log.info("plan %s is already published", plan.plan_id)
            stats.published = True
            return
        if state.get("plan_id") != plan.base_plan_id:
            raise StalePlan(
                f"plan {plan.plan_id} was computed against published plan {plan.base_plan_id}, but "
                f"{state.get('plan_id')} is published now; it is not applied (run the refresh again)"
            )
        cur.execute(
            "SELECT p.part, p.lists, count(l.uid) FROM similarity_parts p LEFT JOIN similarity_staging_lists l "
            "ON l.plan_id = p.plan_id AND l.part = p.part WHERE p.run_key = %s GROUP BY p.part, p.lists",
            (run_key,),
        )
        counts = cur.fetchall()
        lost = [p for p, expected, staged in counts if staged != expected]
        if lost:
            # Forget those parts, so a rerun of them is awaited again instead of publishing without them.
            cur.execute("DELETE FROM similarity_parts WHERE run_key = %s AND part = ANY(%s)", (run_key, lost))
            conn.commit()
            staged, expected = sum(c[2] for c in counts), sum(c[1] for c in counts)
            raise LostStaging(
                f"{staged} of the {expected} lists the parts staged are left (Postgres restarted and "
                f"emptied the unlogged staging tables?); nothing was published: clear every "
                f"refresh_similarity task of this run to compute parts {sorted(lost)} again"
            )
        shrinks = plan.mode == "full" or topn.neighbours_k(len(plan.uids), plan.n) < state.get("top_n", 0)
        stats.rows_written, stats.rows = publish(cur, plan, shrinks)
        stats.published = True
    if plan.mode == "full":  # fresh statistics for a rewritten table (ANALYZE never blocks readers)
        with connect(db_url) as conn, conn.cursor() as cur:
            cur.execute("ANALYZE model_similarity, similarity_members")
