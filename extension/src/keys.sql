-- API keys: create, list, revoke, rotate, verify. The plaintext key exists
-- only in create_api_key's result; the table keeps sha256(key).

CREATE FUNCTION meter.known_permissions() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ARRAY['fence:meter', 'keys:manage'] $$;
COMMENT ON FUNCTION meter.known_permissions() IS
  'Permissions a key can hold: fence:meter (record events), keys:manage (manage its org''s keys over HTTP).';

CREATE FUNCTION meter._create_api_key(
    org_id text,
    name text,
    permissions text[],
    expires_at timestamptz,
    minted_by uuid
) RETURNS TABLE (id uuid, key text, start text)
LANGUAGE plpgsql
AS $$
DECLARE
    v_key   text := meter._generate_api_key();
    v_start text := meter._api_key_start(v_key);
    v_hash  bytea := meter._key_hash(v_key);
    v_perms text[];
    v_id    uuid;
    v_minter_start text;
BEGIN
    PERFORM meter._require_organization(org_id);
    IF _create_api_key.name IS NULL OR length(btrim(_create_api_key.name)) NOT BETWEEN 1 AND 128 THEN
        RAISE EXCEPTION USING ERRCODE = 'PM032', MESSAGE = 'name must be 1 to 128 characters, not blank';
    END IF;
    IF _create_api_key.permissions IS NULL OR cardinality(_create_api_key.permissions) = 0
       OR array_position(_create_api_key.permissions, NULL) IS NOT NULL
       OR NOT _create_api_key.permissions <@ meter.known_permissions() THEN
        RAISE EXCEPTION USING ERRCODE = 'PM031',
            MESSAGE = format('permissions must name one or more of %s (got %s)', meter.known_permissions(), _create_api_key.permissions);
    END IF;
    IF _create_api_key.expires_at IS NOT NULL AND _create_api_key.expires_at <= now() THEN
        RAISE EXCEPTION USING ERRCODE = 'PM034', MESSAGE = 'expires_at must be in the future';
    END IF;
    -- Computed first: no subquery inside INSERT ... VALUES (Citus refuses it).
    SELECT array_agg(DISTINCT p ORDER BY p) INTO v_perms FROM unnest(_create_api_key.permissions) p;
    SELECT k.start INTO v_minter_start FROM meter.api_key k WHERE k.id = _create_api_key.minted_by;
    INSERT INTO meter.api_key (organization_id, name, start, key_hash, permissions, expires_at, minted_by)
    VALUES (org_id, _create_api_key.name, v_start, v_hash, v_perms, _create_api_key.expires_at, _create_api_key.minted_by)
    RETURNING api_key.id INTO v_id;

    -- The audit row names the minting key: what a stolen key created can be told.
    PERFORM meter._audit(org_id, 'api_key.created', v_id::text,
        jsonb_build_object('name', _create_api_key.name, 'start', v_start,
                           'permissions', v_perms, 'expires_at', _create_api_key.expires_at)
        || CASE WHEN _create_api_key.minted_by IS NULL THEN '{}'::jsonb
                ELSE jsonb_build_object('minted_by', _create_api_key.minted_by, 'minted_by_start', v_minter_start) END);
    RETURN QUERY SELECT v_id, v_key, v_start;
END
$$;
COMMENT ON FUNCTION meter._create_api_key(text, text, text[], timestamptz, uuid) IS
  'Internal: creates a key (see create_api_key) minted by another key (NULL: a root, made by a DBA), recording the minter on the key and in the api_key.created audit row.';

CREATE FUNCTION meter.create_api_key(
    org_id text,
    name text,
    permissions text[] DEFAULT '{fence:meter}',
    expires_at timestamptz DEFAULT NULL
) RETURNS TABLE (id uuid, key text, start text)
LANGUAGE sql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
    SELECT * FROM meter._create_api_key(org_id, name, permissions, expires_at, NULL)
$$;
COMMENT ON FUNCTION meter.create_api_key(text, text, text[], timestamptz) IS
  'Creates an API key for an organization and returns (id, key, start). The plaintext key is returned this once and never stored: only its SHA-256 is kept. A key made here is a root: it was minted by no other key. Errors: PM030 unknown org, PM031 bad permissions, PM032 bad name, PM034 expires_at not in the future.';

CREATE FUNCTION meter.list_api_keys(org_id text)
RETURNS TABLE (id uuid, name text, start text, permissions text[], created_at timestamptz,
               expires_at timestamptz, revoked_at timestamptz, last_used_at timestamptz)
