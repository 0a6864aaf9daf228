-- Tunables. Defaults live in Rust (polar_meter_rules::settings); overrides in
-- meter.setting_value, written only by set_setting, which polar_meter_admin may run
-- and the sidecar may not (grants.sql): no session can widen a bound for itself.

-- plpgsql, not sql: a SQL function with a subquery is never inlined, and is
-- parsed and planned again on each call from a cached plan; this one keeps
-- its plan for the session, and recording reads a setting on every call.
CREATE FUNCTION meter._setting(name text) RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
DECLARE
    v text;
BEGIN
    SELECT s.value INTO v FROM meter.setting_value s WHERE s.name = _setting.name;
    RETURN coalesce(v, meter._setting_default(_setting.name));
END
$$;
COMMENT ON FUNCTION meter._setting(text) IS
  'Internal: the value of a setting: its row in meter.setting_value, else its default.';

CREATE FUNCTION meter.settings()
RETURNS TABLE (name text, value text, default_value text, kind text, min_value text, max_value text,
               changed_at timestamptz, changed_by text, description text)
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
    SELECT c.name, coalesce(s.value, c.default_value), c.default_value, c.kind, c.min_value, c.max_value,
           s.changed_at, s.changed_by, c.description
    FROM meter._setting_catalog() c LEFT JOIN meter.setting_value s ON s.name = c.name
    ORDER BY c.name
$$;
COMMENT ON FUNCTION meter.settings() IS
  'Every tunable with its current value, default, kind (interval, ratio, count), bounds, who changed it last and what it does.';

CREATE FUNCTION meter.set_setting(name text, value text) RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    c record;
    v_ok boolean;
BEGIN
    SELECT * INTO c FROM meter._setting_catalog() x WHERE x.name = set_setting.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PM038', MESSAGE = format('setting %L does not exist (see meter.settings())', set_setting.name);
    END IF;
    IF value IS NULL THEN
        -- Back to the default.
        DELETE FROM meter.setting_value s WHERE s.name = c.name;
        PERFORM meter._audit('', 'setting.reset', c.name, '{}');
        RETURN c.default_value;
    END IF;
    BEGIN
        v_ok := CASE c.kind
            WHEN 'interval' THEN value::interval BETWEEN c.min_value::interval AND c.max_value::interval
            ELSE value::numeric BETWEEN c.min_value::numeric AND c.max_value::numeric
                 AND (c.kind <> 'count' OR value::numeric = trunc(value::numeric))
        END;
    EXCEPTION WHEN data_exception THEN
        v_ok := false;
    END;
    IF NOT coalesce(v_ok, false) THEN
        RAISE EXCEPTION USING ERRCODE = 'PM039',
            MESSAGE = format('setting %s must be a %s between %s and %s (got %L)', c.name, c.kind, c.min_value, c.max_value, value);
    END IF;
    INSERT INTO meter.setting_value AS s (name, value) VALUES (c.name, value)
    ON CONFLICT ON CONSTRAINT setting_value_pkey DO UPDATE SET value = excluded.value, changed_at = excluded.changed_at, changed_by = excluded.changed_by;
    PERFORM meter._audit('', 'setting.changed', c.name, jsonb_build_object('value', value));
    RETURN value;
END
$$;
COMMENT ON FUNCTION meter.set_setting(text, text) IS
  'Sets a tunable (meter.settings() lists them); NULL restores the default. Checked against its kind and bounds: PM038 unknown name, PM039 bad value. Audited. Only polar_meter_admin (and superusers) may call it.';

-- Durations in the units Rust helpers take.
CREATE FUNCTION meter._interval_us(i interval) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT (extract(epoch FROM i) * 1000000)::bigint $$;
COMMENT ON FUNCTION meter._interval_us(interval) IS 'Internal: an interval in microseconds.';
