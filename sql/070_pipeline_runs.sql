-- One row per finished DAG run: what it did (the counts its tasks returned as XCom).
-- Written by the run's last task; a rerun of the same run replaces its row.
CREATE TABLE IF NOT EXISTS pipeline_runs (
    dag_id               text NOT NULL,
    run_id               text NOT NULL,
    run_type             text NOT NULL,
    data_interval_start  timestamptz,
    data_interval_end    timestamptz,
    feature_version      text,
    counts               jsonb NOT NULL,
    finished_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dag_id, run_id)
);
CREATE INDEX IF NOT EXISTS pipeline_runs_finished_at_idx ON pipeline_runs (finished_at DESC);

-- What the tables hold right now, for the gallery's overview and for a quick look in psql:
--   SELECT * FROM pipeline_overview;
CREATE OR REPLACE VIEW pipeline_overview AS
SELECT
    (SELECT count(*) FROM sketchfab_models)                                AS models,
    (SELECT count(*) FROM crawl_rejects)                                   AS crawl_rejects,
    (SELECT count(*) FROM model_thumbnails WHERE status = 'ok')            AS thumbnails_ok,
    (SELECT count(*) FROM model_thumbnails WHERE status = 'failed')        AS thumbnails_failed,
    (SELECT count(*) FROM model_embeddings)                                AS vectors,
    (SELECT count(DISTINCT uid) FROM model_similarity)                     AS models_with_recommendations,
    (SELECT feature_version FROM model_similarity LIMIT 1)                 AS feature_version,
    (SELECT max(published_at) FROM sketchfab_models)                       AS newest_model_published_at,
    (SELECT run_id FROM pipeline_runs ORDER BY finished_at DESC LIMIT 1)   AS latest_run_id,
    (SELECT finished_at FROM pipeline_runs ORDER BY finished_at DESC LIMIT 1) AS latest_run_finished_at;
