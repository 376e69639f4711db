-- Keep 512-d vectors (2 KB) inline in the table instead of TOASTed out of line: a refresh
-- reads every vector, and inline rows read (and load) without a TOAST index lookup each.
-- Applies to rows written from now on.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = 'model_embeddings'::regclass AND attname = 'embedding' AND attstorage <> 'p') THEN
        ALTER TABLE model_embeddings ALTER COLUMN embedding SET STORAGE PLAIN;
    END IF;
END $$;
