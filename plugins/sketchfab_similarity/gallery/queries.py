"""What the gallery reads: models, recommendations (through `similar_models()`, the SQL users run)
and run overviews. Read-only; every query goes through `_query`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.engine import make_url

from ..core.db import connect
from ..core.runs import STAGES
from ..core.settings import Settings
from ..core.uids import is_uid

SEARCH_LIMIT = 48
MAX_QUERY_CHARS = 200
DEFAULT_K = 10


class NoData(Exception):
    """The database has no pipeline tables yet (no run has finished)."""


class Unavailable(Exception):
    """The similarity database cannot be reached or is not configured."""


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


@dataclass(frozen=True)
class Recommendation:
    rank: int
    uid: str
    name: str
    score: float
    thumbnail_url: str | None
    viewer_url: str | None


@dataclass(frozen=True)
class ModelCard:
    uid: str
    name: str
    author: str | None
    published_at: datetime | None
    like_count: int
    viewer_url: str | None
    stored_path: str | None
    """Key of the stored thumbnail in the thumbnail store, if it was fetched successfully."""


@dataclass(frozen=True)
class Overview:
    totals: dict[str, Any]
    latest_run: dict[str, Any] | None = None
    stages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def reader_url(settings: Settings) -> str:
    """The database URL the gallery reads through: its read-only role and a statement timeout,
    set for each connection by libpq's `options` (so no query can forget them)."""
    url = make_url(settings.db_url)
    options = [url.query.get("options", "")] if url.query.get("options") else []
    options.append(f"-c statement_timeout={max(1, int(settings.gallery_statement_timeout_s * 1000))}")
    if settings.gallery_db_role:
        options.append(f"-c role={settings.gallery_db_role}")
    return url.update_query_dict({"options": " ".join(options)}).render_as_string(hide_password=False)


def _query(db_url: str, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple]:
    import psycopg2.errors
    import sqlalchemy.exc

    try:
        with connect(db_url) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    except psycopg2.errors.QueryCanceled:
        raise Unavailable("the query took longer than the gallery's statement timeout") from None
    except (psycopg2.errors.UndefinedTable, psycopg2.errors.UndefinedFunction) as exc:
        raise NoData(first_line(exc)) from None
    except (psycopg2.OperationalError, sqlalchemy.exc.OperationalError) as exc:
        if "role" in str(exc) and "does not exist" in str(exc):  # the migrations create it: none ran yet
            raise NoData(first_line(exc)) from None
        raise Unavailable(first_line(exc)) from None


def get_model(db_url: str, uid: str) -> ModelCard | None:
    rows = _query(
        db_url,
        """
        SELECT m.uid, m.name, m.author, m.published_at, m.like_count, m.viewer_url, t.stored_path
        FROM sketchfab_models m LEFT JOIN model_thumbnails t ON t.uid = m.uid AND t.status = 'ok'
        WHERE m.uid = %s
        """,
        (uid,),
    )
    return ModelCard(*rows[0]) if rows else None


def search_models(db_url: str, text: str, limit: int = SEARCH_LIMIT) -> list[ModelCard]:
    """A uid finds its model; anything else matches names (case-insensitive substring), best first."""
    text = text.strip()[:MAX_QUERY_CHARS]
    if not text:
        return []
    if is_uid(text.lower()):
        card = get_model(db_url, text.lower())
        return [card] if card else []
    like = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    rows = _query(
        db_url,
        """
        SELECT m.uid, m.name, m.author, m.published_at, m.like_count, m.viewer_url, t.stored_path
        FROM sketchfab_models m LEFT JOIN model_thumbnails t ON t.uid = m.uid AND t.status = 'ok'
        WHERE m.name ILIKE %(contains)s AND m.deleted_at IS NULL
        ORDER BY lower(m.name) = lower(%(text)s) DESC, m.name ILIKE %(prefix)s DESC, m.published_at DESC, m.uid
        LIMIT %(limit)s
        """,
        {"contains": f"%{like}%", "prefix": f"{like}%", "text": text, "limit": limit},
    )
    return [ModelCard(*row) for row in rows]


