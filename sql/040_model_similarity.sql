-- The materialised exact top-N per model. Replaced in a single transaction, so
-- readers always see a complete table (the old one or the new one).
CREATE TABLE IF NOT EXISTS model_similarity (
    uid              text NOT NULL,
    rank             integer NOT NULL CHECK (rank >= 1),
    similar_uid      text NOT NULL,
    score            real NOT NULL,
    feature_version  text NOT NULL,
    PRIMARY KEY (uid, rank)
);

CREATE OR REPLACE FUNCTION similar_models(uid text, k integer DEFAULT 10)
RETURNS TABLE (rank integer, uid text, name text, score double precision, thumbnail_url text, viewer_url text)
LANGUAGE sql STABLE
-- Let a filtered HNSW scan keep searching until it has k rows (pgvector >= 0.8).
SET hnsw.iterative_scan = 'relaxed_order'
AS $$
    WITH materialised AS (
        SELECT s.rank, s.similar_uid AS uid, s.score::double precision AS score
        FROM model_similarity s
        WHERE s.uid = similar_models.uid
        ORDER BY s.rank
        LIMIT similar_models.k
    ),
    -- A model with a vector but no materialised rows yet: ask the HNSW index.
    searched AS (
        SELECT (row_number() OVER (ORDER BY n.distance, n.uid))::integer AS rank,
               n.uid, 1 - n.distance AS score
        FROM model_embeddings q
        CROSS JOIN LATERAL (
            SELECT e.uid, e.embedding <=> q.embedding AS distance
            FROM model_embeddings e
            WHERE e.uid <> q.uid AND e.feature_version = q.feature_version
            ORDER BY e.embedding <=> q.embedding
            LIMIT similar_models.k
        ) n
        WHERE q.uid = similar_models.uid
          AND NOT EXISTS (SELECT 1 FROM materialised)
    ),
    hits AS (
        SELECT * FROM materialised
        UNION ALL
        SELECT * FROM searched
    )
    SELECT h.rank, h.uid, m.name, h.score, t.source_url, m.viewer_url
    FROM hits h
    JOIN sketchfab_models m ON m.uid = h.uid
    LEFT JOIN model_thumbnails t ON t.uid = h.uid
    ORDER BY h.rank;
$$;

COMMENT ON FUNCTION similar_models(text, integer) IS
    'The k models that look most like the given one (cosine similarity of truncated-VGG16 features).';
