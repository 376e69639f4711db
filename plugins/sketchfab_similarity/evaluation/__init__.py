"""Evaluation: are the recommendations any good? `metrics` are pure numpy measures of list sets,
`evaluate` measures the published table and writes `similarity_quality`, `rerank` is the optional
CSLS hubness mitigation, `compare` sets feature choices side by side on the same thumbnails.

Runs as the DAG `sketchfab_similarity_evaluation` after every publish, or as
`python -m sketchfab_similarity.evaluation`.
"""

from .evaluate import NothingToEvaluate, evaluate, summary_line

__all__ = ["NothingToEvaluate", "evaluate", "summary_line"]
