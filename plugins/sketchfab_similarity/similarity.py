"""Stage 5, refresh_similarity: the exact top-N table, kept up to date incrementally.

A refresh first makes a plan by comparing `model_embeddings` (current feature version)
with `similarity_members`, the record of which vector every published list was computed
from:

- **nothing changed**: done;
- **incremental**: lists of new and changed models, and of models whose list contains a
  changed or removed model, are computed from scratch against all models; every other
  list only takes in the new models that beat its current last entry. The work grows
  with (changed lists) x (all models), not with the square of the table;
- **full**: when the feature version or N changes, when asked, or when the incremental
  work would cost more than a rebuild.

Scores come from `topn` (blocked matrix products, partial sorting, float64 rescoring), so
every score is a pure function of the two vectors and an incremental refresh produces
exactly the table a full rebuild would.

Computed lists go to the staging tables; the last part to finish publishes them into
`model_similarity` in one transaction, rewriting only rows that differ. Readers keep their
MVCC snapshot, so they see the old table or the new one, never a mix, and are never
blocked. A full rebuild can be split into parts (`refresh_parts`) that run as parallel
mapped Airflow tasks, each computing the lists of its shard of uids.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import uuid
from dataclasses import dataclass

import numpy as np

from . import topn
from .db import connect
from .features import FeatureSpec
from .progress import Progress
from .settings import Settings
from .sharding import WHOLE, Shard
from .vectors import copy_rows, read_embeddings

log = logging.getLogger(__name__)

STATE_KEY = "similarity"
INCREMENTAL_LIMIT = 0.25
"""Above this share of lists to recompute, a full rebuild (which uses symmetry) is cheaper."""
# Arbitrary constant: one publish at a time.
_PUBLISH_LOCK_KEY = 0x5F1A_0005


@dataclass
class RefreshStats:
    models: int = 0
    rows: int = 0
    skipped_unchanged: bool = False
    feature_version: str = ""
    mode: str = ""
    reason: str = ""
    new: int = 0
    changed: int = 0
    removed: int = 0
    recomputed: int = 0
    updated: int = 0
    part: int = 0
    parts: int = 1
    published: bool = False
    rows_written: int = 0


@dataclass
class Plan:
    """What a refresh has to do; every part of a run computes the same plan from the database."""

    version: str
    n: int
    mode: str
    reason: str
    uids: np.ndarray
    matrix: np.ndarray
    hashes: np.ndarray
    new: np.ndarray
    recompute: np.ndarray
    gone: list[str]
    changed: int
    members: dict[str, tuple[int, float | None, str | None]]
    plan_id: str


@dataclass
class Lists:
    """Computed top-N lists: row `i` is the list of model `rows[i]` (indices into the plan's uids)."""

    rows: np.ndarray
    indices: np.ndarray
    scores: np.ndarray


def vector_hashes(matrix: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint of each vector's float32 bytes: any change to a stored vector shows."""
    data = np.ascontiguousarray(matrix, dtype=np.float32)
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "big", signed=True)
            for row in data
        ],
        dtype=np.int64,
    )


def read_state(db_url: str) -> dict:
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute("SELECT value FROM pipeline_state WHERE name = %s", (STATE_KEY,))
        row = cur.fetchone()
    return row[0] if row else {}


def read_members(db_url: str) -> tuple[dict[str, tuple[int, int, float | None, str | None]], str, bool]:
    """similarity_members as {uid: (hash, list_length, last_score, last_uid)}, a digest of it,
    and whether it agrees with model_similarity (a hand-edited table forces a full rebuild)."""
    buf = io.BytesIO()
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.copy_expert(
            "COPY (SELECT uid, vector_hash, list_length, last_score, last_uid FROM similarity_members "
            "ORDER BY uid) TO STDOUT",
            buf,
        )
        cur.execute(
            "SELECT (SELECT count(*) FROM model_similarity), "
            "(SELECT coalesce(sum(list_length), 0) FROM similarity_members)"
        )
        table_rows, member_rows = cur.fetchone()
    data = buf.getvalue()
    members = {}
    for line in data.decode().splitlines():
        uid, vector_hash, length, last_score, last_uid = line.split("\t")
        members[uid] = (
            int(vector_hash),
            int(length),
            None if last_score == r"\N" else float(np.float32(last_score)),
            None if last_uid == r"\N" else last_uid,
        )
    return members, hashlib.sha256(data).hexdigest(), table_rows == member_rows