def recent_models(db_url: str, limit: int) -> list[ModelCard]:
    """The newest models that have recommendations: what a first visit shows."""
    rows = _query(
        db_url,
        """
        SELECT m.uid, m.name, m.author, m.published_at, m.like_count, m.viewer_url, t.stored_path
        FROM sketchfab_models m LEFT JOIN model_thumbnails t ON t.uid = m.uid AND t.status = 'ok'
        WHERE EXISTS (SELECT 1 FROM model_similarity s WHERE s.uid = m.uid)
        ORDER BY m.published_at DESC, m.uid
        LIMIT %s
        """,
        (limit,),
    )
    return [ModelCard(*row) for row in rows]


def similar_models(db_url: str, uid: str, k: int = DEFAULT_K) -> list[Recommendation]:
    rows = _query(
        db_url,
        "SELECT rank, uid, name, score, thumbnail_url, viewer_url FROM similar_models(%s, %s)",
        (uid, k),
    )
    return [Recommendation(*row) for row in rows]


def stored_paths(db_url: str, uids: list[str]) -> dict[str, str]:
    rows = _query(
        db_url, "SELECT uid, stored_path FROM model_thumbnails WHERE uid = ANY(%s) AND status = 'ok'", (uids,)
    )
    return dict(rows)


def overview(db_url: str) -> Overview:
    """Table totals (the `pipeline_overview` view) and the latest run's counts (`pipeline_runs`)."""
    rows = _query(db_url, "SELECT row_to_json(o) FROM pipeline_overview o")
    totals = rows[0][0]
    runs = _query(
        db_url,
        """
        SELECT row_to_json(r) FROM (
            SELECT dag_id, run_id, run_type, feature_version, counts,
                   to_char(data_interval_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI "UTC"') AS data_interval_start,
                   to_char(data_interval_end AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI "UTC"') AS data_interval_end,
                   to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"') AS finished_at
            FROM pipeline_runs ORDER BY pipeline_runs.finished_at DESC LIMIT 1
        ) r
        """,
    )
    latest = runs[0][0] if runs else None
    counts = (latest or {}).get("counts", {})
    order = {stage: i for i, stage in enumerate(STAGES)}
    stages = sorted(counts.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))
    return Overview(totals=totals, latest_run=latest, stages=stages)


@dataclass(frozen=True)
class QualityRow:
    """One `similarity_quality` row's headline figures (the history table and chart)."""

    feature_version: str
    run_id: str
    evaluated_at: str
    models: int
    precision_at_10: float | None
    random_precision_at_10: float | None
    colour_precision_at_10: float | None
    coverage: float
    hubness_skewness: float
    hubness_gini: float
    near_duplicate_pairs: int


def quality_history(db_url: str, limit: int = 50) -> list[QualityRow]:
    """The latest evaluations, oldest first (so charts read left to right)."""
    rows = _query(
        db_url,
        """
        SELECT feature_version, run_id, to_char(evaluated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI "UTC"'),
               models, precision_at_10, random_precision_at_10, colour_precision_at_10, coverage,
               hubness_skewness, hubness_gini, near_duplicate_pairs
        FROM (SELECT * FROM similarity_quality ORDER BY evaluated_at DESC, run_id DESC LIMIT %s) latest
        ORDER BY evaluated_at, run_id
        """,
        (limit,),
    )
    return [QualityRow(*row) for row in rows]


def latest_quality(db_url: str) -> dict[str, Any] | None:
    """Every metric of the latest evaluation (the row's `metrics` JSON), or None before the first one."""
    rows = _query(
        db_url,
        "SELECT metrics, run_id FROM similarity_quality ORDER BY evaluated_at DESC, run_id DESC LIMIT 1",
    )
    return {**rows[0][0], "run_id": rows[0][1]} if rows else None


def model_names(db_url: str, uids: list[str]) -> dict[str, str]:
    return dict(_query(db_url, "SELECT uid, name FROM sketchfab_models WHERE uid = ANY(%s)", (uids,)))
