-- One row per accepted Sketchfab model. Raw API JSON is kept so fields can be
-- re-derived later without re-crawling.
CREATE TABLE IF NOT EXISTS sketchfab_models (
    uid            text PRIMARY KEY CHECK (uid ~ '^[0-9a-f]{32}$'),
    name           text NOT NULL,
    author         text,
    published_at   timestamptz NOT NULL,
    like_count     integer NOT NULL DEFAULT 0,
    view_count     integer NOT NULL DEFAULT 0,
    tags           text[] NOT NULL DEFAULT '{}',
    categories     text[] NOT NULL DEFAULT '{}',
    viewer_url     text,
    thumbnails     jsonb NOT NULL DEFAULT '[]'::jsonb,
    raw            jsonb NOT NULL,
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    last_seen_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sketchfab_models_published_at_idx ON sketchfab_models (published_at DESC);

-- API records that could not be accepted, with the reason. Nothing is dropped silently.
CREATE TABLE IF NOT EXISTS crawl_rejects (
    id           bigserial PRIMARY KEY,
    raw          jsonb NOT NULL,
    reason       text NOT NULL,
    rejected_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS crawl_rejects_dedup_idx ON crawl_rejects (md5(raw::text), reason);

-- Pipeline bookkeeping: the crawl watermark (advanced only after a successful crawl),
-- the fingerprint of the inputs behind the current model_similarity.
CREATE TABLE IF NOT EXISTS pipeline_state (
    name        text PRIMARY KEY,
    value       jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