def lists_containing(db_url: str, uids: list[str]) -> set[str]:
    if not uids:
        return set()
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute("SELECT DISTINCT uid FROM model_similarity WHERE similar_uid = ANY(%s)", (uids,))
        return {r[0] for r in cur.fetchall()}


def make_plan(db_url: str, version: str, n: int, full: bool = False, parts: int = 1) -> Plan:
    uids, matrix = read_embeddings(db_url, version)
    hashes = vector_hashes(matrix)
    state = read_state(db_url)
    members, members_digest, consistent = read_members(db_url)
    total = len(uids)
    everything = np.arange(total)
    reason = (
        "full refresh requested" if full
        else "no published table yet" if not state.get("plan_id")
        else f"feature version changed from {state.get('feature_version')}" if state.get("feature_version") != version
        else f"N changed from {state.get('top_n')} to {n}" if state.get("top_n") != n
        else "model_similarity does not match its bookkeeping" if not consistent
        else ""
    )  # fmt: skip
    current = set(uids.tolist())
    gone = sorted(u for u in members if u not in current)
    new = np.array(
        [
            i
            for i, (u, h) in enumerate(zip(uids.tolist(), hashes.tolist(), strict=True))
            if members.get(u, (None,))[0] != h
        ],
        dtype=np.int64,
    )
    changed = sum(1 for i in new if uids[i] in members)
    recompute = everything
    if not reason:
        replaced = gone + [str(uids[i]) for i in new if uids[i] in members]
        position = {u: i for i, u in enumerate(uids.tolist())}
        invalid = [position[u] for u in lists_containing(db_url, replaced) if u in position]
        recompute = np.union1d(new, np.array(invalid, dtype=np.int64))
        if len(recompute) > INCREMENTAL_LIMIT * total:
            reason = f"{len(recompute)} of {total} lists to recompute: a full rebuild is cheaper"
            recompute = everything
    mode = "full" if reason else "incremental" if len(new) or gone else "none"
    digest = hashlib.sha256(f"{version}|{n}|{mode}|{parts}|{members_digest}|".encode())
    digest.update("\n".join(uids.tolist()).encode())
    digest.update(hashes.tobytes())
    return Plan(
        version=version,
        n=n,
        mode=mode,
        reason=reason or ("nothing changed" if mode == "none" else "new, changed or removed vectors"),
        uids=uids,
        matrix=matrix,
        hashes=hashes,
        new=new if mode != "full" else everything,
        recompute=recompute,
        gone=gone,
        changed=changed,
        members={u: m[1:] for u, m in members.items()},
        plan_id=digest.hexdigest()[:16],
    )


def compute_full(plan: Plan, shard: Shard, tile: int, progress: Progress) -> Lists:
    if shard.count == 1:
        indices, scores = topn.top_n_all(plan.matrix, plan.n, tile, progress.advance)
        return Lists(np.arange(len(plan.uids)), indices, scores)
    rows = np.array([i for i, u in enumerate(plan.uids.tolist()) if shard.contains(u)], dtype=np.int64)
    indices, scores = topn.top_n_rows(plan.matrix, rows, plan.n, tile, progress.advance)
    return Lists(rows, indices, scores)


def old_lists(db_url: str, uids: list[str]) -> list[tuple[str, str, float]]:
    """(uid, similar_uid, score) of the published lists of these models."""
    if not uids:
        return []
    buf = io.BytesIO()
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE wanted_lists (uid text PRIMARY KEY) ON COMMIT DROP")
        cur.copy_expert("COPY wanted_lists FROM STDIN", io.StringIO("\n".join(uids) + "\n"))
        cur.copy_expert(
            "COPY (SELECT s.uid, s.similar_uid, s.score FROM model_similarity s JOIN wanted_lists w USING (uid)) "
            "TO STDOUT",
            buf,
        )
    rows = []
    for line in buf.getvalue().decode().splitlines():
        uid, similar_uid, score = line.split("\t")
        rows.append((uid, similar_uid, float(np.float32(score))))
    return rows


