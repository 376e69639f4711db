"""Mapped tasks select their shard in SQL: the predicate agrees with Shard.contains, and each shard's
planning query reads only its own rows (EXPLAIN ANALYZE on the embedded Postgres)."""

from __future__ import annotations

import json

import pytest
from helpers import execute, query
from sketchfab_similarity.core.sharding import WHOLE, Shard
from sketchfab_similarity.features.extract import pending_query
from sketchfab_similarity.thumbnails.plan import plan_query
from test_sharding import COUNTS, UIDS

pytestmark = pytest.mark.integration

MODELS = 4000
INDEX_SCANS = {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}


def test_sql_predicate_selects_exactly_what_contains_accepts(fresh_db):
    execute(fresh_db, "CREATE TABLE shard_uids (uid text PRIMARY KEY)")
    execute(fresh_db, "INSERT INTO shard_uids SELECT unnest(%s::text[])", (UIDS,))
    for count in COUNTS:
        for shard in Shard.all(count):
            sql = f"SELECT uid FROM shard_uids WHERE {shard.sql_predicate('uid')}"  # noqa: S608
            selected = {r[0] for r in query(fresh_db, sql)}
            assert selected == {u for u in UIDS if shard.contains(u)}, shard


def fill(db_url: str) -> None:
    """MODELS models with API records of a realistic size (about 2 kB, like Sketchfab's), half with
    a stored thumbnail, a quarter of those with a vector."""
    execute(
        db_url,
        """
        INSERT INTO sketchfab_models (uid, name, published_at, thumbnails, raw)
        SELECT md5(i::text), 'model ' || i, now() - i * interval '1 minute',
               jsonb_build_array(jsonb_build_object('url', 'http://localhost/' || i || '.jpg',
                                                    'width', 256, 'height', 256)),
               jsonb_build_object('padding', (SELECT string_agg(md5((i * 100 + j)::text), '')
                                              FROM generate_series(1, 60) j))
        FROM generate_series(1, %s) i
        """,
        (MODELS,),
    )
    execute(
        db_url,
        "INSERT INTO model_thumbnails (uid, source_url, status, content_hash, stored_path) "
        "SELECT uid, 'http://localhost/x.jpg', 'ok', md5(uid), 'ab/' || md5(uid) || '.jpg' "
        "FROM sketchfab_models WHERE uid < '8'",
    )
    execute(
        db_url,
        "INSERT INTO model_embeddings (uid, embedding, feature_version, content_hash) "
        "SELECT uid, array_fill(0.04::real, ARRAY[512])::vector, 'v1', content_hash "
        "FROM model_thumbnails WHERE uid < '2'",
    )
    execute(db_url, "ANALYZE sketchfab_models, model_thumbnails, model_embeddings")


def scans(db_url: str, sql: str, params: dict | None = None, setup: str = "") -> dict[str, dict]:
    """Per table: the rows its scans read (returned plus filtered out) and the scan node types."""
    rows = query(db_url, f"{setup}EXPLAIN (ANALYZE, FORMAT JSON) {sql}", params or {})
    found: dict[str, dict] = {}

    def walk(node: dict) -> None:
        if "Relation Name" in node:
            read = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
            read += node.get("Rows Removed by Index Recheck", 0)
            entry = found.setdefault(node["Relation Name"], {"read": 0, "returned": 0, "nodes": []})
            entry["read"] += read * node["Actual Loops"]
            entry["returned"] += node["Actual Rows"] * node["Actual Loops"]
            # A bitmap heap scan's index condition is on its bitmap index scan.
            index = [node] + [c for c in node.get("Plans", []) if c["Node Type"] == "Bitmap Index Scan"]
            cond = " ".join(
                f"{n.get('Index Name')}: {n.get('Index Cond')}" for n in index if n.get("Index Cond")
            )
            entry["nodes"].append((node["Node Type"], cond))
        for child in node.get("Plans", []):
            walk(child)

    plan = rows[0][0] if not isinstance(rows[0][0], str) else json.loads(rows[0][0])
    walk(plan[0]["Plan"])
    return found


def uids_of(db_url: str, table: str) -> list[str]:
    return [r[0] for r in query(db_url, f"SELECT uid FROM {table}")]  # noqa: S608


def test_each_download_shard_reads_only_its_own_listed_models(fresh_db):
    """Download planning starts from `thumbnails_due`; each shard probes the models table for its
    own listed models only, by primary key, and never reads the rest of the catalogue."""
    fill(fresh_db)  # the insert trigger lists every model
    execute(fresh_db, "DELETE FROM thumbnails_due WHERE right(uid, 1) <> '0'")  # the rest were settled
    execute(fresh_db, "ANALYZE thumbnails_due")
    listed = uids_of(fresh_db, "thumbnails_due")
    assert 0 < len(listed) < MODELS / 10
    # The whole list may be joined by hashing on a table this small; test_download.py checks the
    # probes on a larger one, and the scale benchmark prints the plan at 1M.
    assert sorted(r[0] for r in query(fresh_db, plan_query(WHOLE))) == sorted(listed)
    read = 0
    for shard in Shard.all(16):
        seen = scans(fresh_db, plan_query(shard))["sketchfab_models"]
        own = sum(shard.contains(u) for u in listed)
        assert seen["read"] == seen["returned"] == own, (shard, seen)
        assert all(node in INDEX_SCANS and "uid" in cond for node, cond in seen["nodes"]), seen["nodes"]
        read += seen["read"]
    assert read == len(listed)  # 16 shards together probe each listed model once


def test_each_extraction_shard_selects_its_rows_by_index(fresh_db):
    """The thumbnails table is narrow, so the planner may prefer reading its pages in order; with
    sequential scans priced out, the shard range is an index condition on both tables."""
    fill(fresh_db)
    thumbs = uids_of(fresh_db, "model_thumbnails")
    params = {"force": False, "version": "v1"}
    assert len(query(fresh_db, pending_query(WHOLE), params)) == len(thumbs) - len(
        uids_of(fresh_db, "model_embeddings")
    )
    for shard in Shard.all(8):
        own = sum(shard.contains(u) for u in thumbs)
        natural = scans(fresh_db, pending_query(shard), params)["model_thumbnails"]
        assert natural["returned"] == own  # rows of other shards never leave the server
        indexed = scans(fresh_db, pending_query(shard), params, setup="SET enable_seqscan = off; ")
        assert indexed["model_thumbnails"]["read"] == own, indexed
        for table in ("model_thumbnails", "model_embeddings"):
            assert any("uid" in cond and "'" in cond for _, cond in indexed[table]["nodes"]), indexed[table][
                "nodes"
            ]
