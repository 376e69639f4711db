"""`python -m sketchfab_similarity.compare_features`: feature choices compared on the stored thumbnails.

The command-line edge of `evaluation.compare`: it hands the comparison the features stage's
VGG16 loader (ImageNet through Keras' cache, a weights file, or seeded random weights), so
the evaluation stage itself needs no other stage. Prints a Markdown table and the winner.
"""

from __future__ import annotations

import json
from pathlib import Path

from .core.cli import command_parser, parse
from .core.settings import Settings
from .evaluation.compare import compare_features, format_table, winner
from .features.vgg16 import load_vgg16


def main(argv: list[str] | None = None) -> None:
    defaults = Settings()
    parser = command_parser("python -m sketchfab_similarity.compare_features", __doc__)
    parser.add_argument(
        "--weights", default=defaults.vgg16_weights, help="imagenet | weights file path | random"
    )
    parser.add_argument("--input-size", type=int, default=defaults.input_size)
    parser.add_argument("--sample-size", type=int, default=400, help="thumbnails compared (seeded sample)")
    parser.add_argument("--seed", type=int, default=defaults.evaluation_seed)
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parse(parser, argv)
    settings = Settings(
        db_url=args.db_url,
        thumbnail_store=args.thumbnail_store,
        vgg16_weights=args.weights,
        input_size=args.input_size,
        evaluation_seed=args.seed,
    )
    results = compare_features(settings, load_vgg16, sample_size=args.sample_size)
    print(format_table(results))
    best = winner(results)
    p10 = best["precision"].get(10)
    print(f"\nBest precision@10: {best['name']} ({'n/a' if p10 is None else f'{p10:.3f}'}).")
    if args.weights == "random":
        print(
            "Seeded RANDOM weights: this checks which choices keep the pictures' structure, not ImageNet features."
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
