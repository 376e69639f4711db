-- similar_models() joins each of its k rows to sketchfab_models and to model_thumbnails by uid:
-- 2k equality probes per call, most of its cost. A hash index answers such a probe from one
-- bucket page (its metapage is cached), where the primary key's btree descends root, inner and
-- leaf pages comparing text on each; the planner picks whichever is cheaper per query. Measured
-- with bench/bench_scale.py (queries). The primary keys stay: they enforce uniqueness, order the
-- ranges, and carry the foreign keys.
CREATE INDEX IF NOT EXISTS sketchfab_models_uid_hash_idx ON sketchfab_models USING hash (uid);
CREATE INDEX IF NOT EXISTS model_thumbnails_uid_hash_idx ON model_thumbnails USING hash (uid);
