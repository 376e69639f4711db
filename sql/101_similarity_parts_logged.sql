-- Part records of a refresh must survive a server crash: if they vanished with the unlogged
-- staging tables, the remaining parts would each wait for parts that already "finished" and
-- nothing would ever be published while every task succeeded. Logged, they survive, and the
-- publishing part compares the lists they staged (lists) with what staging still holds.
-- similarity_parts is used by refresh tasks only: its rewrite blocks no reader.
DO $$
BEGIN
    IF (SELECT relpersistence FROM pg_class WHERE oid = 'similarity_parts'::regclass) = 'u' THEN
        ALTER TABLE similarity_parts SET LOGGED;
    END IF;
END $$;
ALTER TABLE similarity_parts ADD COLUMN IF NOT EXISTS lists integer NOT NULL DEFAULT 0;
