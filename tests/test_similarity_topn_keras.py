"""The Keras-device top-N (run here on TensorFlow's CPU) gives exactly the numpy kernel's lists."""

import numpy as np
import pytest
from sketchfab_similarity.similarity import topn, topn_keras

pytestmark = pytest.mark.integration  # Airflow or Keras


def unit(rows):
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(
    ("total", "n", "query_block", "column_chunk"),
    [(600, 20, 128, 100), (600, 20, 4096, 65536), (40, 50, 16, 7), (2, 3, 8, 8), (1, 3, 8, 8)],
)
def test_keras_engine_equals_numpy_kernel(total, n, query_block, column_chunk):
    rng = np.random.default_rng(total)
    matrix = unit(rng.normal(size=(total, 512)))
    expected = topn.top_n_all(matrix, n, tile=64)
    rows = np.arange(total)
    got = topn_keras.top_n_rows(matrix, rows, n, query_block=query_block, column_chunk=column_chunk)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def test_crowded_rows_fall_back_to_numpy_and_ties_break_by_index(monkeypatch):
    # Half the rows are copies from a pool of 5 (40 copies each). A random row sees each pool
    # vector 40 times with exactly the same score: when that score is in its top 20, n + SLACK
    # candidates cannot hold every tie, the proof fails and the row goes to the numpy kernel.
    # A copy's own top 20 are its 39 twins at 1.0, far above everything else: proven.
    rng = np.random.default_rng(3)
    matrix = unit(rng.normal(size=(400, 512)))
    matrix[::2] = unit(rng.normal(size=(5, 512)))[rng.integers(0, 5, 200)]
    fallback_rows = []
    numpy_rows = topn.top_n_rows

    def counting(matrix, rows, *args, **kwargs):
        fallback_rows.extend(rows.tolist())
        return numpy_rows(matrix, rows, *args, **kwargs)

    monkeypatch.setattr(topn, "top_n_rows", counting)
    queries = rng.permutation(400)
    got = topn_keras.top_n_rows(matrix, queries, 20, query_block=96, column_chunk=128)
    expected = topn.top_n_all(matrix, 20, tile=64)
    assert np.array_equal(got[0], expected[0][queries]) and np.array_equal(got[1], expected[1][queries])
    assert fallback_rows and set(fallback_rows) <= set(range(1, 400, 2))


def test_proof_needs_a_gap_wider_than_the_device_error():
    k, gap = 2, 2 * topn_keras.DEVICE_ERROR + topn_keras.ROUNDING_GAP
    scores = np.array([[0.9, 0.8, 0.8 - gap * 1.01], [0.9, 0.8, 0.8 - gap * 0.99]], np.float32)
    assert topn_keras.proven(scores, k, total=100).tolist() == [True, False]
    assert topn_keras.proven(scores, k, total=4).tolist() == [True, True]  # every column is a candidate


def test_auto_engine_stays_on_numpy_without_a_gpu(monkeypatch):
    monkeypatch.setattr(topn_keras, "gpu_device_files", lambda: False)
    assert topn_keras.choose_engine("auto") == "numpy"
    assert topn_keras.choose_engine("keras") == "keras"


def test_all_identical_vectors_fall_back_for_every_row():
    matrix = np.full((120, 512), 1 / np.sqrt(512), np.float32)
    got = topn_keras.top_n_rows(matrix, np.arange(120), 20, query_block=50)
    expected = topn.top_n_all(matrix, 20, tile=64)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[0][0].tolist() == list(range(1, 21))
