-- Organizations and their Polar customers. An organization is billed at
-- Polar as a team customer with external_id = its id. The row is the job: it
-- is due for provisioning while it has no customer, or while Polar holds an
-- older version of it (customer_synced < customer_version). Wake-ups come
-- from the functions that change rows, never from triggers (a trigger on a
-- Citus reference table runs on every node, whose two-phase commit refuses NOTIFY).

CREATE FUNCTION meter._require_organization(org_id text) RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM meter.organization o WHERE o.id = _require_organization.org_id) THEN
        RAISE EXCEPTION USING ERRCODE = 'PM030', MESSAGE = format('org_id %L is not a known organization', org_id);
    END IF;
END
$$;
COMMENT ON FUNCTION meter._require_organization(text) IS 'Internal: raises PM030 unless the organization exists.';

CREATE FUNCTION meter.upsert_organization(
    id text,
    name text,
    email text DEFAULT NULL,
    owner_email text DEFAULT NULL,
    owner_name text DEFAULT NULL,
    owner_external_id text DEFAULT NULL
) RETURNS meter.organization
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
    v_old meter.organization;
    v_row meter.organization;
    v_changed boolean;
BEGIN
    PERFORM meter._raise(meter._organization_violation(upsert_organization.id, upsert_organization.name,
        upsert_organization.email, upsert_organization.owner_email, upsert_organization.owner_name,
        upsert_organization.owner_external_id));
    SELECT * INTO v_old FROM meter.organization o WHERE o.id = upsert_organization.id FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO meter.organization AS o (id, name, email, owner_email, owner_name, owner_external_id)
        VALUES (upsert_organization.id, upsert_organization.name, upsert_organization.email,
                upsert_organization.owner_email, upsert_organization.owner_name, upsert_organization.owner_external_id)
        RETURNING o.* INTO v_row;
        PERFORM meter._audit(v_row.id, 'organization.created', v_row.id,
            jsonb_build_object('name', v_row.name, 'email', v_row.email, 'owner_email', v_row.owner_email));
        PERFORM pg_notify('meter_provision', '');
        RETURN v_row;
    END IF;
    -- Polar keeps a name and an email per customer; the owner is a member it
    -- creates once, so an owner change is stored but not pushed.
    v_changed := (v_old.name, v_old.email) IS DISTINCT FROM (upsert_organization.name, upsert_organization.email);
    UPDATE meter.organization o
    SET name = upsert_organization.name, email = upsert_organization.email,
        owner_email = upsert_organization.owner_email, owner_name = upsert_organization.owner_name,
        owner_external_id = upsert_organization.owner_external_id, updated_at = v_now,
        customer_version = v_old.customer_version + CASE WHEN v_changed THEN 1 ELSE 0 END,
        provision_next_at = CASE WHEN v_changed THEN v_now ELSE v_old.provision_next_at END,
        provision_attempts = CASE WHEN v_changed THEN 0 ELSE v_old.provision_attempts END
    WHERE o.id = upsert_organization.id
    RETURNING o.* INTO v_row;
    PERFORM meter._audit(v_row.id, 'organization.updated', v_row.id,
        jsonb_build_object('name', v_row.name, 'email', v_row.email, 'owner_email', v_row.owner_email,
                           'pushed_to_polar', v_changed));
    IF v_changed OR v_row.polar_customer_id IS NULL THEN
        PERFORM pg_notify('meter_provision', '');
    END IF;
    RETURN v_row;
END
$$;
COMMENT ON FUNCTION meter.upsert_organization(text, text, text, text, text, text) IS
  'Creates or updates an organization (billed at Polar as a team customer with external_id = id). Polar''s rule applies: an email, or an owner with an email (PM036 otherwise, also for a bad id, name or email address). A new organization is provisioned at Polar; a changed name or email is pushed to its customer (PATCH) through the same queue. Audited. Returns the row.';

CREATE FUNCTION meter.claim_provisioning(max_orgs int DEFAULT 20, lease interval DEFAULT '2 minutes')
RETURNS TABLE (org_id text, action text, polar_customer_id text, name text, email text,
               owner_email text, owner_name text, owner_external_id text, customer_version int)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
    v_until timestamptz;
