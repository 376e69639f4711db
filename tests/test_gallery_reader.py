"""The gallery's connection: a read-only role, a statement timeout, and an index for name search."""

from __future__ import annotations

import psycopg2
import pytest
from helpers import query
from sketchfab_similarity.core.db import connect
from sketchfab_similarity.gallery.queries import Unavailable, _query, reader_url, search_models

pytestmark = pytest.mark.integration


def test_the_gallery_reads_through_a_read_only_role_under_a_statement_timeout(make_settings):
    settings = make_settings()
    url = reader_url(settings)
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user, current_setting('statement_timeout')")
        assert cur.fetchone() == ("similarity_gallery_reader", "5s")
    assert _query(url, "SELECT count(*) FROM similar_models('0123456789abcdef0123456789abcdef')") == [(0,)]
    assert _query(url, "SELECT models FROM pipeline_overview") == [(0,)]
    assert search_models(url, "lamp") == []
    for statement in (
        "INSERT INTO pipeline_runs (dag_id, run_id, run_type, counts) VALUES ('d', 'r', 'manual', '{}')",
        "DELETE FROM model_similarity",
        "UPDATE sketchfab_models SET name = 'x'",
        "DROP TABLE model_similarity",
    ):
        with pytest.raises(psycopg2.errors.InsufficientPrivilege), connect(url) as conn, conn.cursor() as cur:
            cur.execute(statement)
    slow = reader_url(settings.with_overrides(gallery_statement_timeout_s=0.05))
    with pytest.raises(Unavailable, match="statement timeout"):
        _query(slow, "SELECT pg_sleep(5)")
    own = reader_url(settings.with_overrides(gallery_db_role=""))
    assert _query(own, "SELECT current_user = session_user") == [(True,)]


def test_name_search_has_a_trigram_index_where_pg_trgm_exists(make_settings):
    settings = make_settings()
    available = query(settings.db_url, "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_trgm'")[
        0
    ][0]
    indexes = query(
        settings.db_url, "SELECT indexdef FROM pg_indexes WHERE indexname = 'sketchfab_models_name_trgm_idx'"
    )
    if available:
        assert len(indexes) == 1 and "gin_trgm_ops" in indexes[0][0]
    else:  # the embedded server lacks contrib: the migration applied and says so
        assert indexes == []
