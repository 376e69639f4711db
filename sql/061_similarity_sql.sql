-- SQL for users: recommendations by uid, a browsable view, and ad-hoc vector search.
-- similar_models() keeps the signature and columns it had in earlier releases.

-- Index search for a model that has a vector but no list yet (similar_models() falls back to it).
-- hnsw.ef_search is set from the pipeline's settings (similarity_hnsw_ef_search) by load_vectors.
CREATE OR REPLACE FUNCTION similar_models_search(uid text, k integer DEFAULT 10)
RETURNS TABLE (rank integer, uid text, name text, score double precision, thumbnail_url text, viewer_url text)
LANGUAGE sql STABLE PARALLEL SAFE
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = 100
AS $$
    SELECT (row_number() OVER (ORDER BY n.distance, n.uid))::integer, n.uid, m.name, 1 - n.distance,
           t.source_url, m.viewer_url
    FROM model_embeddings q
    CROSS JOIN LATERAL (
        SELECT e.uid, e.embedding <=> q.embedding AS distance
        FROM model_embeddings e
        WHERE e.uid <> q.uid AND e.feature_version = q.feature_version
        ORDER BY e.embedding <=> q.embedding
        LIMIT similar_models_search.k
    ) n
    JOIN sketchfab_models m ON m.uid = n.uid
    LEFT JOIN model_thumbnails t ON t.uid = n.uid
    WHERE q.uid = similar_models_search.uid
    ORDER BY n.distance, n.uid;
$$;

-- The k most similar models, read from the materialised exact top-N (k is capped by
-- similarity_top_n); a model with a vector but no list yet is answered from the HNSW index; an
-- unknown uid gives no rows. Models deleted since the last refresh are skipped, so the list stays
-- k long while the table holds more than k. Plain SQL without SET clauses: the planner inlines it.
CREATE OR REPLACE FUNCTION similar_models(uid text, k integer DEFAULT 10)
RETURNS TABLE (rank integer, uid text, name text, score double precision, thumbnail_url text, viewer_url text)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT * FROM (
        (SELECT (row_number() OVER (ORDER BY s.rank))::integer AS rank, s.similar_uid AS uid, m.name,
                s.score::double precision AS score, t.source_url AS thumbnail_url, m.viewer_url
         FROM model_similarity s
         JOIN sketchfab_models m ON m.uid = s.similar_uid
         LEFT JOIN model_thumbnails t ON t.uid = s.similar_uid
         WHERE s.uid = similar_models.uid
         ORDER BY s.rank
         LIMIT similar_models.k)
        UNION ALL
        SELECT * FROM similar_models_search(similar_models.uid, similar_models.k)
        WHERE NOT EXISTS (SELECT 1 FROM model_similarity x WHERE x.uid = similar_models.uid)
    ) hits
    ORDER BY hits.rank;
$$;

COMMENT ON FUNCTION similar_models(text, integer) IS
    'The k models that look most like the given one (exact cosine similarity of truncated-VGG16 features, '
    'from model_similarity; HNSW search for a model whose list is not computed yet; no rows for an unknown uid).';

-- Every recommendation with both models' metadata, for browsing and joins.
CREATE OR REPLACE VIEW model_recommendations AS
SELECT s.uid,
       m.name,
       s.rank,
       s.similar_uid,
       sm.name        AS similar_name,
       s.score,
       t.source_url   AS similar_thumbnail_url,
       sm.viewer_url  AS similar_viewer_url,
       s.feature_version
FROM model_similarity s
JOIN sketchfab_models m ON m.uid = s.uid
JOIN sketchfab_models sm ON sm.uid = s.similar_uid
LEFT JOIN model_thumbnails t ON t.uid = s.similar_uid;

COMMENT ON VIEW model_recommendations IS
    'model_similarity joined with the names, thumbnails and viewer URLs of both models.';

-- Ad-hoc search: the k models whose vectors are closest to any 512-d vector (cosine), through
-- the HNSW index (approximate; recall is set by hnsw.ef_search). Only vectors of the feature
-- version behind model_similarity are searched, unless another version is given.
CREATE OR REPLACE FUNCTION similar_to_vector(query vector, k integer DEFAULT 10, feature_version text DEFAULT NULL)
RETURNS TABLE (rank integer, uid text, name text, score double precision, thumbnail_url text, viewer_url text)
LANGUAGE sql STABLE PARALLEL SAFE
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = 100
AS $$
    WITH version AS (
        SELECT coalesce(
            similar_to_vector.feature_version,
            (SELECT value->>'feature_version' FROM pipeline_state WHERE name = 'similarity')
        ) AS v
    ),
    hits AS (
        SELECT e.uid, e.embedding <=> similar_to_vector.query AS distance
        FROM model_embeddings e, version
        WHERE e.feature_version = version.v
        ORDER BY e.embedding <=> similar_to_vector.query
        LIMIT similar_to_vector.k
    )
    SELECT (row_number() OVER (ORDER BY h.distance, h.uid))::integer, h.uid, m.name, 1 - h.distance,
           t.source_url, m.viewer_url
    FROM hits h
    JOIN sketchfab_models m ON m.uid = h.uid
    LEFT JOIN model_thumbnails t ON t.uid = h.uid
    ORDER BY h.distance, h.uid;
$$;

COMMENT ON FUNCTION similar_to_vector(vector, integer, text) IS
    'The k models closest to a given vector (cosine, HNSW index, approximate); '
    'feature_version defaults to the one behind model_similarity.';
