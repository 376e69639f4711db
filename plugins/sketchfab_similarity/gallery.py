"""The similarity gallery: search a model, see it beside its top-N, and how the latest run went.

`create_app()` is a FastAPI app; the Airflow plugin `similarity_gallery_plugin` mounts
it under the API server and links it from the UI's navigation. `make demo` writes the
same cards as a static page (`render_html`). Recommendations come from
`similar_models()`, the SQL users run, so the page shows exactly what they get.

Model names, authors and URLs come from the Sketchfab API and are untrusted: every
string is escaped by the templates, links are kept only for http(s) URLs, and the
pages carry a Content-Security-Policy that allows no scripts at all.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import jinja2
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from .db import connect
from .settings import Settings
from .thumbnails import ThumbnailStore

UID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_QUERY_CHARS = 200
SEARCH_LIMIT = 48
STAGE_ORDER = (
    "crawl_models",
    "download_thumbnails",
    "extract_features",
    "load_vectors",
    "refresh_similarity",
)
DEFAULT_K = 10
MAX_K = 100
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class NoData(Exception):
    """The database has no pipeline tables yet (no run has finished)."""


class Unavailable(Exception):
    """The similarity database cannot be reached or is not configured."""


def _first_line(exc: BaseException) -> str:
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


def _query(db_url: str, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple]:
    import psycopg2.errors
    import sqlalchemy.exc

    try:
        with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    except (psycopg2.errors.UndefinedTable, psycopg2.errors.UndefinedFunction) as exc:
        raise NoData(_first_line(exc)) from None
    except (psycopg2.OperationalError, sqlalchemy.exc.OperationalError) as exc:
        raise Unavailable(_first_line(exc)) from None


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
    if UID_RE.match(text.lower()):
        card = get_model(db_url, text.lower())
        return [card] if card else []
    like = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    rows = _query(
        db_url,
        """
        SELECT m.uid, m.name, m.author, m.published_at, m.like_count, m.viewer_url, t.stored_path
        FROM sketchfab_models m LEFT JOIN model_thumbnails t ON t.uid = m.uid AND t.status = 'ok'
        WHERE m.name ILIKE %(contains)s
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
    order = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    stages = sorted(counts.items(), key=lambda item: (order.get(item[0], len(order)), item[0]))
    return Overview(totals=totals, latest_run=latest, stages=stages)


def safe_link(url: str | None) -> str | None:
    """Only http(s) URLs become links: a `javascript:` URL from the API must never be clickable."""
    if not url:
        return None
    parts = urlsplit(url)
    return url if parts.scheme in ("http", "https") and parts.netloc else None


def image_type(data: bytes) -> str | None:
    """Content type from the file's magic bytes; stored thumbnails were validated as images."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


CSS = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1f2328; }
header { background: #1caad9; color: #fff; padding: .75rem 1.5rem; display: flex; gap: 1.5rem;
         align-items: center; flex-wrap: wrap; }
header a { color: #fff; text-decoration: none; font-weight: 600; font-size: 1.1rem; }
header form { display: flex; gap: .5rem; flex: 1; max-width: 36rem; }
header input { flex: 1; padding: .4rem .6rem; border: 0; border-radius: 4px; font-size: 1rem; }
header button { padding: .4rem .9rem; border: 0; border-radius: 4px; background: #0b5e7a; color: #fff; }
main { padding: 1rem 1.5rem; }
h1 { font-size: 1.3rem; margin: .5rem 0 1rem; overflow-wrap: anywhere; }
h2 { font-size: 1.05rem; margin: 1.5rem 0 .75rem; }
.stats { display: flex; flex-wrap: wrap; gap: .75rem; }
.stat { background: #fff; border-radius: 6px; padding: .6rem .9rem; min-width: 8rem;
        box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.stat b { display: block; font-size: 1.3rem; }
.stat small, .muted { color: #59636e; }
table.runs { border-collapse: collapse; background: #fff; margin-top: .5rem; font-size: .9rem; }
table.runs td, table.runs th { padding: .3rem .7rem; border-bottom: 1px solid #e5e7eb; text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: .9rem; }
.query { display: flex; gap: 1.5rem; align-items: flex-start; flex-wrap: wrap; }
figure { margin: 0; width: 200px; background: #fff; border-radius: 6px; overflow: hidden;
         box-shadow: 0 1px 2px rgba(0,0,0,.08); }
figure.big { width: 320px; border: 3px solid #1caad9; }
figure img, figure .noimg { display: block; width: 100%; aspect-ratio: 16 / 9; object-fit: cover;
         background: #dde1e6; }
figure .noimg { display: flex; align-items: center; justify-content: center; color: #59636e; }
figcaption { padding: .4rem .55rem .55rem; font-size: .85rem; overflow-wrap: anywhere; }
figcaption a { color: #0b5e7a; }
.score { font-variant-numeric: tabular-nums; font-weight: 600; }
.error { background: #fff4f4; border-left: 4px solid #d1242f; padding: .75rem 1rem; }
code { overflow-wrap: anywhere; }
"""