def compute_incremental(plan: Plan, shard: Shard, tile: int, db_url: str, progress: Progress) -> Lists:
    """Lists to recompute from scratch, plus existing lists that new models enter."""
    total = len(plan.uids)
    k = topn.neighbours_k(total, plan.n)
    mine = np.array([shard.contains(u) for u in plan.uids.tolist()], dtype=bool)
    recompute = plan.recompute[mine[plan.recompute]]
    rec_idx, rec_scores = topn.top_n_rows(plan.matrix, recompute, plan.n, tile, progress.advance)

    kept = mine.copy()
    kept[plan.recompute] = False
    kept_rows = np.flatnonzero(kept)
    if not len(plan.new) or not len(kept_rows):
        return Lists(recompute, rec_idx, rec_scores)
    position = {u: i for i, u in enumerate(plan.uids.tolist())}
    length = np.array([plan.members[plan.uids[i]][0] for i in kept_rows])
    bar = np.array(
        [plan.members[plan.uids[i]][1] if length[j] >= k else -np.inf for j, i in enumerate(kept_rows)]
    )
    last = np.array([position.get(plan.members[plan.uids[i]][2] or "", -1) for i in kept_rows])
    bar32 = np.where(np.isfinite(bar), bar - topn.SCORE_MARGIN, topn.REAL).astype(np.float32)

    new_vectors = plan.matrix[plan.new]
    pairs_u, pairs_a = [], []
    for start in range(0, len(kept_rows), tile):
        block = new_vectors @ plan.matrix[kept_rows[start : start + tile]].T
        a, u = np.nonzero(block >= bar32[start : start + tile])
        pairs_u.append(u + start)
        pairs_a.append(plan.new[a])
    u = np.concatenate(pairs_u)
    a = np.concatenate(pairs_a)
    scores = topn.exact_scores(plan.matrix, kept_rows[u], a)
    enters = (length[u] < k) | (scores > bar[u]) | ((scores == bar[u]) & (a < last[u]))
    u, a, scores = u[enters], a[enters], scores[enters]
    touched = np.unique(u)
    if not len(touched):
        return Lists(recompute, rec_idx, rec_scores)

    old = old_lists(db_url, [str(plan.uids[kept_rows[j]]) for j in touched])
    local = {int(kept_rows[j]): j for j in touched}
    old_u = np.array([local[position[r[0]]] for r in old], dtype=np.int64)
    old_s = np.array([position[r[1]] for r in old], dtype=np.int64)
    old_scores = np.array([r[2] for r in old], dtype=np.float32)
    all_u = np.concatenate([old_u, u])
    all_s = np.concatenate([old_s, a])
    all_scores = np.concatenate([old_scores, scores])
    order = np.lexsort((all_s, -all_scores, all_u))
    all_u, all_s, all_scores = all_u[order], all_s[order], all_scores[order]
    take = np.searchsorted(all_u, touched)[:, None] + np.arange(k)
    progress.advance(len(touched))
    return Lists(
        np.concatenate([recompute, kept_rows[touched]]),
        np.concatenate([rec_idx, all_s[take]]),
        np.concatenate([rec_scores, all_scores[take]]),
    )


def write_staging(db_url: str, plan: Plan, part: int, lists: Lists) -> None:
    """This part's lists into the staging tables (replacing what an earlier try left)."""
    count, k = lists.indices.shape
    plan_id = np.bytes_(plan.plan_id)
    uids = plan.uids.astype("S")
    rows = copy_rows(
        [
            np.full(count * k, plan_id),
            np.full(count * k, part, np.int32),
            np.repeat(uids[lists.rows], k),
            np.tile(np.arange(1, k + 1, dtype=np.int32), count),
            uids[lists.indices.ravel()],
            lists.scores.ravel().astype(np.float32),
        ]
    )
    summary = io.StringIO()
    for i, row in enumerate(lists.rows.tolist()):
        last = (
            f"{np.format_float_positional(lists.scores[i, -1], unique=True)}\t{plan.uids[lists.indices[i, -1]]}"
            if k
            else "\\N\t\\N"
        )
        summary.write(f"{plan.plan_id}\t{part}\t{plan.uids[row]}\t{plan.hashes[row]}\t{k}\t{last}\n")
    summary.seek(0)
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        for table in ("similarity_staging", "similarity_staging_lists"):
            cur.execute(f"DELETE FROM {table} WHERE plan_id = %s AND part = %s", (plan.plan_id, part))  # noqa: S608
        cur.copy_expert("COPY similarity_staging FROM STDIN (FORMAT binary)", io.BytesIO(rows))
        cur.copy_expert("COPY similarity_staging_lists FROM STDIN", summary)


