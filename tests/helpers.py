"""Independent checks used by several tests (deliberately not sharing code with the pipeline)."""

from __future__ import annotations

import numpy as np
import psycopg2
from sqlalchemy.engine import make_url


def query(db_url: str, sql: str, params: tuple = ()) -> list[tuple]:
    url = make_url(db_url)
    conn = psycopg2.connect(dbname=url.database, user=url.username, host=url.query["host"])
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def execute(db_url: str, sql: str, params: tuple = ()) -> None:
    """Run one statement and commit it (`query` only reads)."""
    url = make_url(db_url)
    conn = psycopg2.connect(dbname=url.database, user=url.username, host=url.query["host"])
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params)
    finally:
        conn.close()


def stored_embeddings(db_url: str) -> tuple[list[str], np.ndarray]:
    """Parse pgvector's text output ourselves rather than trusting the pipeline's reader."""
    rows = query(db_url, "SELECT uid, embedding::text FROM model_embeddings ORDER BY uid")
    uids = [r[0] for r in rows]
    matrix = np.array([[float(x) for x in r[1].strip("[]").split(",")] for r in rows], dtype=np.float64)
    return uids, matrix


def brute_force_top_n(uids: list[str], matrix: np.ndarray, n: int) -> dict[str, list[tuple[str, float]]]:
    """Full float64 cosine matrix, sorted by (-score, uid) in plain Python."""
    normed = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    sims = normed @ normed.T
    out = {}
    for i, uid in enumerate(uids):
        others = sorted((-sims[i, j], uids[j]) for j in range(len(uids)) if j != i)
        out[uid] = [(u, -s) for s, u in others[:n]]
    return out


def assert_similarity_is_exact(db_url: str, n: int, tol: float = 1e-5) -> int:
    """model_similarity equals the brute-force top-n, up to float32 rounding among near-ties."""
    uids, matrix = stored_embeddings(db_url)
    expected = brute_force_top_n(uids, matrix, n)
    rows = query(db_url, "SELECT uid, rank, similar_uid, score FROM model_similarity ORDER BY uid, rank")
    actual: dict[str, list[tuple[str, float]]] = {}
    for uid, rank, similar_uid, score in rows:
        actual.setdefault(uid, []).append((similar_uid, score))
        assert rank == len(actual[uid]), f"ranks of {uid} are not 1..k"
    assert set(actual) == set(expected), "model_similarity does not cover exactly the models with vectors"
    for uid, exp in expected.items():
        got = actual[uid]
        assert len(got) == len(exp), f"{uid}: {len(got)} neighbours, expected {len(exp)}"
        for (g_uid, g_score), (e_uid, e_score) in zip(got, exp, strict=True):
            assert abs(g_score - e_score) < tol, f"{uid}: score {g_score} != {e_score}"
            if g_uid != e_uid:  # only acceptable between (near-)equal scores
                e_map = dict(exp)
                assert g_uid in e_map or abs(g_score - exp[-1][1]) < tol, f"{uid}: {g_uid} is not a top-{n}"
    return len(rows)


def snapshot(db_url: str) -> dict[str, list[tuple]]:
    """Everything the pipeline derives from the catalog (timestamps of our own bookkeeping excluded)."""
    return {
        "models": query(
            db_url,
            "SELECT uid, name, author, published_at, like_count, tags, categories, viewer_url, raw::text "
            "FROM sketchfab_models ORDER BY uid",
        ),
        "rejects": query(db_url, "SELECT raw::text, reason FROM crawl_rejects ORDER BY 1, 2"),
        "thumbnails": query(
            db_url,
            "SELECT uid, source_url, status, content_hash, stored_path, width, height, error, attempts "
            "FROM model_thumbnails ORDER BY uid",
        ),
        "vectors": query(
            db_url,
            "SELECT uid, embedding::text, feature_version, content_hash FROM model_embeddings ORDER BY uid",
        ),
        "similarity": query(db_url, "SELECT * FROM model_similarity ORDER BY uid, rank"),
    }
