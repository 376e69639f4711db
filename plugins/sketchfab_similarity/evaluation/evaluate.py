"""Evaluate the published lists: read `model_similarity`, the vectors and thumbnails, write `similarity_quality`.

Cheap metrics (coverage, hubness, near-duplicates) cover the whole published table. The
ones that need more than a pass over it (precision@k and tags Jaccard of the lists and of
their baselines, CSLS re-ranking) use a fixed sample of query models drawn with
`evaluation_seed`, so two evaluations of the same data give the same numbers.

Methods compared on the sample's queries:
- `published`: the lists in `model_similarity` (candidates: every model);
- `random`: seeded random lists over every model, the floor;
- `colour`: nearest neighbours by colour histogram of the same thumbnails (candidates: the sample);
- `embedding_sample`: the embedding's own nearest neighbours among the sample only, the fair
  opponent of `colour` when the sample is smaller than the catalogue;
- `csls` (with `similarity_hubness_rerank=csls`): the published vectors re-ranked by CSLS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psycopg2.extras import Json

from ..core.db import connect
from ..core.images import decode_for_model
from ..core.pgcopy import copy_out_rows, read_embeddings
from ..core.settings import Settings
from ..core.store import ArtifactStore
from . import metrics, rerank

log = logging.getLogger(__name__)

HISTOGRAM_SIDE = 64
"""Thumbnails are decoded at this side for the colour baseline (colour needs few pixels)."""
MAX_LISTED_PAIRS = 50


class NothingToEvaluate(RuntimeError):
    """No published lists: the pipeline has not produced anything to measure yet."""


LIST_ROW = np.dtype(
    [("fields", ">i2"), ("ulen", ">i4"), ("uid", "S32"), ("rlen", ">i4"), ("rank", ">i4"),
     ("slen", ">i4"), ("similar", "S32"), ("flen", ">i4"), ("score", ">f4")]
)  # fmt: skip


@dataclass
class Published:
    feature_version: str
    uids: np.ndarray
    """Pool: every model with a vector of this feature version, sorted by uid."""
    vectors: np.ndarray
    lists: np.ndarray
    """(models, N) pool indices of each model's published list, -1 padded (row i is uids[i]'s list)."""
    scores: np.ndarray
    categories: dict[int, frozenset[str]] = field(default_factory=dict)
    tags: dict[int, frozenset[str]] = field(default_factory=dict)
    """Labels by pool index, loaded only for the models a metric looks at (`load_labels`)."""


def load_published(db_url: str) -> Published:
    """The published table (binary COPY, no per-row Python objects) and the vectors behind it."""
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT feature_version FROM model_similarity LIMIT 1")
        row = cur.fetchone()
        if row is None:
            raise NothingToEvaluate("model_similarity is empty: run the pipeline first")
        version = row[0]
        rows = copy_out_rows(
            cur,
            cur.mogrify(
                "COPY (SELECT uid, rank, similar_uid, score FROM model_similarity WHERE feature_version = %s "
                "AND length(uid) = 32 AND length(similar_uid) = 32) TO STDOUT (FORMAT binary)",
                (version,),
            ).decode(),
            LIST_ROW,
        )
    if rows is None:
        raise ValueError("model_similarity could not be read as fixed-width rows")
    uids, vectors = read_embeddings(db_url, version)
    keys = uids.astype("S32")
    width = int(rows["rank"].max())
    lists = np.full((len(uids), width), -1, dtype=np.int64)
    scores = np.full((len(uids), width), np.nan)
    at = np.minimum(np.searchsorted(keys, rows["uid"]), len(keys) - 1)
    to = np.minimum(np.searchsorted(keys, rows["similar"]), len(keys) - 1)
    known = (keys[at] == rows["uid"]) & (keys[to] == rows["similar"])  # a model deleted since the refresh
    lists[at[known], rows["rank"][known] - 1] = to[known]
    scores[at[known], rows["rank"][known] - 1] = rows["score"][known].astype(np.float64)
    return Published(feature_version=version, uids=uids, vectors=vectors, lists=lists, scores=scores)


def load_labels(db_url: str, data: Published, indices: np.ndarray) -> None:
    """Categories and tags of the given pool indices (those not loaded yet) into `data`."""
    wanted = sorted(set(np.asarray(indices).ravel().tolist()) - set(data.categories) - {-1})
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT uid, categories, tags FROM sketchfab_models WHERE uid = ANY(%s)",
            ([str(data.uids[i]) for i in wanted],),
        )
        labels = {uid: (frozenset(c or ()), frozenset(t or ())) for uid, c, t in cur.fetchall()}
    for i in wanted:
        data.categories[i], data.tags[i] = labels.get(str(data.uids[i]), (frozenset(), frozenset()))


def draw_sample(pool_size: int, sample_size: int, seed: int) -> np.ndarray:
    """A fixed sample of pool indices (sorted), or the whole pool when it is small enough."""
    if pool_size <= sample_size:
        return np.arange(pool_size)
    return np.sort(np.random.default_rng(seed).choice(pool_size, sample_size, replace=False))


def colour_vectors(
    db_url: str, store_root: str, uids: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Colour histograms of the stored thumbnails of `uids`: (positions that have one, vectors, failures)."""
    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT uid, stored_path FROM model_thumbnails WHERE status = 'ok' AND uid = ANY(%s)",
            (list(uids),),
        )
        paths = dict(cur.fetchall())
    store = ArtifactStore(store_root)
    kept, vectors, failures = [], [], {}
    for pos, uid in enumerate(uids):
        if uid not in paths:
            failures[uid] = "no stored thumbnail"
            continue
        try:
            pixels = decode_for_model(store.get(paths[uid]), HISTOGRAM_SIDE)
        except Exception as exc:  # one unreadable file never stops the evaluation
            failures[uid] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        kept.append(pos)
        vectors.append(metrics.colour_histogram(pixels))
    return np.array(kept, dtype=np.int64), np.array(vectors).reshape(len(kept), -1), failures


