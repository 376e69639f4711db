-- One row per crawl attempt series: the checkpoint a killed or failed crawl resumes
-- from (window, filters, next page URL, counts so far), and afterwards its record.
-- run_key is the Airflow run (dag_id/run_id) or, outside Airflow, a key derived from
-- the window and filters; at most one unfinished crawl per key.
CREATE TABLE IF NOT EXISTS crawl_runs (
    id                   bigserial PRIMARY KEY,
    run_key              text NOT NULL,
    status               text NOT NULL CHECK (status IN ('running', 'failed', 'succeeded', 'superseded')),
    window_since         timestamptz,
    window_until         timestamptz,
    incremental          boolean NOT NULL,
    filters              jsonb NOT NULL,
    next_url             text,          -- the page to fetch next; NULL before the first page and at the end
    pages                integer NOT NULL DEFAULT 0,
    newest_published_at  timestamptz,   -- newest model seen in the window: the next watermark
    stats                jsonb NOT NULL DEFAULT '{}'::jsonb,
    attempts             integer NOT NULL DEFAULT 1,
    error                text,          -- why the last attempt failed
    started_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS crawl_runs_unfinished_key_idx
    ON crawl_runs (run_key) WHERE status IN ('running', 'failed');
CREATE INDEX IF NOT EXISTS crawl_runs_started_at_idx ON crawl_runs (started_at DESC);

-- Which crawl last saw a model: dedupes uids across shifting pages even after a resume.
ALTER TABLE sketchfab_models ADD COLUMN IF NOT EXISTS last_crawl_id bigint;

-- Which crawl last saw a rejected record, and when (a record rejected again is not duplicated).
ALTER TABLE crawl_rejects ADD COLUMN IF NOT EXISTS crawl_id bigint;
ALTER TABLE crawl_rejects ADD COLUMN IF NOT EXISTS last_seen_at timestamptz NOT NULL DEFAULT now();
