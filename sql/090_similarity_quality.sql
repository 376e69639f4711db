-- One row per evaluation of the published similarity lists (DAG sketchfab_similarity_evaluation,
-- or `python -m sketchfab_similarity.evaluation`): the headline figures as columns, everything
-- (per-method precision@k, tags Jaccard, hubness histogram, top hubs, near-duplicate pairs) in
-- `metrics`. An evaluation rerun for the same (feature version, run) replaces its row.
CREATE TABLE IF NOT EXISTS similarity_quality (
    feature_version          text NOT NULL,
    run_id                   text NOT NULL,
    evaluated_at             timestamptz NOT NULL DEFAULT now(),
    models                   integer NOT NULL,
    sample_size              integer NOT NULL,
    precision_at_10          double precision,
    random_precision_at_10   double precision,
    colour_precision_at_10   double precision,
    tags_jaccard_at_10       double precision,
    coverage                 double precision NOT NULL,
    hubness_skewness         double precision NOT NULL,
    hubness_gini             double precision NOT NULL,
    near_duplicate_pairs     integer NOT NULL,
    metrics                  jsonb NOT NULL,
    PRIMARY KEY (feature_version, run_id)
);
CREATE INDEX IF NOT EXISTS similarity_quality_evaluated_at_idx ON similarity_quality (evaluated_at DESC);
