"""Exact top-N on an accelerator: candidates from Keras ops on the GPU, verified and rescored on the CPU.

A GPU does the N x N products of a full rebuild far faster than two CPU cores, but its
float32 products may run in TF32 or sum in another order, so its scores are only close.
The result stays exact, and identical to `topn.top_n_all`, in three steps:

1. On the device: for a block of query rows, products against every column chunk and a running
   `top_k` of K = n + SLACK candidates per row (never more than one block x chunk product in memory).
2. On the CPU, a proof per row: every column left out scored at most the K-th candidate on the
   device; if that is more than 2 x DEVICE_ERROR below the row's n-th device score, no column
   left out can beat or tie the true n-th best, so the exact top n is among the candidates.
3. The candidates are rescored by `topn.exact_scores` (float64, fixed order) and ranked by
   (score, index) like the CPU path. Rows the proof does not cover (crowded scores, many
   identical vectors) are computed by `topn.top_n_rows` instead.

Works with any Keras backend (TensorFlow, JAX, PyTorch); on a CPU it is slower than numpy and
exists there for tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..core.backend import configure_backend, gpu_available, gpu_device_files
from . import topn

log = logging.getLogger(__name__)

SLACK = 32
"""Candidates kept per row beyond n: room for the proof in step 2."""
DEVICE_ERROR = 1.5e-3
"""Bound on |device score - exact score| for unit 512-d vectors, TF32 included: TF32 keeps 10
mantissa bits, so each product is off by at most ~2^-10 of |a_i b_i|, and sum |a_i b_i| <= 1."""
ROUNDING_GAP = 1e-6
"""Above the float32 rounding of a score near 1 (6e-8): a gap this wide survives rounding."""
QUERY_BLOCK = 4096
COLUMN_CHUNK = 65536


def choose_engine(requested: str) -> str:
    """numpy or keras. auto: keras when the Keras backend sees a GPU, numpy otherwise (on a CPU
    the numpy path, which computes only half of the symmetric products, is the faster one)."""
    if requested != "auto":
        return requested
    if not gpu_device_files():
        return "numpy"
    return "keras" if gpu_available() else "numpy"


def disable_tf32() -> None:
    """Ask the backend for full float32 matmuls where it can; DEVICE_ERROR covers TF32 anyway."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
    elif backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")


def device_candidates(
    x, query_rows: np.ndarray, keep: int, column_chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, device scores) of each query row's `keep` best columns (self excluded), best
    first; `x` is the whole matrix as a tensor on the device."""
    from keras import ops

    q = ops.take(x, ops.convert_to_tensor(query_rows), axis=0)
    q_ids = ops.expand_dims(ops.convert_to_tensor(query_rows.astype(np.int32)), 1)
    best_v = best_i = None
    for cs in range(0, x.shape[0], column_chunk):
        cols = x[cs : cs + column_chunk]
        block = ops.matmul(q, ops.transpose(cols))
        ids = ops.expand_dims(ops.arange(cs, cs + cols.shape[0], dtype="int32"), 0)
        block = ops.where(ops.equal(q_ids, ids), topn.FLOOR, block)
        values, picked = ops.top_k(block, k=min(keep, cols.shape[0]))
        picked = ops.cast(picked, "int32") + cs
        if best_v is not None:
            values = ops.concatenate([best_v, values], axis=1)
            picked = ops.concatenate([best_i, picked], axis=1)
            values, order = ops.top_k(values, k=min(keep, values.shape[1]))
            picked = ops.take_along_axis(picked, order, axis=1)
        best_v, best_i = values, picked
    return ops.convert_to_numpy(best_i).astype(np.int64), ops.convert_to_numpy(best_v).astype(np.float32)


def proven(device_scores: np.ndarray, k: int, total: int) -> np.ndarray:
    """Rows whose exact top k is certainly among their candidates (see the module docstring)."""
    keep = device_scores.shape[1]
    if keep >= total - 1:  # every other column is a candidate
        return np.ones(len(device_scores), dtype=bool)
    return device_scores[:, keep - 1] < device_scores[:, k - 1] - 2 * DEVICE_ERROR - ROUNDING_GAP


def rank_candidates(
    matrix: np.ndarray, query_rows: np.ndarray, cand: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top k of each row among its candidates: float64 rescoring, ties by lower index."""
    rows = np.repeat(query_rows, cand.shape[1])
    scores = topn.exact_scores(matrix, rows, cand.ravel()).reshape(cand.shape)
    order = np.lexsort((cand, -scores), axis=1)[:, :k]
    return np.take_along_axis(cand, order, axis=1), np.take_along_axis(scores, order, axis=1)


def top_n_rows(
    matrix: np.ndarray,
    query_rows: np.ndarray,
    n: int,
    tile: int = 2048,
    on_rows_done: Callable[[int], None] | None = None,
    query_block: int = QUERY_BLOCK,
    column_chunk: int = COLUMN_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """Same contract and same result as `topn.top_n_rows`, with the products on the Keras device."""
    x = np.ascontiguousarray(matrix, dtype=np.float32)
    query_rows = np.asarray(query_rows, dtype=np.int64)
    total = len(x)
    k = topn.neighbours_k(total, n)
    indices = np.empty((len(query_rows), k), np.int64)
    scores = np.empty((len(query_rows), k), np.float32)
    if k == 0 or not len(query_rows):
        return indices, scores
    configure_backend()
    from keras import ops

    disable_tf32()
    on_device = ops.convert_to_tensor(x)  # copied to the device once, for every query block
    keep = min(k + SLACK, total - 1)
    fallback = 0
    for qs in range(0, len(query_rows), query_block):
        q_rows = query_rows[qs : qs + query_block]
        cand, device_scores = device_candidates(on_device, q_rows, keep, column_chunk)
        ok = proven(device_scores, k, total)
        out = slice(qs, qs + len(q_rows))
        indices[out][ok], scores[out][ok] = rank_candidates(x, q_rows[ok], cand[ok], k)
        if not ok.all():
            fallback += int((~ok).sum())
            indices[out][~ok], scores[out][~ok] = topn.top_n_rows(x, q_rows[~ok], n, tile)
        if on_rows_done:
            on_rows_done(len(q_rows))
    if fallback:
        log.info("%d of %d rows had crowded scores and were computed on the CPU", fallback, len(query_rows))
    return indices, scores
