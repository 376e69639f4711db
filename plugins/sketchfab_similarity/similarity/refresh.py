"""Stage 5, refresh_similarity: the exact top-N table, kept up to date incrementally.

A refresh first makes a plan by comparing `model_embeddings` (current feature version)
with `similarity_members`, the record of which vector every published list was computed
from:

- **nothing changed**: done;
- **incremental**: lists of new and changed models, and of models whose list contains a
  changed or removed model, are computed from scratch against all models; every other
  list only takes in the new models that beat its current last entry. The work grows
  with (changed lists) x (all models), not with the square of the table;
- **full**: when the feature version or N changes, when asked, when the incremental
  work would cost more than a rebuild, or when a list read back does not match the
  bookkeeping (a hand-edited table).

Scores come from `topn` (blocked matrix products, partial sorting, float64 rescoring), so
every score is a pure function of the two vectors and an incremental refresh produces
exactly the table a full rebuild would.

Computed lists (only their changed entries, for lists updated in place) go to the staging
tables; the last part to finish publishes them into `model_similarity` in one transaction
that updates, inserts and deletes only rows that differ. Readers keep their MVCC snapshot,
so they see the old table or the new one, never a mix, and never wait for a lock (a table
swap would need an exclusive lock; see bench/bench_publish.py). A refresh can be split into
parts (`refresh_parts`) that run as parallel mapped Airflow tasks on several workers, each
computing the lists of its shard of uids.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..core.db import connect
from ..core.featurespec import EMBEDDING_DIM, FeatureSpec
from ..core.pgcopy import copy_out_rows, copy_rows, read_embeddings
from ..core.progress import Progress, lap
from ..core.settings import Settings
from ..core.sharding import WHOLE, Shard
from . import duplicates, topn, topn_keras

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
    seconds: dict[str, float] = field(default_factory=dict)
    """Time per phase: plan (read vectors and bookkeeping), compute, stage, publish."""


@dataclass
class Plan:
    """What a refresh has to do; every part of a run computes the same plan from the database."""

    version: str
    n: int
    mode: str
    reason: str
    uids: np.ndarray
    uid_bytes: np.ndarray
    """The same uids as 'S32' (4x smaller to search than unicode)."""
    matrix: np.ndarray
    hashes: np.ndarray
    new: np.ndarray
    recompute: np.ndarray
    gone: list[str]
    changed: int
    list_length: np.ndarray
    """Per uid: length of its published list, -1 if it has none."""
    last_score: np.ndarray
    """Per uid: score of the last entry of its published list (NaN if none)."""
    last_index: np.ndarray
    """Per uid: index of the last entry of its published list (-1 if none)."""
    plan_id: str


@dataclass
class Lists:
    """Computed top-N lists: row `i` is the list of model `rows[i]` (indices into the plan's uids)."""

    rows: np.ndarray
    indices: np.ndarray
    scores: np.ndarray
    changed: np.ndarray | None = None
    """Which entries differ from the published lists (None: unknown, stage them all)."""


class BookkeepingMismatch(RuntimeError):
    """A published list does not match similarity_members (edited by hand?): rebuild everything."""


_HASH_WEIGHTS = np.random.default_rng(0x5F1A).integers(
    1, 2**63, EMBEDDING_DIM // 2, dtype=np.uint64
) | np.uint64(1)


def vector_hashes(matrix: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint of each vector's float32 bits: the 64-bit words times fixed odd
    weights, summed mod 2**64. Flipping any bits of one word always changes it."""
    words = np.ascontiguousarray(matrix, dtype=np.float32).reshape(len(matrix), EMBEDDING_DIM).view(np.uint64)
    return (words @ _HASH_WEIGHTS).view(np.int64)


def read_state(db_url: str) -> dict:
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT value FROM pipeline_state WHERE name = %s", (STATE_KEY,))
        row = cur.fetchone()
    return row[0] if row else {}


MEMBER_ROW = np.dtype(
    [("fields", ">i2"), ("ulen", ">i4"), ("uid", "S32"), ("hlen", ">i4"), ("hash", ">i8"), ("llen", ">i4"),
     ("length", ">i4"), ("slen", ">i4"), ("last_score", ">f4"), ("lulen", ">i4"), ("last_uid", "S32")]
)  # fmt: skip


def read_members(db_url: str) -> np.ndarray:
    """similarity_members sorted by uid, as a numpy record array (binary COPY, fixed-width rows;
    an empty list has last_score NaN and a blank last_uid)."""
    with connect(db_url) as conn, conn.cursor() as cur:
        rows = copy_out_rows(
            cur,
            "COPY (SELECT uid, vector_hash, list_length, coalesce(last_score, 'NaN'), "
            "coalesce(last_uid, repeat(' ', 32)) FROM similarity_members ORDER BY uid) TO STDOUT (FORMAT binary)",
            MEMBER_ROW,
        )
    if rows is None or not (np.all(rows["ulen"] == 32) and np.all(rows["lulen"] == 32)):
        raise BookkeepingMismatch("similarity_members holds a uid that is not 32 characters long")
    return rows


def lists_containing(db_url: str, uids: list[str]) -> set[str]:
    if not uids:
        return set()
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT DISTINCT uid FROM model_similarity WHERE similar_uid = ANY(%s)", (uids,))
        return {r[0] for r in cur.fetchall()}


def read_bookkeeping(db_url: str) -> tuple[dict, np.ndarray, str]:
    """(state, members, why to rebuild): members that cannot be read count as none and force a
    full rebuild, whose publish rewrites them."""
    state = read_state(db_url)
    try:
        return state, read_members(db_url), ""
    except BookkeepingMismatch as exc:
        return state, np.zeros(0, MEMBER_ROW), str(exc)


def make_plan(
    db_url: str, version: str, n: int, full: bool = False, parts: int = 1, reason: str = ""
) -> Plan:
    with ThreadPoolExecutor(1) as pool:  # the server reads the bookkeeping while we read the vectors
        bookkeeping = pool.submit(read_bookkeeping, db_url)
        uids, matrix = read_embeddings(db_url, version)
        hashes = vector_hashes(matrix)
        state, members, damaged = bookkeeping.result()
    total = len(uids)
    everything = np.arange(total)
    reason = reason or damaged or (
        "full refresh requested" if full
        else "no published table yet" if not state.get("plan_id")
        else f"feature version changed from {state.get('feature_version')}" if state.get("feature_version") != version
        else f"N changed from {state.get('top_n')} to {n}" if state.get("top_n") != n
        else ""
    )  # fmt: skip
    uid_bytes = uids.astype("S32")  # compared as bytes: 4x less to move than unicode
    member_uids = members["uid"]
    at = np.searchsorted(member_uids, uid_bytes).clip(0, max(len(members) - 1, 0))
    listed = np.zeros(total, bool) if not len(members) else member_uids[at] == uid_bytes
    same = listed & (members["hash"][at] == hashes) if len(members) else listed
    new = np.flatnonzero(~same)
    changed = int((listed & ~same).sum())
    gone = [u.decode() for u in member_uids[~np.isin(member_uids, uid_bytes)].tolist()]
    recompute = everything
    if not reason:
        replaced = gone + uids[listed & ~same].tolist()
        invalid = np.searchsorted(uids, sorted(set(lists_containing(db_url, replaced)) & set(uids.tolist())))
        recompute = np.union1d(new, invalid.astype(np.int64))
        if len(recompute) > INCREMENTAL_LIMIT * total:
            reason = f"{len(recompute)} of {total} lists to recompute: a full rebuild is cheaper"
            recompute = everything
    mode = "full" if reason else "incremental" if len(new) or gone else "none"
    digest = hashlib.sha256(f"{version}|{n}|{mode}|{parts}|".encode())
    for part in (members.tobytes(), uid_bytes.tobytes(), hashes.tobytes()):
        digest.update(part)
    last_uid = members["last_uid"][at] if len(members) else np.zeros(total, "S32")
    last_index = np.searchsorted(uid_bytes, last_uid).clip(0, max(total - 1, 0))
    has_last = listed & (uid_bytes[last_index] == last_uid) if total else listed
    return Plan(
        version=version,
        n=n,
        mode=mode,
        reason=reason or ("nothing changed" if mode == "none" else "new, changed or removed vectors"),
        uids=uids,
        uid_bytes=uid_bytes,
        matrix=matrix,
        hashes=hashes,
        new=new if mode != "full" else everything,
        recompute=recompute,
        gone=gone,
        changed=changed,
        list_length=np.where(listed, members["length"][at] if len(members) else -1, -1).astype(np.int64),
        last_score=np.where(listed, members["last_score"][at] if len(members) else np.nan, np.nan).astype(
            np.float32
        ),
        last_index=np.where(has_last, last_index, -1).astype(np.int64),
        plan_id=digest.hexdigest()[:16],
    )


def shard_rows(plan: Plan, shard: Shard) -> np.ndarray:
    """Mask of the uids whose lists this part computes."""
    if shard.count == 1:
        return np.ones(len(plan.uids), dtype=bool)
    return np.array([shard.contains(u) for u in plan.uids.tolist()], dtype=bool)


def compute_full(plan: Plan, shard: Shard, tile: int, engine: str, progress: Progress) -> Lists:
    """Every list of this shard: the symmetric numpy search for the whole table, query blocks
    for a shard, or candidates from the Keras device (each gives the same lists)."""
    groups = duplicates.group_rows(plan.matrix, plan.hashes)  # identical vectors searched once
    if shard.count == 1 and engine == "numpy":
        indices, scores = duplicates.top_n_all(plan.matrix, plan.n, tile, progress.advance, groups)
        return Lists(np.arange(len(plan.uids)), indices, scores)
    rows = np.flatnonzero(shard_rows(plan, shard))
    search = topn_keras.top_n_rows if engine == "keras" else topn.top_n_rows
    indices, scores = duplicates.top_n_rows(plan.matrix, rows, plan.n, tile, progress.advance, groups, search)
    return Lists(rows, indices, scores)


LIST_ROW = np.dtype(
    [("fields", ">i2"), ("ulen", ">i4"), ("uid", "S32"), ("rlen", ">i4"), ("rank", ">i4"),
     ("slen", ">i4"), ("similar", "S32"), ("flen", ">i4"), ("score", ">f4")]
)  # fmt: skip


def old_lists(db_url: str, uids: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Rows (uid, rank, similar, score) of the published lists of these models ('S32' uids) whose
    score is at most the list's bound: the part of each list a new entry can move (binary COPY)."""
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SET LOCAL enable_hashjoin = off")  # probe the primary key per list
        rows = copy_out_rows(
            cur,
            cur.mogrify(
                "COPY (SELECT s.uid, s.rank, s.similar_uid, s.score "
                "FROM unnest(%s::text[], %s::real[]) AS t(uid, bound) "
                "JOIN model_similarity s ON s.uid = t.uid AND s.score <= t.bound) TO STDOUT (FORMAT binary)",
                ([u.decode() for u in uids.tolist()], bounds.tolist()),
            ).decode(),
            LIST_ROW,
        )
    if rows is None or not (np.all(rows["ulen"] == 32) and np.all(rows["slen"] == 32)):
        raise BookkeepingMismatch("model_similarity holds a uid that is not 32 characters long")
    return rows


def compute_incremental(plan: Plan, shard: Shard, tile: int, db_url: str, progress: Progress) -> Lists:
    """Lists to recompute from scratch, plus existing lists that new models enter."""
    total = len(plan.uids)
    k = topn.neighbours_k(total, plan.n)
    mine = shard_rows(plan, shard)
    recompute = plan.recompute[mine[plan.recompute]]
    kept = mine.copy()
    kept[plan.recompute] = False
    # A new model enters a kept list when it beats the last entry (score, then uid); a list
    # shorter than k takes every new model. Candidates come from the float32 products, with
    # the margin; `cut` is +inf for lists that are not kept (and for padding).
    full_list = plan.list_length >= k
    bar = np.where(full_list, plan.last_score, -np.inf)
    cut = np.full(topn.padded_length(total) + tile, np.inf, np.float32)
    cut[:total] = np.where(kept, np.where(full_list, bar - topn.SCORE_MARGIN, topn.REAL), np.inf)
    is_new = np.zeros(total, bool)
    is_new[plan.new] = True
    pairs: list[tuple[np.ndarray, np.ndarray]] = []

    def candidates(rows: np.ndarray, column: int, block: np.ndarray) -> None:
        new_rows = np.flatnonzero(is_new[rows])
        if len(new_rows) and kept.any():
            part = block if len(new_rows) == len(rows) else block[new_rows]
            bar_here = cut[column : column + block.shape[1]]
            cols = np.flatnonzero(part.max(axis=0) >= bar_here)  # lists any new model may enter
            a, u = np.nonzero(part[:, cols] >= bar_here[cols])
            pairs.append((column + cols[u], rows[new_rows[a]]))

    groups = duplicates.group_rows(plan.matrix, plan.hashes)
    if groups.duplicated:  # identical vectors searched once; candidate checks of new rows apart
        rec_idx, rec_scores = duplicates.top_n_rows(
            plan.matrix, recompute, plan.n, tile, progress.advance, groups
        )
        others = plan.new
    else:  # new rows of this part are query rows anyway: their products double as candidate checks
        rec_idx, rec_scores = topn.top_n_rows(
            plan.matrix, recompute, plan.n, tile, progress.advance, candidates
        )
        others = plan.new[~np.isin(plan.new, recompute)]
    for start in range(0, len(others), tile):
        rows = others[start : start + tile]
        for column in range(0, total, tile):
            candidates(rows, column, plan.matrix[rows] @ plan.matrix[column : column + tile].T)
    if not pairs:
        return Lists(recompute, rec_idx, rec_scores)
    u = np.concatenate([p[0] for p in pairs])
    a = np.concatenate([p[1] for p in pairs])
    scores = topn.exact_scores(plan.matrix, u, a)
    enters = ~full_list[u] | (scores > bar[u]) | ((scores == bar[u]) & (a < plan.last_index[u]))
    u, a, scores = u[enters], a[enters], scores[enters]
    touched = np.unique(u)
    if not len(touched):
        return Lists(recompute, rec_idx, rec_scores)

    # Entries scoring above everything that enters a list keep their place: read only the rest.
    entering = np.searchsorted(touched, u)
    bounds = np.full(len(touched), -np.inf, np.float32)
    np.maximum.at(bounds, entering, scores)
    old = old_lists(db_url, plan.uid_bytes[touched], bounds)
    old_u = np.searchsorted(touched, np.searchsorted(plan.uid_bytes, old["uid"]))
    old_s = np.searchsorted(plan.uid_bytes, old["similar"])
    old_scores = old["score"].astype(np.float32)
    old_rank = old["rank"].astype(np.int64)
    # What was read must agree with the bookkeeping: each list's tail, ending at its last entry.
    lengths = plan.list_length[touched]
    prefix = lengths - np.bincount(old_u, minlength=len(touched))
    last_rows = old_rank == lengths[old_u]
    if not (
        np.all(prefix >= 0)
        and np.all((old_rank > prefix[old_u]) & (old_rank <= lengths[old_u]))
        and last_rows.sum() == np.count_nonzero((lengths > 0) & (bounds >= plan.last_score[touched]))
        and np.array_equal(old_s[last_rows], plan.last_index[touched][old_u[last_rows]])
        and np.array_equal(old_scores[last_rows], plan.last_score[touched][old_u[last_rows]])
    ):
        raise BookkeepingMismatch("published lists differ from similarity_members")
    # New tails: the entries read plus the entering ones, best first, ties by uid.
    all_u = np.concatenate([old_u, entering])
    all_s = np.concatenate([old_s, a])
    all_scores = np.concatenate([old_scores, scores])
    order = np.lexsort((all_s, -all_scores, all_u))
    all_u, all_s, all_scores = all_u[order], all_s[order], all_scores[order]
    position = prefix[all_u] + np.arange(len(all_u)) - np.searchsorted(all_u, all_u)
    fits = position < k
    merged_s = np.full((len(touched), k), -1, np.int64)
    merged_scores = np.full((len(touched), k), np.nan, np.float32)
    merged_s[all_u[fits], position[fits]] = all_s[fits]
    merged_scores[all_u[fits], position[fits]] = all_scores[fits]
    # Only entries that differ from the published list are written.
    before_s = np.full((len(touched), k), -1, np.int64)
    before_scores = np.full((len(touched), k), np.nan, np.float32)
    before_s[old_u, old_rank - 1] = old_s
    before_scores[old_u, old_rank - 1] = old_scores
    in_tail = np.arange(k) >= prefix[:, None]
    changed = in_tail & ((before_s != merged_s) | (before_scores != merged_scores))
    progress.advance(len(touched))
    return Lists(
        np.concatenate([recompute, touched]),
        np.concatenate([rec_idx, merged_s]),
        np.concatenate([rec_scores, merged_scores]),
        np.concatenate([np.ones(rec_idx.shape, bool), changed]),
    )


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
    cur.execute(
        "INSERT INTO pipeline_state (name, value) VALUES (%s, %s) "
        "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
        (STATE_KEY, json.dumps(state)),
    )
    # Everything staged was computed against the table just replaced: none of it is usable any
    # more. TRUNCATE also returns the space at once (only refresh tasks use these tables).
    cur.execute("TRUNCATE similarity_staging, similarity_staging_lists, similarity_parts")
    return written, int(rows)


def finish_part(db_url: str, plan: Plan, run_key: str, part: int, parts: int, stats: RefreshStats) -> None:
    """Record this part as done; the part that completes the run publishes it."""
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO similarity_parts (run_key, part, parts, plan_id) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (run_key, part) DO UPDATE SET parts = EXCLUDED.parts, plan_id = EXCLUDED.plan_id, "
            "finished_at = now()",
            (run_key, part, parts, plan.plan_id),
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
        cur.execute("SELECT value FROM pipeline_state WHERE name = %s", (STATE_KEY,))
        state = (cur.fetchone() or [{}])[0]
        if state.get("plan_id") == plan.plan_id:
            log.info("plan %s is already published", plan.plan_id)
            return
        shrinks = plan.mode == "full" or topn.neighbours_k(len(plan.uids), plan.n) < state.get("top_n", 0)
        stats.rows_written, stats.rows = publish(cur, plan, shrinks)
        stats.published = True
    if plan.mode == "full":  # fresh statistics for a rewritten table (ANALYZE never blocks readers)
        with connect(db_url) as conn, conn.cursor() as cur:
            cur.execute("ANALYZE model_similarity, similarity_members")


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


def compute(plan: Plan, shard: Shard, settings: Settings, progress: Progress) -> Lists | None:
    if plan.mode == "none":
        return None
    if plan.mode == "full":
        engine = topn_keras.choose_engine(settings.refresh_engine)
        log.info("full rebuild on the %s engine", engine)
        return compute_full(plan, shard, settings.refresh_tile, engine, progress)
    return compute_incremental(plan, shard, settings.refresh_tile, settings.db_url, progress)