LANGUAGE sql
STABLE
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
    SELECT k.id, k.name, k.start, k.permissions, k.created_at, k.expires_at, k.revoked_at, u.last_used_at
    FROM meter.api_key k
    LEFT JOIN meter.api_key_usage u ON u.organization_id = k.organization_id AND u.api_key_id = k.id
    WHERE k.organization_id = org_id
    ORDER BY k.created_at, k.id
$$;
COMMENT ON FUNCTION meter.list_api_keys(text) IS
  'The keys of an organization, newest last, with when each was last used (to the minute). Never returns hashes or keys, only the start hint.';

CREATE FUNCTION meter.revoke_api_key(id uuid) RETURNS timestamptz
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
    v_org text;
    v_revoked timestamptz;
    v_frontier uuid[] := ARRAY[revoke_api_key.id];
    v_next uuid[];
    r record;
BEGIN
    SELECT k.organization_id, k.revoked_at INTO v_org, v_revoked FROM meter.api_key k
    WHERE k.id = revoke_api_key.id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PM033', MESSAGE = format('api key %s does not exist', revoke_api_key.id);
    END IF;
    IF v_revoked IS NULL THEN
        v_revoked := v_now;
        UPDATE meter.api_key k SET revoked_at = v_revoked WHERE k.id = revoke_api_key.id;
    END IF;
    PERFORM meter._audit(v_org, 'api_key.revoked', revoke_api_key.id::text, '{}');
    -- What a key minted dies with it, and what those minted, and so on: a
    -- stolen keys:manage key cannot leave heirs behind once revoked. A level
    -- at a time (no recursive CTE: Citus cannot run one), each key once.
    LOOP
        v_next := '{}';
        FOR r IN UPDATE meter.api_key k SET revoked_at = v_now
                 WHERE k.minted_by = ANY (v_frontier) AND k.revoked_at IS NULL
                 RETURNING k.organization_id, k.id LOOP
            PERFORM meter._audit(r.organization_id, 'api_key.revoked', r.id::text,
                                 jsonb_build_object('with', revoke_api_key.id));
            v_next := v_next || r.id;
        END LOOP;
        EXIT WHEN cardinality(v_next) = 0;
        v_frontier := v_next;
    END LOOP;
    RETURN v_revoked;
END
$$;
COMMENT ON FUNCTION meter.revoke_api_key(uuid) IS
  'Revokes a key and every key it minted, transitively (each with an audit row api_key.revoked); the very next verify_api_key or record_event with any of them fails with PM003. Idempotent: returns when the key was revoked. PM033 if no such key.';

