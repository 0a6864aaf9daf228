-- polar_meter 0.2.0 -> 0.3.0, part 3 of 3 (hand-written): what needs 0.3.0's functions.

-- Tunables were GUCs up to 0.2. Values set for this database (ALTER DATABASE
-- ... SET polar_meter.x) or for the session running the upgrade move into
-- meter.setting_value; a value 0.3 would refuse is left out, with a NOTICE.
DO $$
DECLARE
    c record;
    v text;
BEGIN
    FOR c IN SELECT x.name FROM meter._setting_catalog() x LOOP
        v := nullif(current_setting('polar_meter.' || c.name, true), '');
        CONTINUE WHEN v IS NULL;
        BEGIN
            PERFORM meter.set_setting(c.name, v);
        EXCEPTION WHEN SQLSTATE 'PM039' THEN
            RAISE NOTICE 'polar_meter: setting % = % was not kept: %', c.name, v, SQLERRM;
        END;
    END LOOP;
END
$$;
