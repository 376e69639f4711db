-- A model found deleted on Sketchfab (crawl/deletions.py sets sketchfab_models.deleted_at and
-- removes its vector) leaves every list at the next refresh; until then similar_models() skips it,
-- as it skipped models whose row was gone before deletions became marks. The LIMIT applies after
-- the skip, so the list stays k long while the table holds more than k. Same signature and
-- columns, still plain SQL without SET clauses (the planner inlines it).
CREATE OR REPLACE FUNCTION similar_models(uid text, k integer DEFAULT 10)
RETURNS TABLE (rank integer, uid text, name text, score double precision, thumbnail_url text, viewer_url text)
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT * FROM (
        (SELECT (row_number() OVER (ORDER BY s.rank))::integer AS rank, s.similar_uid AS uid, m.name,
                s.score::double precision AS score, t.source_url AS thumbnail_url, m.viewer_url
         FROM model_similarity s
         JOIN sketchfab_models m ON m.uid = s.similar_uid AND m.deleted_at IS NULL
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
