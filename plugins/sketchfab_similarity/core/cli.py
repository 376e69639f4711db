"""What the project's commands share: where the database and the thumbnail store are, and logging.

Each command (`python -m sketchfab_similarity.evaluation`, `...compare_features`,
`...thumbnails.gc`) adds its own options to `command_parser()` and reads them with `parse()`.
"""

from __future__ import annotations

import argparse
import logging
import os

from .settings import Settings

DB_URI_ENV = "SIMILARITY_DB_URI"


def sqlalchemy_url(uri: str) -> str:
    """Accept a libpq URI (what `tools/devenv.py start-db` prints) or a SQLAlchemy URL."""
    return (
        uri.replace("postgresql://", "postgresql+psycopg2://", 1) if uri.startswith("postgresql://") else uri
    )


def command_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A parser with `--db-url` (default: $SIMILARITY_DB_URI) and `--thumbnail-store` (alias `--store`)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--db-url", default=os.environ.get(DB_URI_ENV, ""), help=f"Postgres URI (or ${DB_URI_ENV})"
    )
    parser.add_argument(
        "--thumbnail-store", "--store", dest="thumbnail_store", default=Settings().thumbnail_store,
        help="the thumbnail store (Variable similarity_thumbnail_store)",
    )  # fmt: skip
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, insist on a database, normalise its URL, and log INFO to stderr."""
    args = parser.parse_args(argv)
    if not args.db_url:
        parser.error(f"--db-url (or {DB_URI_ENV}) is required")
    args.db_url = sqlalchemy_url(args.db_url)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args
