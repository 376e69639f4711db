-- The gallery's Quality page reads similarity_quality (sql/090) through the read-only role of
-- sql/102; where that role could not be created, there is nothing to grant.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'similarity_gallery_reader') THEN
        GRANT SELECT ON similarity_quality TO similarity_gallery_reader;
    END IF;
END $$;
