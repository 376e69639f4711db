-- The gallery reads through this role (Settings.gallery_db_role, Variable
-- similarity_gallery_db_role): SELECT on what it shows, nothing else, so a bug in the gallery
-- cannot write or drop anything. The role cannot log in; the gallery's connection switches to it
-- (`-c role=...`), which needs the connecting user to be a member (or the owner, a superuser).
-- Creating a role needs CREATEROLE: without it this file only says so, and the gallery
-- must be given an existing read-only role or none (similarity_gallery_db_role = '').
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'similarity_gallery_reader') THEN
        IF NOT (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) THEN
            RAISE NOTICE 'cannot create role similarity_gallery_reader (no CREATEROLE): create it by hand';
            RETURN;
        END IF;
        BEGIN
            CREATE ROLE similarity_gallery_reader NOLOGIN;
        EXCEPTION WHEN duplicate_object THEN
            NULL;  -- another database of the same server created it meanwhile
        END;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO similarity_gallery_reader', current_schema());
    GRANT SELECT ON sketchfab_models, model_thumbnails, model_embeddings, model_similarity,
                    pipeline_runs, pipeline_overview, crawl_rejects
        TO similarity_gallery_reader;
    IF current_user <> 'similarity_gallery_reader' AND NOT pg_has_role(current_user, 'similarity_gallery_reader', 'MEMBER') THEN
        EXECUTE format('GRANT similarity_gallery_reader TO %I', current_user);
    END IF;
END $$;
