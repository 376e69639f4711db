"""`python -m sketchfab_similarity.evaluation`: evaluate the published lists without Airflow.

Writes one `similarity_quality` row (run id `manual__<UTC time>` unless given) and prints the
summary. The feature-choice comparison is `python -m sketchfab_similarity.compare_features`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from datetime import UTC, datetime

from ..core.settings import Settings
from .evaluate import evaluate, summary_line


def sqlalchemy_url(uri: str) -> str:
    """Accept a libpq URI (what `tools/devenv.py start-db` prints) or a SQLAlchemy URL."""
    return (
        uri.replace("postgresql://", "postgresql+psycopg2://", 1) if uri.startswith("postgresql://") else uri
    )


def main(argv: list[str] | None = None) -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m sketchfab_similarity.evaluation", description=__doc__)
    parser.add_argument("--db-url", default=os.environ.get("SIMILARITY_DB_URI", ""), help="Postgres URI")
    parser.add_argument("--thumbnail-store", default=defaults.thumbnail_store)
    parser.add_argument("--sample-size", type=int, default=defaults.evaluation_sample_size)
    parser.add_argument("--seed", type=int, default=defaults.evaluation_seed)
    parser.add_argument("--rerank", choices=["none", "csls"], default=defaults.hubness_rerank)
    parser.add_argument("--csls-k", type=int, default=defaults.csls_k)
    parser.add_argument("--run-id", default=None, help="default: manual__<UTC time>")
    parser.add_argument("--json", action="store_true", help="print every metric as JSON")
    args = parser.parse_args(argv)
    if not args.db_url:
        parser.error("--db-url (or SIMILARITY_DB_URI) is required")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings(
        db_url=sqlalchemy_url(args.db_url),
        thumbnail_store=args.thumbnail_store,
        evaluation_sample_size=args.sample_size,
        evaluation_seed=args.seed,
        hubness_rerank=args.rerank,
        csls_k=args.csls_k,
    )
    run_id = args.run_id or f"manual__{datetime.now(UTC).isoformat(timespec='seconds')}"
    quality = evaluate(settings, run_id)
    print(json.dumps(quality, indent=1) if args.json else summary_line(quality))


if __name__ == "__main__":
    main()
