-- What the crawler cleaned to accept a model (a name cut to 1024 characters, a count that was
-- not a number, a lone surrogate replaced): a JSON list of notes, NULL when nothing was cleaned.
-- The model is kept; only a bad uid or publication time makes a record a reject.
ALTER TABLE sketchfab_models ADD COLUMN IF NOT EXISTS cleaned jsonb;
