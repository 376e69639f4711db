"""Refresh planning: what changed since the published table, read from `model_embeddings` and the
bookkeeping (`similarity_members`, `pipeline_state`); every part of a run computes the same plan."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..core.db import connect, state_value
from ..core.featurespec import EMBEDDING_DIM
from ..core.pgcopy import copy_out_rows, read_embeddings

STATE_KEY = "similarity"
INCREMENTAL_LIMIT = 0.25
"""Above this share of lists to recompute, a full rebuild (which uses symmetry) is cheaper."""


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
    base_plan_id: str | None = None
    """The published plan this one was computed against: publish refuses to apply it on top of another."""


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
        return state_value(cur, STATE_KEY)


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
        base_plan_id=state.get("plan_id"),
    )
