-- plan_downloads read every model with its thumbnail row on every run (a full scan, 6.7 s at 1M)
-- to find the few that need a download. `thumbnails_due` lists the models whose thumbnail must
-- be looked at again: new models, models whose thumbnail list changed or that came back after a
-- deletion (triggers on sketchfab_models), models whose thumbnail row was removed (trigger on
-- model_thumbnails), and every model when the plan's settings change (plan_downloads). The plan
-- reads only listed models and removes each one it finds needing nothing (up to date, permanent
-- failure, attempts exhausted), so a run costs what changed. A separate table rather than a flag
-- on sketchfab_models: settling a model deletes one small row instead of rewriting a wide row and
-- every index of the models table. Every model is listed once here, so the first plan after this
-- migration looks at each of them.
CREATE TABLE IF NOT EXISTS thumbnails_due (
    uid  text PRIMARY KEY
);

CREATE OR REPLACE FUNCTION list_thumbnail_due() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO thumbnails_due (uid) VALUES (coalesce(NEW.uid, OLD.uid)) ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS sketchfab_models_new_due ON sketchfab_models;
CREATE TRIGGER sketchfab_models_new_due AFTER INSERT ON sketchfab_models
    FOR EACH ROW EXECUTE FUNCTION list_thumbnail_due();

DROP TRIGGER IF EXISTS sketchfab_models_changed_due ON sketchfab_models;
CREATE TRIGGER sketchfab_models_changed_due AFTER UPDATE OF thumbnails, deleted_at ON sketchfab_models
    FOR EACH ROW
    WHEN (OLD.thumbnails IS DISTINCT FROM NEW.thumbnails OR (OLD.deleted_at IS NOT NULL AND NEW.deleted_at IS NULL))
    EXECUTE FUNCTION list_thumbnail_due();

DROP TRIGGER IF EXISTS model_thumbnails_removed_due ON model_thumbnails;
CREATE TRIGGER model_thumbnails_removed_due AFTER DELETE ON model_thumbnails
    FOR EACH ROW EXECUTE FUNCTION list_thumbnail_due();

INSERT INTO thumbnails_due (uid) SELECT uid FROM sketchfab_models WHERE deleted_at IS NULL ON CONFLICT DO NOTHING;
