"""Recommendations as data and as an HTML page: each query model beside its top-k.

Reads through `similar_models()`, the same SQL a user would run, so the page
shows exactly what users get. Every user-written string is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass

from .db import connect


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
    thumbnail_url: str | None
    viewer_url: str | None
    stored_path: str | None


def similar_models(db_url: str, uid: str, k: int = 10) -> list[Recommendation]:
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT rank, uid, name, score, thumbnail_url, viewer_url FROM similar_models(%s, %s)", (uid, k)
        )
        return [Recommendation(*row) for row in cur.fetchall()]


def sample_models(db_url: str, limit: int) -> list[ModelCard]:
    """Models that have recommendations, newest first: the queries a demo shows."""
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute(
            """
            SELECT m.uid, m.name, t.source_url, m.viewer_url, t.stored_path
            FROM sketchfab_models m JOIN model_thumbnails t ON t.uid = m.uid
            WHERE EXISTS (SELECT 1 FROM model_similarity s WHERE s.uid = m.uid)
            ORDER BY m.published_at DESC, m.uid
            LIMIT %s
            """,
            (limit,),
        )
        return [ModelCard(*row) for row in cur.fetchall()]


def stored_paths(db_url: str, uids: list[str]) -> dict[str, str]:
    with connect(db_url, vectors=False) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT uid, stored_path FROM model_thumbnails WHERE uid = ANY(%s) AND status = 'ok'", (uids,)
        )
        return dict(cur.fetchall())


def render_html(
    title: str,
    queries: list[tuple[ModelCard, list[Recommendation]]],
    image_src: Callable[[str], str | None],
) -> str:
    """A static page; `image_src(uid)` gives each thumbnail's src (a stored file or the CDN URL)."""
    esc = html.escape

    def tile(uid: str, name: str, viewer_url: str | None, caption: str) -> str:
        src = image_src(uid)
        img = (
            f'<img src="{esc(src)}" alt="{esc(name)}" loading="lazy">'
            if src
            else '<div class="noimg">?</div>'
        )
        link = f'<a href="{esc(viewer_url)}" rel="noopener">{img}</a>' if viewer_url else img
        return f"<figure>{link}<figcaption>{esc(name)}<br><small>{esc(caption)}</small></figcaption></figure>"

    rows = []
    for query, recs in queries:
        cells = [tile(query.uid, query.name, query.viewer_url, "query")]
        cells += [tile(r.uid, r.name, r.viewer_url, f"#{r.rank} score {r.score:.3f}") for r in recs]
        rows.append(f'<section class="row">{"".join(cells)}</section>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #fafafa; }}
.row {{ display: flex; gap: .75rem; margin-bottom: 1.25rem; align-items: flex-start; }}
figure {{ margin: 0; width: 160px; }}
figure:first-child {{ border-right: 3px solid #1caad9; padding-right: .75rem; }}
img, .noimg {{ width: 160px; height: 90px; object-fit: cover; border-radius: 4px; background: #ddd; }}
figcaption {{ font-size: .8rem; overflow-wrap: anywhere; }}
</style></head><body>
<h1>{esc(title)}</h1>
{"".join(rows)}
</body></html>
"""