class PoolLabels:
    """Labels of a pool's positions, read through to the published pool's (lazily loaded) labels."""

    def __init__(self, labels: dict[int, frozenset[str]], pool: np.ndarray) -> None:
        self.labels, self.pool = labels, pool

    def __getitem__(self, position: int) -> frozenset[str]:
        return self.labels[int(self.pool[position])]


ListSet = tuple[np.ndarray, np.ndarray, np.ndarray, str]
"""(queries, lists, pool, label): queries and lists index `pool`, which indexes the published pool."""


def method_metrics(list_set: ListSet, data: Published) -> dict[str, Any]:
    """Precision@k, tags Jaccard@k, coverage and hubness of one list set on the sample's queries."""
    queries, lists, pool, label = list_set
    cats, tags = PoolLabels(data.categories, pool), PoolLabels(data.tags, pool)
    counts = metrics.occurrences(lists, len(pool))
    return {
        "label": label,
        "pool": int(len(pool)),
        "precision": {str(k): v for k, v in metrics.precision_at_k(queries, lists, cats).items()},
        "tags_jaccard": {str(k): v for k, v in metrics.tags_jaccard_at_k(queries, lists, tags).items()},
        "coverage": metrics.coverage(lists, len(pool), metrics.HUB_K),
        "hubness_skewness": metrics.skewness(counts),
    }


def duplicate_pairs(data: Published, threshold: float) -> metrics.DuplicatePairs:
    """Near-duplicate pairs of the whole table; only rows with a score above the threshold are looked at."""
    rows = np.flatnonzero(np.any(data.scores > threshold, axis=1))
    valid = [data.lists[r] >= 0 for r in rows]
    return metrics.near_duplicates(
        [str(data.uids[r]) for r in rows],
        [[str(data.uids[j]) for j in data.lists[r][ok]] for r, ok in zip(rows, valid, strict=True)],
        [data.scores[r][ok].tolist() for r, ok in zip(rows, valid, strict=True)],
        threshold,
    )


def list_sets(
    data: Published, settings: Settings, sample: np.ndarray, colour: tuple[np.ndarray, np.ndarray]
) -> dict[str, ListSet]:
    """Every method's lists for the sample's queries (see the module docstring)."""
    n, width = data.lists.shape
    everyone = np.arange(n)
    sets: dict[str, ListSet] = {
        "published": (sample, data.lists[sample], everyone, "published lists"),
        "random": (
            sample,
            metrics.random_lists(sample, n, width, settings.evaluation_seed),
            everyone,
            "random",
        ),
    }
    positions, histograms = colour
    if len(positions) >= 2:
        own, pool = np.arange(len(positions)), sample[positions]
        lists, _ = metrics.exact_top_k(histograms, histograms, width, query_index=own)
        sets["colour"] = (own, lists, pool, "colour histogram (sample pool)")
        if len(pool) < n:
            lists, _ = metrics.exact_top_k(data.vectors[pool], data.vectors[pool], width, query_index=own)
            sets["embedding_sample"] = (own, lists, pool, "embedding (sample pool)")
    if settings.hubness_rerank == "csls":
        radii = rerank.radii_from_lists(data.scores, settings.csls_k)
        lists, _ = rerank.csls_lists(sample, data.vectors, radii, width)
        sets["csls"] = (sample, lists, everyone, f"CSLS re-ranked (k={settings.csls_k})")
    return sets


