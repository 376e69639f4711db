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

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ..core.settings import Settings
from ..core.store import ArtifactStore
from ..core.uids import is_uid
from . import charts
from .queries import (
    DEFAULT_K,
    MAX_QUERY_CHARS,
    ModelCard,
    NoData,
    Recommendation,
    Unavailable,
    first_line,
    get_model,
    latest_quality,
    model_names,
    overview,
    quality_history,
    reader_url,
    recent_models,
    search_models,
    similar_models,
    stored_paths,
)

HERE = Path(__file__).parent
CSS = (HERE / "static" / "gallery.css").read_text()
ICON = (HERE / "static" / "icon.svg").read_text()

MAX_K = 100
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


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


STAT_FIELDS = (
    ("models", "models"),
    ("thumbnails ok", "thumbnails_ok"),
    ("thumbnails failed", "thumbnails_failed"),
    ("vectors", "vectors"),
    ("with recommendations", "models_with_recommendations"),
    ("crawl rejects", "crawl_rejects"),
)

ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
)


def render(template: str, **context: Any) -> str:
    context.setdefault("static", False)
    context.setdefault("base", "")
    context.setdefault("q", "")
    context.setdefault("thumb", lambda uid: None)
    return ENV.get_template(template).render(
        link=safe_link,
        fmt=fmt,
        pct=pct,
        css=CSS,
        max_query=MAX_QUERY_CHARS,
        stat_fields=STAT_FIELDS,
        **context,
    )


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


METHOD_ORDER = {key: i for i, key in enumerate(("published", "random", "colour", "embedding_sample", "csls"))}


def quality_context(db_url: str) -> dict[str, Any]:
    """What the Quality page shows: the latest evaluation, its charts, and the history of evaluations."""
    latest = latest_quality(db_url)
    if latest is None:
        return {"latest": None}
    history = quality_history(db_url)
    # jsonb does not keep key order: show the methods in a fixed one.
    methods = dict(
        sorted(latest["methods"].items(), key=lambda kv: (METHOD_ORDER.get(kv[0], len(METHOD_ORDER)), kv[0]))
    )
    ks = [str(k) for k in latest["ks"]]

    def by_k(field: str) -> dict[str, tuple[str, list[float | None]]]:
        return {key: (m["label"], [m[field].get(k) for k in ks]) for key, m in methods.items()}

    published = methods["published"]["precision"]
    hubs = [uid for uid, _ in latest["hubness"]["top_hubs"]]
    pairs = [uid for a, b, _ in latest["near_duplicates"]["pairs"] for uid in (a, b)]
    return {
        "latest": latest,
        "methods": methods,
        "history": history,
        "names": model_names(db_url, hubs + pairs),
        "headline": [
            ("precision@10", fmt(published.get("10"))),
            ("random baseline", fmt(methods["random"]["precision"].get("10"))),
            ("colour baseline", fmt(methods.get("colour", {}).get("precision", {}).get("10"))),
            ("coverage@10", pct(latest["hubness"]["coverage"])),
            ("hubness skewness", fmt(latest["hubness"]["skewness"], 2)),
            ("near-duplicate pairs", str(latest["near_duplicates"]["count"])),
        ],
        "precision_chart": charts.line_chart(
            "Category precision@k", [f"k={k}" for k in ks], by_k("precision"), "k", "precision@k"
        ),
        "jaccard_chart": charts.line_chart(
            "Tags Jaccard@k", [f"k={k}" for k in ks], by_k("tags_jaccard"), "k", "mean Jaccard"
        ),
        "hubness_chart": charts.histogram_chart(
            "Hubness: models by times recommended", latest["hubness"]["histogram"]
        ),
        "history_chart": charts.line_chart(
            "Precision@10 across evaluations",
            [r.evaluated_at[5:16] for r in history],
            {
                "published": ("published lists", [r.precision_at_10 for r in history]),
                "random": ("random", [r.random_precision_at_10 for r in history]),
                "colour": ("colour histogram", [r.colour_precision_at_10 for r in history]),
            },
            "evaluation (UTC)",
            "precision@10",
        ),
    }


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
            raise Unavailable(first_line(exc)) from None

    def db_url() -> str:
        return reader_url(current_settings())

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

    @app.get("/quality", response_class=HTMLResponse)
    def quality(request: Request) -> HTMLResponse:
        return page(request, "quality.html", **quality_context(db_url()))

    @app.get("/search", response_class=HTMLResponse)
    def search(request: Request, q: str = Query("", max_length=MAX_QUERY_CHARS)) -> Response:
        q = q.strip()
        if is_uid(q.lower()) and get_model(db_url(), q.lower()):
            return RedirectResponse(
                f"{request.scope.get('root_path', '').rstrip('/')}/models/{q.lower()}", 303
            )
        return page(request, "search.html", q=q, results=search_models(db_url(), q))

    @app.get("/models/{uid}", response_class=HTMLResponse)
    def model(request: Request, uid: str, k: int = Query(DEFAULT_K, ge=1, le=MAX_K)) -> HTMLResponse:
        card = get_model(db_url(), uid) if is_uid(uid) else None
        if card is None:
            return page(request, "error.html", 404, error="No model with this uid.")
        return page(request, "model.html", model=card, k=k, recs=similar_models(db_url(), uid, k))

    @app.get("/thumbnails/{uid}", include_in_schema=False)
    def thumbnail(uid: str) -> Response:
        paths = stored_paths(db_url(), [uid]) if is_uid(uid) else {}
        if uid not in paths:
            return Response(status_code=404)
        data = ArtifactStore.for_settings(current_settings()).get(paths[uid])
        media_type = image_type(data)
        if media_type is None:
            return Response(status_code=404)
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})

    return app
