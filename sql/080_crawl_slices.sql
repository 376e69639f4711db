-- The slice map: how a listing larger than the API's cap (about 10,000 results per query) is
-- split into queries with extra filters (face-count ranges, then boolean facets) that each end
-- before the cap. Learned by the first crawl that meets the cap, reused by every later one.
-- scope: which listing is split ('' = the whole catalogue; otherwise the run's own filters).
-- filters: the slice's extra query filters, e.g. {"min_face_count": 0, "max_face_count": 1800};
-- the root slice is {} (the plain listing). A slice that reached the cap is 'split' and its
-- children cover its range; 'active' slices are the leaves paged by crawls; 'capped' ones could
-- not be split further (reported by the crawl that met them).
CREATE TABLE IF NOT EXISTS crawl_slices (
    id                bigserial PRIMARY KEY,
    scope             text NOT NULL,
    filters           jsonb NOT NULL,
    parent_id         bigint REFERENCES crawl_slices (id) ON DELETE CASCADE,
    status            text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'split', 'capped')),
    planned_sample    integer,        -- stored models in its range when it was planned (sizing estimate)
    last_size         integer,        -- records its listing held when last paged to the end
    last_complete_at  timestamptz,    -- when it was last paged to its end (rolling re-crawl order)
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS crawl_slices_scope_filters_idx ON crawl_slices (scope, filters);
CREATE INDEX IF NOT EXISTS crawl_slices_parent_idx ON crawl_slices (parent_id);

-- One row per slice a crawl pages: its own checkpoint (next page URL, counts), so a crawl killed
-- mid-way resumes slice by slice and page by page. kind 'window' stops at the crawl's window
-- start; 'full' pages to the end (bootstrap and re-crawls), which is when deletions are checked.
CREATE TABLE IF NOT EXISTS crawl_slice_passes (
    crawl_id     bigint NOT NULL REFERENCES crawl_runs (id) ON DELETE CASCADE,
    slice_id     bigint NOT NULL REFERENCES crawl_slices (id) ON DELETE CASCADE,
    seq          integer NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('window', 'full')),
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'checking', 'done', 'split', 'capped')),
    next_url     text,
    pages        integer NOT NULL DEFAULT 0,
    records      integer NOT NULL DEFAULT 0,
    stats        jsonb NOT NULL DEFAULT '{}'::jsonb,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (crawl_id, slice_id)
);
CREATE INDEX IF NOT EXISTS crawl_slice_passes_order_idx ON crawl_slice_passes (crawl_id, seq);

-- What the sliced part of a crawl decided once (its window, full re-crawl, re-crawl planned).
ALTER TABLE crawl_runs ADD COLUMN IF NOT EXISTS slicing jsonb;

-- Models gone from Sketchfab (404 on GET /v3/models/{uid} after missing from a fully paged
-- slice): kept for the record, never recommended, never downloaded again.
ALTER TABLE sketchfab_models ADD COLUMN IF NOT EXISTS deleted_at timestamptz;

-- faceCount from the raw record, for slice membership and for sizing new slices from what is stored.
ALTER TABLE sketchfab_models ADD COLUMN IF NOT EXISTS face_count bigint
    GENERATED ALWAYS AS (CASE WHEN raw->>'faceCount' ~ '^[0-9]{1,15}$' THEN (raw->>'faceCount')::bigint END) STORED;
CREATE INDEX IF NOT EXISTS sketchfab_models_face_count_idx ON sketchfab_models (face_count)
    WHERE deleted_at IS NULL;
