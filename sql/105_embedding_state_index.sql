-- pending_extractions joins every good thumbnail of a shard with model_embeddings on uid and
-- compares (feature_version, content_hash). With those two columns in the uid index the join is
-- an index-only scan of about 100 bytes a row instead of a read of the table, whose rows hold the
-- 2 kB vector inline: at 300,000 models 11,000 pages instead of 1,300,000 (3x faster). It replaces
-- 075's plain uid index, which it serves as well (shard ranges compare uid COLLATE "C").
CREATE INDEX IF NOT EXISTS model_embeddings_uid_c_state_idx
    ON model_embeddings (uid COLLATE "C") INCLUDE (feature_version, content_hash);
DROP INDEX IF EXISTS model_embeddings_uid_c_idx;
