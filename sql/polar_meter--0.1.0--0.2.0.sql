-- polar_meter 0.1.0 -> 0.2.0: key rotation with a grace period.
-- Released upgrade scripts are never edited; tests/e2e/tests/sql_upgrade.rs
-- checks that 0.1.0 + this script equals a fresh 0.2.0 install.

CREATE FUNCTION meter.rotate_api_key(id uuid, grace interval DEFAULT '1 day')
RETURNS TABLE (new_id uuid, key text, start text, old_key_expires_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    r       meter.api_key;
    v_new   record;
    v_until timestamptz;
BEGIN
    -- Bounded so a typo cannot leave a replaced secret valid for years.
    IF grace IS NULL OR grace < interval '0' OR grace > interval '30 days' THEN
        RAISE EXCEPTION USING ERRCODE = 'PM034', MESSAGE = 'grace must be between 0 and 30 days';
    END IF;
    SELECT * INTO r FROM meter.api_key k WHERE k.id = rotate_api_key.id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PM033', MESSAGE = format('api key %s does not exist', rotate_api_key.id);
    END IF;
    IF r.revoked_at IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PM003', MESSAGE = format('api key %s has been revoked: nothing to rotate', r.start);
    END IF;
    IF r.expires_at IS NOT NULL AND r.expires_at <= now() THEN
        RAISE EXCEPTION USING ERRCODE = 'PM004', MESSAGE = format('api key %s expired at %s: nothing to rotate', r.start, r.expires_at);
    END IF;

    SELECT c.id, c.key, c.start INTO v_new
    FROM meter.create_api_key(r.organization_id, r.name, r.permissions, r.expires_at) c;
    v_until := least(coalesce(r.expires_at, 'infinity'), now() + grace);
    UPDATE meter.api_key k SET expires_at = v_until WHERE k.id = r.id;

    PERFORM meter._audit(r.organization_id, 'api_key.rotated', r.id::text,
        jsonb_build_object('new_id', v_new.id, 'new_start', v_new.start, 'old_key_expires_at', v_until));
    RETURN QUERY SELECT v_new.id, v_new.key, v_new.start, v_until;
END
$$;
COMMENT ON FUNCTION meter.rotate_api_key(uuid, interval) IS
  'Replaces a key without downtime: creates a key with the same organization, name, permissions and expiry, returns (new_id, key, start, old_key_expires_at) with the plaintext shown this once, and lets the old key work for grace more (default 1 day, 0 to 30 days; never longer than it already had). Audited as api_key.rotated. Errors: PM033 no such key, PM003 revoked, PM004 expired, PM034 grace out of range.';

-- grants.sql, for the one new function: DBAs only, never the sidecar.
REVOKE ALL ON FUNCTION meter.rotate_api_key(uuid, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meter.rotate_api_key(uuid, interval) TO polar_meter_admin;
