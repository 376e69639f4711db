-- One L2-normalised truncated-VGG16 vector per model. content_hash ties the vector
-- to the exact thumbnail bytes it was computed from, so a changed thumbnail is re-extracted.
CREATE TABLE IF NOT EXISTS model_embeddings (
    uid              text PRIMARY KEY REFERENCES sketchfab_models (uid) ON DELETE CASCADE,
    embedding        vector(512) NOT NULL,
    feature_version  text NOT NULL,
    content_hash     text NOT NULL,
    extracted_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS model_embeddings_feature_version_idx ON model_embeddings (feature_version);
-- The approximate HNSW index for ad-hoc search (model_embeddings_hnsw_idx) is built by
-- load_vectors (plugins/sketchfab_similarity/vectors/hnsw.py) with the m and ef_construction
-- from settings, so its parameters live in one place.
