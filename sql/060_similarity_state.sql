-- Bookkeeping that makes refresh_similarity incremental and scalable.

-- One row per model with a published top-N list: the vector the list was computed from
-- (hash of its float32 bytes) and the list's last entry. A refresh compares these with
-- model_embeddings to find new, changed and removed vectors, and a new model enters an
-- existing list only if it beats (last_score, last_uid). Written in the same transaction
-- as model_similarity, so the two always agree.
CREATE TABLE IF NOT EXISTS similarity_members (
    uid          text PRIMARY KEY,
    vector_hash  bigint NOT NULL,
    list_length  integer NOT NULL CHECK (list_length >= 0),
    last_score   real,
    last_uid     text
);

-- A refresh rewrites changed ranks in place; free space on each page lets most of those
-- updates stay heap-only (no index writes). Applies to pages written from now on.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_class
                   WHERE oid = 'model_similarity'::regclass AND 'fillfactor=80' = ANY (reloptions)) THEN
        ALTER TABLE model_similarity SET (fillfactor = 80);
    END IF;
END $$;

-- Lists computed by (possibly parallel) refresh tasks wait here until one publish moves
-- them into model_similarity. UNLOGGED: no WAL for throw-away rows; a server crash empties
-- them, which only means the refresh is redone.
CREATE UNLOGGED TABLE IF NOT EXISTS similarity_staging (
    plan_id      text NOT NULL,
    part         integer NOT NULL,
    uid          text NOT NULL,
    rank         integer NOT NULL,
    similar_uid  text NOT NULL,
    score        real NOT NULL
);

-- One row per staged list (also for lists that are empty), with what similarity_members needs.
CREATE UNLOGGED TABLE IF NOT EXISTS similarity_staging_lists (
    plan_id      text NOT NULL,
    part         integer NOT NULL,
    uid          text NOT NULL,
    vector_hash  bigint NOT NULL,
    list_length  integer NOT NULL,
    last_score   real,
    last_uid     text,
    PRIMARY KEY (plan_id, uid)
);

-- Which parts of a refresh run have finished; the last one to finish publishes.
CREATE UNLOGGED TABLE IF NOT EXISTS similarity_parts (
    run_key      text NOT NULL,
    part         integer NOT NULL,
    parts        integer NOT NULL,
    plan_id      text NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_key, part)
);
