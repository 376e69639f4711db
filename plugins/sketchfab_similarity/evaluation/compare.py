"""Feature choices side by side on the same stored thumbnails: which layer, pooling, input size and
resize recommend best, and what the blog post's flattened `block5_pool` vectors would give.

For a seeded sample of thumbnails, each variant's vectors are computed, the exact top-k lists
within the sample are built (float64, ties by uid) and measured with the evaluation's metrics,
next to the random and colour-histogram baselines on the same pool. Flattened vectors
(7 x 7 x 512 = 25,088 dims at 224 px) are compared here in numpy, outside pgvector.

The VGG16 base model comes from a `load_base(spec)` callable, so this module needs no other
stage; `python -m sketchfab_similarity.compare_features` passes the features stage's loader.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..core.db import connect
from ..core.featurespec import FeatureSpec, l2_normalise, preprocess
from ..core.images import decode_for_model
from ..core.settings import Settings
from ..core.store import ArtifactStore
from . import metrics
from .evaluate import HISTOGRAM_SIDE, draw_sample

log = logging.getLogger(__name__)

LIST_LENGTH = 20
BATCH = 32


@dataclass(frozen=True)
class Variant:
    """One feature choice. `pooling` is avg | max | flatten (the post's); `scale` multiplies the input size."""

    name: str
    layer: str = "block5_pool"
    pooling: str = "avg"
    scale: float = 1.0
    resize: str = "squash"


DEFAULT_VARIANTS = (
    Variant("block5_pool avg (pipeline default)"),
    Variant("block5_pool max", pooling="max"),
    Variant("block5_conv3 avg", layer="block5_conv3"),
    Variant("block4_pool avg", layer="block4_pool"),
    Variant("block5_pool avg, centre crop", resize="center_crop"),
    Variant("block5_pool avg, input x2", scale=2.0),
    Variant("block5_pool flattened (the post)", pooling="flatten"),
)


@dataclass(frozen=True)
class Sample:
    uids: list[str]
    images: list[bytes]
    categories: list[frozenset[str]]
    tags: list[frozenset[str]]


def load_sample(db_url: str, store_root: str, size: int, seed: int) -> Sample:
    """A seeded sample of models with a good stored thumbnail, in uid order; unreadable files are skipped with a warning."""
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT t.uid, t.stored_path, m.categories, m.tags FROM model_thumbnails t "
            "JOIN sketchfab_models m ON m.uid = t.uid WHERE t.status = 'ok' ORDER BY t.uid"
        )
        rows = cur.fetchall()
    store = ArtifactStore(store_root)
    picked = [rows[i] for i in draw_sample(len(rows), size, seed)]
    uids, images, cats, tags = [], [], [], []
    for uid, path, categories, model_tags in picked:
        try:
            images.append(store.get(path))
        except Exception as exc:
            log.warning("skipping %s: %s: %s", uid, type(exc).__name__, exc)
            continue
        uids.append(uid)
        cats.append(frozenset(categories or ()))
        tags.append(frozenset(model_tags or ()))
    if len(uids) < 3:
        raise ValueError(f"only {len(uids)} readable thumbnails: run the pipeline's download first")
    return Sample(uids, images, cats, tags)


def list_metrics(
    lists: np.ndarray, scores: np.ndarray | None, sample: Sample, threshold: float
) -> dict[str, Any]:
    """The evaluation's metrics of one list set over the sample pool."""
    n = len(sample.uids)
    queries = np.arange(n)
    counts = metrics.occurrences(lists, n)
    out: dict[str, Any] = {
        "precision": metrics.precision_at_k(queries, lists, sample.categories),
        "tags_jaccard": metrics.tags_jaccard_at_k(queries, lists, sample.tags),
        "coverage": metrics.coverage(lists, n, metrics.HUB_K),
        "skewness": metrics.skewness(counts),
        "gini": metrics.gini(counts),
        "near_duplicates": None,
    }
    if scores is not None:
        rows = [[sample.uids[j] for j in row if j >= 0] for row in lists]
        row_scores = [
            [s for j, s in zip(row, srow, strict=True) if j >= 0]
            for row, srow in zip(lists, scores, strict=True)
        ]
        out["near_duplicates"] = len(metrics.near_duplicates(sample.uids, rows, row_scores, threshold).pairs)
    return out


def pool(maps: np.ndarray, how: str) -> np.ndarray:
    if how == "avg":
        return maps.mean(axis=(1, 2))
    if how == "max":
        return maps.max(axis=(1, 2))
    if how == "flatten":
        return maps.reshape(len(maps), -1)
    raise ValueError(f"pooling must be avg, max or flatten, got {how!r}")