def publish(cur, plan: Plan, run_key: str) -> tuple[int, int]:
    """Move the staged lists into model_similarity: one transaction, only differing rows written.

    Returns (rows written, rows in model_similarity)."""
    params = {"plan": plan.plan_id, "version": plan.version, "gone": plan.gone}
    cur.execute("SET LOCAL work_mem = '256MB'")
    cur.execute("ANALYZE similarity_staging, similarity_staging_lists")
    if plan.mode == "full":
        cur.execute(
            "DELETE FROM model_similarity s WHERE NOT EXISTS "
            "(SELECT 1 FROM similarity_staging_lists l WHERE l.plan_id = %(plan)s AND l.uid = s.uid)",
            params,
        )
    else:
        cur.execute("DELETE FROM model_similarity WHERE uid = ANY(%(gone)s)", params)
    written = cur.rowcount
    cur.execute(
        """
        DELETE FROM model_similarity s
        USING similarity_staging_lists l
        WHERE l.plan_id = %(plan)s AND s.uid = l.uid
          AND (s.feature_version <> %(version)s OR NOT EXISTS (
                SELECT 1 FROM similarity_staging n
                WHERE n.plan_id = %(plan)s AND n.uid = s.uid AND n.rank = s.rank
                  AND n.similar_uid = s.similar_uid AND n.score = s.score))
        """,
        params,
    )
    written += cur.rowcount
    cur.execute(
        """
        INSERT INTO model_similarity (uid, rank, similar_uid, score, feature_version)
        SELECT n.uid, n.rank, n.similar_uid, n.score, %(version)s
        FROM similarity_staging n
        WHERE n.plan_id = %(plan)s
          AND NOT EXISTS (SELECT 1 FROM model_similarity s WHERE s.uid = n.uid AND s.rank = n.rank)
        """,
        params,
    )
    written += cur.rowcount
    if plan.mode == "full":
        cur.execute(
            "DELETE FROM similarity_members m WHERE NOT EXISTS "
            "(SELECT 1 FROM similarity_staging_lists l WHERE l.plan_id = %(plan)s AND l.uid = m.uid)",
            params,
        )
    else:
        cur.execute("DELETE FROM similarity_members WHERE uid = ANY(%(gone)s)", params)
    cur.execute(
        """
        INSERT INTO similarity_members AS m (uid, vector_hash, list_length, last_score, last_uid)
        SELECT uid, vector_hash, list_length, last_score, last_uid
        FROM similarity_staging_lists WHERE plan_id = %(plan)s
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
    cur.execute(
        "INSERT INTO pipeline_state (name, value) VALUES (%s, %s) "
        "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
        (STATE_KEY, json.dumps(state)),
    )
    # Everything staged was computed against the table just replaced: none of it is usable any more.
    for table in ("similarity_staging", "similarity_staging_lists", "similarity_parts"):
        cur.execute(f"DELETE FROM {table}")  # noqa: S608
    return written, int(rows)


def finish_part(db_url: str, plan: Plan, run_key: str, part: int, parts: int, stats: RefreshStats) -> None:
    """Record this part as done; the part that completes the run publishes it."""
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO similarity_parts (run_key, part, parts, plan_id) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (run_key, part) DO UPDATE SET parts = EXCLUDED.parts, plan_id = EXCLUDED.plan_id, "
            "finished_at = now()",
            (run_key, part, parts, plan.plan_id),
        )
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
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
        if read_state(db_url).get("plan_id") == plan.plan_id:
            log.info("plan %s is already published", plan.plan_id)
            return
        stats.rows_written, stats.rows = publish(cur, plan, run_key)
        stats.published = True


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
    plan = make_plan(settings.db_url, version, n, full=full, parts=shard.count)
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
    )
    log.info(
        "refresh plan %s: %s (%s); %d models, %d new, %d changed, %d removed, %d lists to recompute",
        plan.plan_id, plan.mode, plan.reason, len(plan.uids), stats.new, stats.changed, stats.removed,
        len(plan.recompute) if plan.mode != "none" else 0,
    )  # fmt: skip
    if plan.mode == "none":
        stats.skipped_unchanged = True
        stats.rows = read_state(settings.db_url).get("rows", 0)
        return stats
    progress = Progress("refresh", total=len(plan.uids) // shard.count, unit="lists", log=log)
    if plan.mode == "full":
        lists = compute_full(plan, shard, settings.refresh_tile, progress)
    else:
        lists = compute_incremental(plan, shard, settings.refresh_tile, settings.db_url, progress)
    stats.recomputed = int(np.isin(lists.rows, plan.recompute).sum())
    stats.updated = len(lists.rows) - stats.recomputed
    write_staging(settings.db_url, plan, shard.index, lists)
    finish_part(settings.db_url, plan, run_key, shard.index, shard.count, stats)
    progress.finish(
        f"{plan.mode}: {len(lists.rows)} lists computed ({stats.recomputed} from scratch, {stats.updated} "
        f"updated)"
        + (f"; published, {stats.rows_written} rows written, {stats.rows} rows" if stats.published else "")
    )
    return stats
