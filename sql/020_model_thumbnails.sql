-- The thumbnail chosen for each model and the outcome of fetching it.
CREATE TABLE IF NOT EXISTS model_thumbnails (
    uid           text PRIMARY KEY REFERENCES sketchfab_models (uid) ON DELETE CASCADE,
    source_url    text,          -- NULL when the model has no thumbnail at all
    content_hash  text,
    stored_path   text,
    width         integer,
    height        integer,
    status        text NOT NULL CHECK (status IN ('ok', 'failed')),
    error         text,
    attempts      integer NOT NULL DEFAULT 1,
    fetched_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'ok' OR (content_hash IS NOT NULL AND stored_path IS NOT NULL)),
    CHECK (status <> 'failed' OR error IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS model_thumbnails_status_idx ON model_thumbnails (status);
