"""
### Sketchfab similarity evaluation

Are the recommendations any good? Runs after every publish of `model_similarity` (it is
scheduled on the Asset `sketchfab_model_similarity`) and on demand (**Trigger**), and
writes one row per (feature version, run) into `similarity_quality`:

- category precision@k and tags Jaccard@k (k = 1, 5, 10, 20) of the published lists, against
  random lists and colour-histogram nearest neighbours of the same thumbnails;
- coverage and hubness (skewness and Gini of how often each model is recommended, top hubs);
- near-duplicate pairs (cosine above 0.999).

The expensive metrics use a seeded sample (`similarity_evaluation_sample_size`). With
`similarity_hubness_rerank=csls` the CSLS re-ranked lists are measured beside the published
ones. Results: `SELECT * FROM similarity_quality ORDER BY evaluated_at DESC;` or the
**Quality** page of the Similarity gallery. Outside Airflow: `python -m sketchfab_similarity.evaluation`.

This file only wires tasks; the work lives in `plugins/sketchfab_similarity/evaluation/`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task
from sketchfab_similarity import tasks
from sketchfab_similarity.core.settings import dag_settings

DAG_ID = "sketchfab_similarity_evaluation"
SETTINGS = dag_settings()

# The Asset the pipeline's refresh_similarity updates.
SIMILARITY_TABLE = tasks.similarity_asset()


@dag(
    dag_id=DAG_ID,
    schedule=[SIMILARITY_TABLE],
    start_date=pendulum.datetime(2012, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["sketchfab", "recommendations", "quality"],
    default_args=tasks.default_args(SETTINGS),
)
def sketchfab_similarity_evaluation():
    @task
    def evaluate_similarity() -> dict:
        """Measures the published lists (precision@k against random and colour baselines, coverage,
        hubness, near-duplicates) and writes one row into `similarity_quality`; logs a summary."""
        return tasks.evaluate_similarity(get_current_context())

    evaluate_similarity()


sketchfab_similarity_evaluation()
