-- The gallery's name search is a case-insensitive substring match (ILIKE '%text%'), which only a
-- trigram index serves; without one every search reads the whole table. pg_trgm ships with
-- Postgres' contrib modules; where it is not installed (the embedded test server) the search
-- stays a scan and this file only says so.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm') THEN
        CREATE EXTENSION IF NOT EXISTS pg_trgm;
        CREATE INDEX IF NOT EXISTS sketchfab_models_name_trgm_idx ON sketchfab_models USING gin (name gin_trgm_ops);
    ELSE
        RAISE NOTICE 'pg_trgm is not available: the gallery name search scans sketchfab_models';
    END IF;
END $$;
