"""`make demo`: the whole pipeline end to end on embedded defaults, then recommendations.

Starts the embedded Postgres and the bundled Sketchfab-compatible server with a
generated catalog, runs the DAG once through Airflow, prints the top-5 of a few
models, writes an HTML gallery, runs the evaluation DAG and prints category precision@10
against the random and colour-histogram baselines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import devenv
from fake_sketchfab import Catalog
from sketchfab_similarity.core.store import ArtifactStore
from sketchfab_similarity.gallery.app import render_html
from sketchfab_similarity.gallery.queries import quality_history, recent_models, similar_models, stored_paths

ROOT = devenv.ROOT
EVALUATION_DAG_ID = "sketchfab_similarity_evaluation"


def banner(text: str) -> None:
    line = "=" * max(len(s) for s in text.splitlines())
    print(f"\n{line}\n{text}\n{line}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=int, default=200, help="catalog size (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--weights",
        default=os.environ.get("AIRFLOW_VAR_SIMILARITY_VGG16_WEIGHTS", "random"),
        help="imagenet | path to a weights file | random (default: random, since no network is assumed)",
    )
    parser.add_argument(
        "--input-size", type=int, default=int(os.environ.get("AIRFLOW_VAR_SIMILARITY_INPUT_SIZE", 224))
    )
    parser.add_argument("--show", type=int, default=4, help="how many query models to print")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument(
        "--api-port", type=int, default=devenv.DEMO_API_PORT, help="demo server port (0: any free port)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="start over: empty the similarity database and thumbnail store"
    )
    args = parser.parse_args()

    if args.weights == "random":
        banner(
            "VGG16 weights: RANDOM (seeded He-normal, explicit). ImageNet weights cannot be downloaded here.\n"
            "Recommendations reflect colour and layout, not learned shape semantics.\n"
            "For the real thing: --weights imagenet (needs network or ~/.keras/models) or a weights file path."
        )
    else:
        banner(f"VGG16 weights: {args.weights}")

    db_uri = devenv.start_postgres(ROOT / ".pgdata")
    if args.fresh:
        devenv.reset_database(db_uri)
        shutil.rmtree(args.data, ignore_errors=True)
    elif existing := devenv.count_models(db_uri):
        print(
            f"Reusing the database of an earlier demo ({existing} models): this run adds only what is new. "
            f"`make demo DEMO_ARGS=--fresh` starts over.",
            flush=True,
        )
    catalog = Catalog.generate(args.models, seed=args.seed)
    with devenv.start_demo_server(catalog, args.api_port) as server:
        print(f"Sketchfab-compatible demo server: {server.api_base_url} ({args.models} models)", flush=True)
        store = args.data / "thumbnails"
        env = devenv.airflow_env(
            airflow_home=ROOT / ".airflow",
            db_uri=db_uri,
            api_base_url=server.api_base_url,
            thumbnail_store=store,
            thumbnail_hosts=server.media_host,
            weights=args.weights,
            input_size=args.input_size,
        )
        devenv.migrate_metadata(env)
        devenv.run_dag_once(env)
        # The evaluation DAG runs on the pipeline's Asset under a scheduler; `dags test` runs it here.
        devenv.airflow(["dags", "test", EVALUATION_DAG_ID], env)

    db_url = devenv.sqlalchemy_url(db_uri)
    queries = [(card, similar_models(db_url, card.uid, 5)) for card in recent_models(db_url, 12)]
    if not queries:
        sys.exit("No recommendations were produced; see the task logs above.")
    for card, recs in queries[: args.show]:
        print(f"\n{card.name}  ({card.uid})")
        for r in recs:
            print(f"  {r.rank}. {r.score:.3f}  {r.name}  ({r.uid})")

    thumbs = ArtifactStore(str(store))
    paths = stored_paths(
        db_url, [c.uid for c, recs in queries] + [r.uid for _, recs in queries for r in recs]
    )
    page = args.data / "gallery.html"
    page.write_text(
        render_html(
            f"Sketchfab visual similarity (weights: {args.weights})",
            queries,
            lambda uid: Path(thumbs.path(paths[uid])).resolve().as_uri() if uid in paths else None,
        )
    )
    example = f"SELECT * FROM similar_models('{queries[0][0].uid}', 10);"  # noqa: S608 - printed, not run
    banner(f"Gallery: {page.resolve()}\nSQL: {example}")
    banner(quality_report(db_url, args.weights))


def quality_report(db_url: str, weights: str) -> str:
    """Precision@10 of the published lists against the random and colour baselines (latest evaluation)."""
    history = quality_history(db_url, limit=1)
    if not history:
        sys.exit("The evaluation DAG recorded nothing in similarity_quality; see its task log above.")
    row = history[-1]

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"Category precision@10 (share of the first 10 recommendations with the query's category; "
        f"{row.models} models):",
        f"  published lists {fmt(row.precision_at_10)} | random baseline {fmt(row.random_precision_at_10)} | "
        f"colour-histogram baseline {fmt(row.colour_precision_at_10)}",
        "  Every figure: SELECT * FROM similarity_quality; and the gallery's Quality page.",
    ]
    if weights == "random":
        lines.append(
            "  Seeded RANDOM weights: this checks that the pipeline keeps the pictures' structure,\n"
            "  not a claim about ImageNet features."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
