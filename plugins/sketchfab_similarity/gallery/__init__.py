"""The read-only similarity gallery: `queries` reads the database, `app` serves pages rendered from
`templates/` (Jinja, autoescaped) and `static/`. It imports the core only, never a stage."""

from .app import cached, create_app, render_html

__all__ = ["cached", "create_app", "render_html"]
