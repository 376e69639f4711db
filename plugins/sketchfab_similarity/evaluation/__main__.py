"""`python -m sketchfab_similarity.evaluation`: evaluate the published lists without Airflow.

Writes one `similarity_quality` row (run id `manual__<UTC time>` unless given) and prints the
summary. The feature-choice comparison is `python -m sketchfab_similarity.compare_features`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from ..core.cli import command_parser, parse
from ..core.settings import Settings
from .evaluate import evaluate, summary_line


def main(argv: list[str] | None = None) -> None:
    defaults = Settings()
    parser = command_parser("python -m sketchfab_similarity.evaluation", __doc__)
    parser.add_argument("--sample-size", type=int, default=defaults.evaluation_sample_size)
    parser.add_argument("--seed", type=int, default=defaults.evaluation_seed)
    parser.add_argument("--rerank", choices=["none", "csls"], default=defaults.hubness_rerank)
    parser.add_argument("--csls-k", type=int, default=defaults.csls_k)
    parser.add_argument("--run-id", default=None, help="default: manual__<UTC time>")
    parser.add_argument("--json", action="store_true", help="print every metric as JSON")
    args = parse(parser, argv)
    settings = Settings(
        db_url=args.db_url,
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