# Navigation icon: three overlapping tiles.
ICON = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#1caad9"
 stroke-width="2"><rect x="2" y="6" width="9" height="9" rx="1"/><rect x="8" y="3" width="9" height="9" rx="1"/>
<rect x="13" y="10" width="9" height="9" rx="1"/></svg>"""

TEMPLATES = {
    "base.html": """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{% block title %}Similarity gallery{% endblock %}</title>
{% if static %}<style>{{ css }}</style>{% else %}<link rel="stylesheet" href="{{ base }}/gallery.css">{% endif %}
</head><body>
<header><a href="{{ base }}/">Sketchfab similarity gallery</a>
{% if not static %}<form method="get" action="{{ base }}/search" role="search">
<input type="search" name="q" value="{{ q }}" maxlength="{{ max_query }}" placeholder="Model name or uid"
 aria-label="Model name or uid"><button type="submit">Search</button></form>{% endif %}
</header><main>{% block main %}{% endblock %}</main></body></html>
""",
    "macros.html": """{% macro card(uid, name, viewer_url, caption, big=False, score=None) -%}
<figure class="{{ 'big' if big else '' }}" data-uid="{{ uid }}">
{%- set src = thumb(uid) -%}
{%- if static -%}{% set href = link(viewer_url) %}{% else %}{% set href = base ~ '/models/' ~ uid %}{% endif -%}
<a href="{{ href or '#' }}">{% if src %}<img src="{{ src }}" alt="{{ name }}" loading="lazy">
{%- else %}<div class="noimg">no thumbnail</div>{% endif %}</a>
<figcaption>{% if score is not none %}<span class="score">{{ '%.3f' | format(score) }}</span> {% endif %}
<span class="name">{{ name }}</span><br><small class="muted">{{ caption }}</small>
{%- if link(viewer_url) %} · <a href="{{ link(viewer_url) }}" target="_blank" rel="noopener noreferrer">Sketchfab</a>
{%- endif %}</figcaption></figure>
{%- endmacro %}""",
    "home.html": """{% extends "base.html" %}{% from "macros.html" import card with context %}
{% block main %}
{% if error %}<p class="error">{{ error }}</p>{% endif %}
{% if overview %}
<h1>Overview</h1>
<div class="stats">
{% for label, key in stat_fields %}<div class="stat"><b>{{ overview.totals[key] if overview.totals[key] is not none else '—' }}</b><small>{{ label }}</small></div>{% endfor %}
</div>
<p class="muted">Feature version: <code>{{ overview.totals.feature_version or 'none yet' }}</code></p>
<h2>Latest run</h2>
{% if overview.latest_run %}{% set run = overview.latest_run %}
<p class="muted">Run <code>{{ run.run_id }}</code> ({{ run.run_type }}) finished {{ run.finished_at }}
{%- if run.data_interval_start %}; data interval {{ run.data_interval_start }} to {{ run.data_interval_end }}{% endif %}.</p>
<table class="runs"><tr><th>task</th><th>counts</th></tr>
{% for stage, counts in overview.stages %}<tr><td>{{ stage }}</td><td>{% for k, v in counts.items() %}{{ k }}={{ v }}{% if not loop.last %}, {% endif %}{% endfor %}</td></tr>{% endfor %}
</table>
{% else %}<p class="muted">No run has finished yet.</p>{% endif %}
{% endif %}
{% if recent %}<h2>Recently published</h2>
<div class="grid">{% for m in recent %}{{ card(m.uid, m.name, m.viewer_url, m.author or '') }}{% endfor %}</div>{% endif %}
{% endblock %}""",
    "search.html": """{% extends "base.html" %}{% from "macros.html" import card with context %}
{% block title %}Search: {{ q }}{% endblock %}
{% block main %}
<h1>{{ results | length }} model{{ '' if results | length == 1 else 's' }} matching “{{ q }}”</h1>
{% if not results %}<p class="muted">Nothing found. Search by part of a name or by a full 32-character uid.</p>{% endif %}
<div class="grid">{% for m in results %}{{ card(m.uid, m.name, m.viewer_url, m.author or '') }}{% endfor %}</div>
{% endblock %}""",
    "model.html": """{% extends "base.html" %}{% from "macros.html" import card with context %}
{% block title %}{{ model.name }}{% endblock %}
{% block main %}
<h1>{{ model.name }}</h1>
<div class="query">
{{ card(model.uid, model.name, model.viewer_url, (model.author or '') ~ ' · ' ~ model.like_count ~ ' likes', big=True) }}
<div><p class="muted">uid <code>{{ model.uid }}</code></p>
<p class="muted">SQL: <code>SELECT * FROM similar_models('{{ model.uid }}', {{ k }});</code></p></div>
</div>
<h2>Top {{ recs | length }} look-alikes</h2>
{% if not recs %}<p class="muted">No recommendations yet: this model has no vector (its thumbnail may have failed).</p>{% endif %}
<div class="grid">{% for r in recs %}{{ card(r.uid, r.name, r.viewer_url, '#' ~ r.rank, score=r.score) }}{% endfor %}</div>
{% endblock %}""",
    "static.html": """{% extends "base.html" %}{% from "macros.html" import card with context %}
{% block title %}{{ title }}{% endblock %}
{% block main %}<h1>{{ title }}</h1>
{% for query, recs in queries %}<section class="query">
{{ card(query.uid, query.name, query.viewer_url, 'query', big=True) }}
<div class="grid">{% for r in recs %}{{ card(r.uid, r.name, r.viewer_url, '#' ~ r.rank, score=r.score) }}{% endfor %}</div>
</section><hr>{% endfor %}
{% endblock %}""",
    "error.html": """{% extends "base.html" %}{% block main %}<p class="error">{{ error }}</p>{% endblock %}""",
}

STAT_FIELDS = (
    ("models", "models"),
    ("thumbnails ok", "thumbnails_ok"),
    ("thumbnails failed", "thumbnails_failed"),
    ("vectors", "vectors"),
    ("with recommendations", "models_with_recommendations"),
    ("crawl rejects", "crawl_rejects"),
)

ENV = jinja2.Environment(
    loader=jinja2.DictLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
)


def render(template: str, **context: Any) -> str:
    context.setdefault("static", False)
    context.setdefault("base", "")
    context.setdefault("q", "")
    context.setdefault("thumb", lambda uid: None)
    return ENV.get_template(template).render(
        link=safe_link, css=CSS, max_query=MAX_QUERY_CHARS, stat_fields=STAT_FIELDS, **context
    )


def render_html(
    title: str,
    queries: list[tuple[ModelCard, list[Recommendation]]],
    image_src: Callable[[str], str | None],
) -> str:
    """A self-contained static page (inline CSS); `image_src(uid)` gives each thumbnail's src."""
    return render("static.html", static=True, title=title, queries=queries, thumb=image_src)