BEGIN
    v_until := meter._lease_until('max_orgs', max_orgs, lease);
    RETURN QUERY
    WITH due AS (
        SELECT o.id FROM meter.organization o
        WHERE (o.polar_customer_id IS NULL OR o.customer_synced < o.customer_version)
          AND o.provision_next_at <= v_now
          -- Polar refuses a team customer without an email or an owner: such
          -- a row waits for upsert_organization (customer_provisioning_failed says so).
          AND (o.email IS NOT NULL OR o.owner_email IS NOT NULL)
        ORDER BY o.provision_next_at
        LIMIT max_orgs
        FOR UPDATE SKIP LOCKED
    )
    UPDATE meter.organization o SET provision_next_at = v_until
    FROM due WHERE o.id = due.id
    RETURNING o.id, CASE WHEN o.polar_customer_id IS NULL THEN 'create' ELSE 'update' END, o.polar_customer_id,
              o.name, o.email, o.owner_email, o.owner_name, o.owner_external_id, o.customer_version;
END
$$;
COMMENT ON FUNCTION meter.claim_provisioning(int, interval) IS
  'Claims up to max_orgs organizations due at Polar under a lease: action create (no customer yet) or update (Polar holds an older name or email), with what the customer is made of and the version being sent.';

CREATE FUNCTION meter.customer_provisioned(org_id text, polar_customer_id text) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_set boolean;
BEGIN
    UPDATE meter.organization o
    SET polar_customer_id = customer_provisioned.polar_customer_id, provision_error = NULL,
        provision_attempts = 0, customer_synced = o.customer_version
    WHERE o.id = org_id AND o.polar_customer_id IS NULL
    RETURNING true INTO v_set;
    IF v_set THEN
        -- The organization's events may go out now (outbox.sql waits for this).
        UPDATE meter.meter_event e SET polar_customer_id = customer_provisioned.polar_customer_id
        WHERE e.organization_id = org_id AND e.polar_customer_id IS NULL;
        PERFORM meter._audit(org_id, 'customer.provisioned', customer_provisioned.polar_customer_id, '{}');
        PERFORM pg_notify('meter_outbox', '');
    END IF;
    RETURN coalesce(v_set, false);
END
$$;
COMMENT ON FUNCTION meter.customer_provisioned(text, text) IS
  'Writes back the Polar customer id of an organization (once: an org that already has one is left alone) and onto its events, whose delivery may then start. Returns whether it was set.';

CREATE FUNCTION meter.customer_synced(org_id text, customer_version int) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
BEGIN
    -- Only the version that was sent: a change made meanwhile stays due.
    UPDATE meter.organization o
    SET customer_synced = greatest(o.customer_synced, customer_synced.customer_version), provision_error = NULL,
        provision_attempts = 0
    WHERE o.id = org_id AND o.polar_customer_id IS NOT NULL;
    IF FOUND THEN
        PERFORM meter._audit(org_id, 'customer.updated', NULL, jsonb_build_object('version', customer_version));
    END IF;
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION meter.customer_synced(text, int) IS
  'Polar accepted the organization''s name and email as of customer_version (from claim_provisioning). Returns whether the organization exists with a customer.';

CREATE FUNCTION meter.provisioning_failed(org_id text, error text) RETURNS timestamptz
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
    v_attempts int;
    v_next timestamptz;
BEGIN
    SELECT o.provision_attempts + 1 INTO v_attempts FROM meter.organization o WHERE o.id = org_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    v_next := v_now + meter.backoff_delay(v_attempts);
    UPDATE meter.organization o
    SET provision_attempts = v_attempts, provision_error = left(error, 1000), provision_next_at = v_next
    WHERE o.id = org_id;
    RETURN v_next;
END
$$;
COMMENT ON FUNCTION meter.provisioning_failed(text, text) IS
  'Records that Polar refused or failed to create or update an organization''s customer; it is retried after backoff_delay(attempts), without limit. Organizations without a customer for too long raise customer_provisioning_failed (check_delivery_health). Returns the next try.';

CREATE FUNCTION meter.backfill_polar_customers() RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_now timestamptz := now();
    n bigint;
BEGIN
    UPDATE meter.organization o SET provision_next_at = v_now
    WHERE o.polar_customer_id IS NULL OR o.customer_synced < o.customer_version;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('meter_provision', '');
    END IF;
    PERFORM meter._audit('', 'customers.backfill', NULL, jsonb_build_object('organizations', n));
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.backfill_polar_customers() IS
  'Makes every organization without a Polar customer (or with changes Polar has not heard of) due now (also `polar-meterd backfill`). Returns how many.';