CREATE FUNCTION meter.rotate_api_key(id uuid, grace interval DEFAULT '1 day')
RETURNS TABLE (new_id uuid, key text, start text, old_key_expires_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    r       meter.api_key;
    v_new   record;
    v_until timestamptz;
BEGIN
    -- Bounded so a typo cannot leave a replaced secret valid for years.
    IF grace IS NULL OR grace < interval '0' OR grace > interval '30 days' THEN
        RAISE EXCEPTION USING ERRCODE = 'PM037', MESSAGE = 'grace must be between 0 and 30 days';
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
    -- A second rotation would copy the grace period's end as the new key's
    -- expiry: the replacement would die with the old key.
    IF r.replaced_by IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PM007',
            MESSAGE = format('api key %s was already rotated (its replacement is %s): rotate that one instead', r.start, r.replaced_by);
    END IF;

    -- The replacement takes its predecessor's place: the same minter, and
    -- the keys the old one minted now hang from it.
    SELECT c.id, c.key, c.start INTO v_new
    FROM meter._create_api_key(r.organization_id, r.name, r.permissions, r.expires_at, r.minted_by) c;
    v_until := least(coalesce(r.expires_at, 'infinity'), now() + grace);
    UPDATE meter.api_key k SET expires_at = v_until, replaced_by = v_new.id WHERE k.id = r.id;
    UPDATE meter.api_key k SET minted_by = v_new.id WHERE k.minted_by = r.id;

    PERFORM meter._audit(r.organization_id, 'api_key.rotated', r.id::text,
        jsonb_build_object('new_id', v_new.id, 'new_start', v_new.start, 'old_key_expires_at', v_until));
    RETURN QUERY SELECT v_new.id, v_new.key, v_new.start, v_until;
END
$$;
COMMENT ON FUNCTION meter.rotate_api_key(uuid, interval) IS
  'Replaces a key without downtime: creates a key with the same organization, name, permissions and expiry, returns (new_id, key, start, old_key_expires_at) with the plaintext shown this once, and lets the old key work for grace more (default 1 day, 0 to 30 days; never longer than it already had). The replacement takes the old key''s place: the same minter, and the keys the old one minted hang from it. A key is rotated once (PM007 after: rotate its replacement). Audited as api_key.rotated. Errors: PM033 no such key, PM003 revoked, PM004 expired, PM007 already rotated, PM037 grace out of range.';

CREATE FUNCTION meter._verify_api_key(key text, permission text)
RETURNS meter.key_identity
LANGUAGE plpgsql
-- Internal: called by SECURITY DEFINER functions that already set the
-- search_path, so it pays for no second switch on the hot path.
AS $$
DECLARE
    r      meter.api_key;
    v_hash bytea;
    v_now  timestamptz := now();
    v_last timestamptz;
BEGIN
    -- Shape first: a malformed key never costs a lookup. Messages never echo the key.
    IF key IS NULL OR NOT meter._api_key_wellformed(key) THEN
        RAISE EXCEPTION USING ERRCODE = 'PM001', MESSAGE = 'api key is malformed: expected ak_ followed by 48 base62 characters';
    END IF;
    -- Hot path: values are computed into variables first, which plpgsql
    -- evaluates as plain expressions; the query then only compares.
    v_hash := meter._key_hash(key);
    SELECT * INTO r FROM meter.api_key k WHERE k.key_hash = v_hash;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'PM002', MESSAGE = 'api key is not known';
    END IF;
    IF r.revoked_at IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PM003', MESSAGE = format('api key %s has been revoked', r.start);
    END IF;
    IF r.expires_at IS NOT NULL AND r.expires_at <= v_now THEN
        RAISE EXCEPTION USING ERRCODE = 'PM004', MESSAGE = format('api key %s expired at %s', r.start, r.expires_at);
    END IF;
    -- Fails closed: a NULL permission, or an array position that is not
    -- found, is a refusal (never `NOT (p = ANY (...))`, NULL when a NULL is inside).
    IF permission IS NULL OR array_position(r.permissions, permission) IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'PM005',
            MESSAGE = format('api key %s lacks the permission %s', r.start, coalesce(permission, '(none named)'));
    END IF;
    -- At most one write a minute per key, to a per-organization row; a row
    -- busy in another transaction is skipped, not waited for.
    SELECT u.last_used_at INTO v_last FROM meter.api_key_usage u
    WHERE u.organization_id = r.organization_id AND u.api_key_id = r.id;
    IF NOT FOUND THEN
        INSERT INTO meter.api_key_usage (organization_id, api_key_id, last_used_at)
        VALUES (r.organization_id, r.id, v_now) ON CONFLICT DO NOTHING;
    ELSIF v_last < v_now - interval '1 minute' THEN
        v_last := v_now - interval '1 minute';
        UPDATE meter.api_key_usage u SET last_used_at = v_now
        WHERE u.organization_id = r.organization_id
          AND u.api_key_id = (SELECT u2.api_key_id FROM meter.api_key_usage u2
                              WHERE u2.organization_id = r.organization_id AND u2.api_key_id = r.id
                                AND u2.last_used_at < v_last
                              FOR NO KEY UPDATE SKIP LOCKED);
    END IF;
    RETURN ROW(r.organization_id, r.id)::meter.key_identity;
END
$$;
COMMENT ON FUNCTION meter._verify_api_key(text, text) IS
  'Internal: verify_api_key without the SECURITY DEFINER switch, for functions that already made it.';

CREATE FUNCTION meter.verify_api_key(key text, permission text DEFAULT 'fence:meter')
RETURNS meter.key_identity
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
BEGIN
    RETURN meter._verify_api_key(key, permission);
END
$$;
COMMENT ON FUNCTION meter.verify_api_key(text, text) IS
  'Checks a key and a permission; returns (organization_id, api_key_id). Distinct SQLSTATEs: PM001 malformed, PM002 unknown, PM003 revoked, PM004 expired, PM005 missing permission (also when permission is NULL). Writes last_used_at at most once a minute per key.';

-- The same operations for the holder of a keys:manage key, confined to the
-- key's own organization. These are what the HTTP API calls (one call per
-- request); the first key of an org is made with create_api_key by a DBA.

