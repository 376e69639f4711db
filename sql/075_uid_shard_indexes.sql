-- Mapped tasks select their shard as a uid range compared byte-wise (core/sharding.py:
-- uid COLLATE "C" >= lo AND uid COLLATE "C" < hi). The primary keys use the database's
-- collation, which need not order like bytes, so these indexes serve the ranges in every
-- database; each shard then reads only its own rows.
CREATE INDEX IF NOT EXISTS sketchfab_models_uid_c_idx ON sketchfab_models (uid COLLATE "C");
CREATE INDEX IF NOT EXISTS model_thumbnails_uid_c_idx ON model_thumbnails (uid COLLATE "C");
CREATE INDEX IF NOT EXISTS model_embeddings_uid_c_idx ON model_embeddings (uid COLLATE "C");