def compute_quality(
    data: Published,
    settings: Settings,
    colour: tuple[np.ndarray, np.ndarray],
    ensure_labels: Callable[[np.ndarray], None] = lambda indices: None,
) -> dict[str, Any]:
    """Every metric, as the JSON stored in `similarity_quality.metrics`. `colour` holds the sample
    positions that have a colour histogram and those histograms; `ensure_labels(indices)` makes the
    labels of those published-pool indices available in `data` before they are used."""
    n, width = data.lists.shape
    counts = metrics.occurrences(data.lists, n)
    duplicates = duplicate_pairs(data, settings.evaluation_duplicate_cosine)
    sample = draw_sample(n, settings.evaluation_sample_size, settings.evaluation_seed)
    sets = list_sets(data, settings, sample, colour)
    ensure_labels(
        np.concatenate([np.concatenate([pool[q], pool[ls[ls >= 0]]]) for q, ls, pool, _ in sets.values()])
    )
    methods = {name: method_metrics(list_set, data) for name, list_set in sets.items()}
    return {
        "feature_version": data.feature_version,
        "models": int(n),
        "list_length": int(width),
        "sample_size": int(len(sample)),
        "seed": settings.evaluation_seed,
        "ks": list(metrics.KS),
        "methods": methods,
        "hubness": {
            "k": metrics.HUB_K,
            "coverage": metrics.coverage(data.lists, n, metrics.HUB_K),
            "coverage_at_n": metrics.coverage(data.lists, n),
            "skewness": metrics.skewness(counts),
            "gini": metrics.gini(counts),
            "top_hubs": metrics.top_hubs(counts, [str(u) for u in data.uids]),
            "histogram": metrics.occurrence_histogram(counts),
        },
        "near_duplicates": {
            "threshold": settings.evaluation_duplicate_cosine,
            "count": len(duplicates.pairs),
            "pairs": [list(p) for p in duplicates.pairs[:MAX_LISTED_PAIRS]],
            "saturated_lists": duplicates.saturated,
        },
        "rerank": settings.hubness_rerank,
        "csls_k": settings.csls_k,
    }


def write_quality(db_url: str, run_id: str, quality: dict[str, Any]) -> None:
    """One row per (feature version, run); a rerun of the same run replaces it."""
    methods = quality["methods"]

    def p10(name: str, key: str = "precision") -> float | None:
        return methods.get(name, {}).get(key, {}).get("10")

    with connect(db_url) as conn, conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO similarity_quality (feature_version, run_id, evaluated_at, models, sample_size,
                precision_at_10, random_precision_at_10, colour_precision_at_10, tags_jaccard_at_10,
                coverage, hubness_skewness, hubness_gini, near_duplicate_pairs, metrics)
            VALUES (%s, %s, now(), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (feature_version, run_id) DO UPDATE SET
                evaluated_at = EXCLUDED.evaluated_at, models = EXCLUDED.models,
                sample_size = EXCLUDED.sample_size, precision_at_10 = EXCLUDED.precision_at_10,
                random_precision_at_10 = EXCLUDED.random_precision_at_10,
                colour_precision_at_10 = EXCLUDED.colour_precision_at_10,
                tags_jaccard_at_10 = EXCLUDED.tags_jaccard_at_10, coverage = EXCLUDED.coverage,
                hubness_skewness = EXCLUDED.hubness_skewness, hubness_gini = EXCLUDED.hubness_gini,
                near_duplicate_pairs = EXCLUDED.near_duplicate_pairs, metrics = EXCLUDED.metrics
            """,
            (
                quality["feature_version"], run_id, quality["models"], quality["sample_size"],
                p10("published"), p10("random"), p10("colour"), p10("published", "tags_jaccard"),
                quality["hubness"]["coverage"], quality["hubness"]["skewness"], quality["hubness"]["gini"],
                quality["near_duplicates"]["count"], Json(quality),
            ),
        )  # fmt: skip


def summary_line(quality: dict[str, Any]) -> str:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    methods, hub = quality["methods"], quality["hubness"]
    p10 = ", ".join(f"{name} {fmt(m['precision'].get('10'))}" for name, m in methods.items())
    return (
        f"{quality['feature_version']}: {quality['models']} models, sample {quality['sample_size']}; "
        f"category precision@10: {p10}; coverage@10 {hub['coverage']:.3f}, hubness skewness "
        f"{hub['skewness']:.2f}, Gini {hub['gini']:.3f}; near-duplicate pairs (cos > "
        f"{quality['near_duplicates']['threshold']}): {quality['near_duplicates']['count']}"
    )


def evaluate(settings: Settings, run_id: str) -> dict[str, Any]:
    """Measure the published lists and record one `similarity_quality` row; returns the metrics."""
    started = time.monotonic()
    data = load_published(settings.db_url)
    sample = draw_sample(len(data.uids), settings.evaluation_sample_size, settings.evaluation_seed)
    positions, histograms, failures = colour_vectors(
        settings.db_url, settings.thumbnail_store, [str(data.uids[i]) for i in sample]
    )
    if failures:
        log.warning(
            "colour baseline: %d thumbnails unreadable, e.g. %s", len(failures), next(iter(failures.items()))
        )
    quality = compute_quality(
        data, settings, (positions, histograms), lambda indices: load_labels(settings.db_url, data, indices)
    )
    quality["colour_failures"] = {"count": len(failures), "examples": dict(list(failures.items())[:10])}
    quality["seconds"] = round(time.monotonic() - started, 3)
    write_quality(settings.db_url, run_id, quality)
    log.info("quality %s", summary_line(quality))
    return quality
