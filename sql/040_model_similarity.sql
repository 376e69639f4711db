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

-- similar_models(), the view and vector search for users: 061_similarity_sql.sql.