CREATE FUNCTION meter.create_own_api_key(
    api_key text,
    name text,
    permissions text[] DEFAULT NULL,
    expires_at timestamptz DEFAULT NULL
) RETURNS TABLE (id uuid, key text, start text, granted text[], valid_until timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_me    meter.key_identity;
    v_minter meter.api_key;
    v_perms text[] := coalesce(create_own_api_key.permissions, '{fence:meter}');
    v_until timestamptz := create_own_api_key.expires_at;
BEGIN
    v_me := meter._verify_api_key(create_own_api_key.api_key, 'keys:manage');
    SELECT * INTO v_minter FROM meter.api_key k WHERE k.id = v_me.api_key_id;
    -- A key can hand on only what it holds, and for no longer than it lives.
    -- (Unknown permissions fall through to create_api_key's PM031.)
    IF v_perms <@ meter.known_permissions() AND NOT v_perms <@ v_minter.permissions THEN
        RAISE EXCEPTION USING ERRCODE = 'PM006',
            MESSAGE = format('permissions %s exceed what api key %s holds (%s)', v_perms, v_minter.start, v_minter.permissions);
    END IF;
    IF v_minter.expires_at IS NOT NULL THEN
        v_until := least(coalesce(v_until, 'infinity'), v_minter.expires_at);
    END IF;
    SELECT c.id, c.key, c.start INTO id, key, start
    FROM meter._create_api_key(v_me.organization_id, create_own_api_key.name, v_perms, v_until, v_me.api_key_id) c;
    -- A separate statement: the row inserted above is visible only from here.
    SELECT k.permissions, k.expires_at INTO granted, valid_until FROM meter.api_key k WHERE k.id = create_own_api_key.id;
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION meter.create_own_api_key(text, text, text[], timestamptz) IS
  'create_api_key for the organization of api_key, which must hold keys:manage (PM001-PM005 otherwise). permissions default to {fence:meter} and must be ones api_key holds (PM006); the expiry is clamped to api_key''s own. The new key records api_key as its minter (and the audit row names it): revoking api_key revokes it too. Returns the new key once, with the permissions it was granted and its expiry.';

CREATE FUNCTION meter.list_own_api_keys(api_key text)
RETURNS TABLE (id uuid, name text, start text, permissions text[], created_at timestamptz,
               expires_at timestamptz, revoked_at timestamptz, last_used_at timestamptz)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_org text;
BEGIN
    v_org := (meter._verify_api_key(list_own_api_keys.api_key, 'keys:manage')).organization_id;
    RETURN QUERY SELECT * FROM meter.list_api_keys(v_org);
END
$$;
COMMENT ON FUNCTION meter.list_own_api_keys(text) IS
  'list_api_keys for the organization of api_key, which must hold keys:manage. No hashes.';

CREATE FUNCTION meter.revoke_own_api_key(api_key text, id uuid) RETURNS timestamptz
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_org text;
BEGIN
    v_org := (meter._verify_api_key(revoke_own_api_key.api_key, 'keys:manage')).organization_id;
    -- Another org's key is reported exactly like a missing one: no probing.
    IF NOT EXISTS (SELECT 1 FROM meter.api_key k WHERE k.id = revoke_own_api_key.id AND k.organization_id = v_org) THEN
        RAISE EXCEPTION USING ERRCODE = 'PM033', MESSAGE = format('api key %s does not exist', revoke_own_api_key.id);
    END IF;
    RETURN meter.revoke_api_key(revoke_own_api_key.id);
END
$$;
COMMENT ON FUNCTION meter.revoke_own_api_key(text, uuid) IS
  'revoke_api_key confined to the organization of api_key, which must hold keys:manage. A key of another org is PM033, as if it did not exist.';

CREATE FUNCTION meter.extension_version() RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'polar_meter' $$;
COMMENT ON FUNCTION meter.extension_version() IS
  'The installed polar_meter version; polar-meterd''s /readyz checks it against the range it supports.';

CREATE FUNCTION meter.oldest_supported_sidecar() RETURNS text
LANGUAGE sql IMMUTABLE
AS $$ SELECT '0.3.0'::text $$;
COMMENT ON FUNCTION meter.oldest_supported_sidecar() IS
  'The oldest polar-meterd whose SQL calls this extension version still serves. A sidecar older than its own minimum reports not ready; a newer extension that still serves it keeps it in rotation (rolling upgrades: extension first, then sidecars).';
