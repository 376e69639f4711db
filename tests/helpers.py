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


def add_catalogue(db_url: str, count: int) -> None:
    """`count` bare models (uids 1..count in hex), each with a permanently failed thumbnail row:
    tables big enough for the planner to choose index probes, made in two statements."""
    execute(
        db_url,
        "INSERT INTO sketchfab_models (uid, name, published_at, raw, viewer_url) "
        "SELECT lpad(to_hex(i), 32, '0'), 'm', now(), '{}', 'v' FROM generate_series(1, %s) i",
        (count,),
    )
    execute(
        db_url,
        "INSERT INTO model_thumbnails (uid, source_url, status, error) "
        "SELECT uid, 'https://media.example/' || uid, 'failed', '[permanent] x' FROM sketchfab_models",
    )


def stored_embeddings(db_url: str) -> tuple[list[str], np.ndarray]:
    """Parse pgvector's text output ourselves rather than trusting the pipeline's reader."""
    rows = query(db_url, "SELECT uid, embedding::text FROM model_embeddings ORDER BY uid")
    uids = [r[0] for r in rows]
    matrix = np.array([[float(x) for x in r[1].strip("[]").split(",")] for r in rows], dtype=np.float64)
    return uids, matrix


def cosine_matrix(matrix: np.ndarray) -> np.ndarray:
    normed = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return normed @ normed.T


TIE = 1e-12
"""Scores this close are the same score: float64 sums of identical vectors can still differ in the last bit."""


def brute_force_top_n(uids: list[str], matrix: np.ndarray, n: int) -> dict[str, list[tuple[str, float]]]:
    """Full float64 cosine matrix, sorted by (-score, uid) in plain Python (equal scores: by uid)."""
    sims = cosine_matrix(matrix)
    out = {}
    for i, uid in enumerate(uids):
        others = sorted(
            (-round(sims[i, j] / TIE) * TIE, uids[j], sims[i, j]) for j in range(len(uids)) if j != i
        )
        out[uid] = [(u, s) for _, u, s in others[:n]]
    return out


def assert_similarity_is_exact(db_url: str, n: int, tol: float = 1e-5) -> int:
    """model_similarity equals the brute-force top-n: every (rank, uid, score), ties by uid.

    Each row is checked on its own: the stored score is the true cosine of that pair (float64,
    computed here), the score at each rank is the brute force's, no uid repeats or names the
    model itself, and a uid other than the brute force's at a rank is accepted only when the two
    are within float32 rounding of each other (not exactly equal: exact ties go by uid).
    """
    uids, matrix = stored_embeddings(db_url)
    index = {u: i for i, u in enumerate(uids)}
    sims = cosine_matrix(matrix)
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
        assert len({g for g, _ in got}) == len(got), f"{uid}: a neighbour is listed twice: {got}"
        for rank, ((g_uid, g_score), (e_uid, e_score)) in enumerate(zip(got, exp, strict=True), start=1):
            assert g_uid != uid and g_uid in index, f"{uid} rank {rank}: {g_uid} is not another model"
            true = sims[index[uid], index[g_uid]]
            assert abs(g_score - true) < tol, (
                f"{uid} rank {rank}: {g_uid} scored {g_score}, its cosine is {true}"
            )
            assert abs(g_score - e_score) < tol, f"{uid} rank {rank}: score {g_score} != {e_score}"
            if g_uid != e_uid:
                gap = abs(true - e_score)
                assert TIE < gap < tol, (
                    f"{uid} rank {rank}: {g_uid} ({true}) where the brute force has {e_uid} ({e_score})"
                    + (": an exact tie goes to the smaller uid" if gap <= TIE else "")
                )
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


def model_jpeg(model) -> bytes:
    """A catalogue model's own picture as a 256x144 JPEG (to serve it for other models: duplicates)."""
    import io

    from fake_sketchfab.render import render_thumbnail

    buf = io.BytesIO()
    render_thumbnail(model.shape_class, model.params_seed, 256, 144).save(buf, "JPEG", quality=90)
    return buf.getvalue()