def cached(provider: Callable[[], Settings], ttl_s: float = 60.0) -> Callable[[], Settings]:
    """Re-read settings at most every `ttl_s` seconds (they come from Airflow connections/Variables)."""
    lock = threading.Lock()
    state: dict[str, Any] = {"at": -ttl_s, "value": None}

    def get() -> Settings:
        with lock:
            if time.monotonic() - state["at"] >= ttl_s:
                state["value"], state["at"] = provider(), time.monotonic()
            return state["value"]

    return get


def create_app(settings: Callable[[], Settings], dependencies: Sequence[Any] = ()) -> FastAPI:
    """The gallery as a FastAPI app; `dependencies` guard every route (the plugin adds Airflow's login)."""
    app = FastAPI(
        title="Similarity gallery",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(d) for d in dependencies],
    )

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable) -> Any:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        base = request.scope.get("root_path", "").rstrip("/")
        html = render(template, base=base, thumb=lambda uid: f"{base}/thumbnails/{uid}", **context)
        return HTMLResponse(html, status_code=status_code)

    def current_settings() -> Settings:
        try:
            return settings()
        except Exception as exc:  # configuration problems: show them instead of a stack trace
            raise Unavailable(_first_line(exc)) from None

    def db_url() -> str:
        return current_settings().db_url

    @app.exception_handler(NoData)
    async def no_data(request: Request, exc: NoData) -> HTMLResponse:
        return page(
            request, "error.html", 503, error=f"No pipeline tables yet ({exc}): trigger the DAG first."
        )

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> HTMLResponse:
        return page(request, "error.html", 503, error=f"The similarity database is not available: {exc}")

    @app.get("/icon.svg", include_in_schema=False)
    def icon() -> Response:
        return Response(ICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/gallery.css", include_in_schema=False)
    def stylesheet() -> Response:
        return Response(CSS, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request) -> HTMLResponse:
        url = db_url()
        try:
            return page(
                request, "home.html", overview=overview(url), recent=recent_models(url, 12), error=None
            )
        except NoData:
            return page(
                request,
                "home.html",
                overview=None,
                recent=[],
                error="No run has finished yet: trigger the DAG.",
            )

    @app.get("/search", response_class=HTMLResponse)
    def search(request: Request, q: str = Query("", max_length=MAX_QUERY_CHARS)) -> Response:
        q = q.strip()
        if UID_RE.match(q.lower()) and get_model(db_url(), q.lower()):
            return RedirectResponse(
                f"{request.scope.get('root_path', '').rstrip('/')}/models/{q.lower()}", 303
            )
        return page(request, "search.html", q=q, results=search_models(db_url(), q))

    @app.get("/models/{uid}", response_class=HTMLResponse)
    def model(request: Request, uid: str, k: int = Query(DEFAULT_K, ge=1, le=MAX_K)) -> HTMLResponse:
        card = get_model(db_url(), uid) if UID_RE.match(uid) else None
        if card is None:
            return page(request, "error.html", 404, error="No model with this uid.")
        return page(request, "model.html", model=card, k=k, recs=similar_models(db_url(), uid, k))

    @app.get("/thumbnails/{uid}", include_in_schema=False)
    def thumbnail(uid: str) -> Response:
        paths = stored_paths(db_url(), [uid]) if UID_RE.match(uid) else {}
        if uid not in paths:
            return Response(status_code=404)
        data = ThumbnailStore(current_settings().thumbnail_store).get(paths[uid])
        media_type = image_type(data)
        if media_type is None:
            return Response(status_code=404)
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})

    return app