def compare_features(
    settings: Settings,
    load_base: Callable[[FeatureSpec], Any],
    sample_size: int = 400,
    variants: Sequence[Variant] = DEFAULT_VARIANTS,
) -> list[dict[str, Any]]:
    """One result row per variant plus the two baselines, each with dims, seconds per image and metrics."""
    import keras

    spec = FeatureSpec.from_settings(settings)
    sample = load_sample(settings.db_url, settings.thumbnail_store, sample_size, settings.evaluation_seed)
    n, k, threshold = (
        len(sample.uids),
        min(LIST_LENGTH, len(sample.uids) - 1),
        settings.evaluation_duplicate_cosine,
    )
    log.info("comparing %d variants on %d thumbnails (%s)", len(variants), n, spec.version)
    results: list[dict[str, Any]] = []

    started = time.perf_counter()
    hist = np.stack([metrics.colour_histogram(decode_for_model(b, HISTOGRAM_SIDE)) for b in sample.images])
    hist_seconds = (time.perf_counter() - started) / n
    lists, scores = metrics.exact_top_k(hist, hist, k, query_index=np.arange(n))
    results.append({"name": "baseline: colour histogram", "dims": hist.shape[1], "seconds_per_image": hist_seconds,
                    **list_metrics(lists, scores, sample, threshold)})  # fmt: skip
    random = metrics.random_lists(np.arange(n), n, k, settings.evaluation_seed)
    results.append({"name": "baseline: random", "dims": 0, "seconds_per_image": 0.0,
                    **list_metrics(random, None, sample, threshold)})  # fmt: skip

    # Variants that share an input and a layer share one forward pass; batches are decoded, run and
    # pooled one at a time, so only the pooled vectors are kept (a 224 px sample of 2,000 fits in memory).
    groups: dict[tuple[int, str, str], list[Variant]] = {}
    for variant in variants:
        size = int(round(spec.input_size * variant.scale))
        groups.setdefault((size, variant.resize, variant.layer), []).append(variant)
    bases: dict[int, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    for (size, resize, layer), members in groups.items():
        if size not in bases:
            bases[size] = load_base(replace(spec, input_size=size))
        model = keras.Model(bases[size].input, bases[size].get_layer(layer).output)

        def decode(images: Sequence[bytes], size: int = size, resize: str = resize) -> np.ndarray:
            return np.stack(
                [
                    preprocess(decode_for_model(b, size, resize, spec.interpolation, spec.jpeg_decode))
                    for b in images
                ]
            )

        model.predict_on_batch(decode(sample.images[:BATCH]))  # build and warm up outside the timing
        decode_s = forward_s = 0.0
        pool_s = dict.fromkeys((v.name for v in members), 0.0)
        pooled: dict[str, list[np.ndarray]] = {v.name: [] for v in members}
        for start in range(0, n, BATCH):
            started = time.perf_counter()
            batch = decode(sample.images[start : start + BATCH])
            decode_s += time.perf_counter() - started
            started = time.perf_counter()
            maps = np.asarray(model.predict_on_batch(batch))
            forward_s += time.perf_counter() - started
            for v in members:
                started = time.perf_counter()
                pooled[v.name].append(pool(maps, v.pooling))
                pool_s[v.name] += time.perf_counter() - started
        for v in members:
            vectors = l2_normalise(np.concatenate(pooled.pop(v.name)))
            lists, scores = metrics.exact_top_k(vectors, vectors, k, query_index=np.arange(n))
            seconds = (decode_s + forward_s + pool_s[v.name]) / n
            rows[v.name] = {"name": v.name, "dims": vectors.shape[1], "input_size": size, "seconds_per_image": seconds,
                            **list_metrics(lists, scores, sample, threshold)}  # fmt: skip
            log.info("%s: %d dims, %.1f ms/image", v.name, vectors.shape[1], 1000 * seconds)
    results.extend(rows[v.name] for v in variants)
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table: one row per variant, precision@k and the other metrics side by side."""

    def fmt(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    head = ("| setting | dims | ms/image | P@1 | P@5 | P@10 | P@20 | tags J@10 | coverage@10 | skewness | Gini | "
            "pairs > 0.999 |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        p = r["precision"]
        dups = "" if r["near_duplicates"] is None else str(r["near_duplicates"])
        lines.append(
            f"| {r['name']} | {r['dims']} | {1000 * r['seconds_per_image']:.1f} | {fmt(p.get(1))} | {fmt(p.get(5))} | "
            f"{fmt(p.get(10))} | {fmt(p.get(20))} | {fmt(r['tags_jaccard'].get(10))} | {fmt(r['coverage'])} | "
            f"{fmt(r['skewness'], 2)} | {fmt(r['gini'])} | {dups} |"
        )
    return "\n".join(lines)


def winner(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The feature variant with the best precision@10 (then @5, then the name), baselines excluded."""
    candidates = [r for r in results if not r["name"].startswith("baseline")]
    return min(
        candidates,
        key=lambda r: (-(r["precision"].get(10) or 0.0), -(r["precision"].get(5) or 0.0), r["name"]),
    )
