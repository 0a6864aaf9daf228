-- Provisioning of Polar customers. Delivery never waits for it: events carry
-- external_customer_id = organization.id, which Polar links once the customer
-- with that external_id exists.

CREATE FUNCTION meter._organization_inserted() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.polar_customer_id IS NULL THEN
        PERFORM pg_notify('meter_provision', NEW.id);
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION meter._organization_inserted() IS
  'Internal trigger: a new organization without a Polar customer wakes the sidecar (NOTIFY meter_provision). The row itself is the queued job.';
CREATE TRIGGER organization_provision AFTER INSERT ON meter.organization
    FOR EACH ROW EXECUTE FUNCTION meter._organization_inserted();

CREATE FUNCTION meter.claim_provisioning(max_orgs int DEFAULT 20, lease interval DEFAULT '2 minutes')
RETURNS TABLE (org_id text, name text, email text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
BEGIN
    RETURN QUERY
    WITH due AS (
        SELECT o.id FROM meter.organization o
        WHERE o.polar_customer_id IS NULL AND o.provision_next_at <= now()
        ORDER BY o.provision_next_at
        LIMIT max_orgs
        FOR UPDATE SKIP LOCKED
    )
    UPDATE meter.organization o SET provision_next_at = now() + lease
    FROM due WHERE o.id = due.id
    RETURNING o.id, o.name, o.email;
END
$$;
COMMENT ON FUNCTION meter.claim_provisioning(int, interval) IS
  'Claims up to max_orgs organizations that have no Polar customer and are due, under a lease; returns what the customer is created from.';

CREATE FUNCTION meter.customer_provisioned(org_id text, polar_customer_id text) RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    v_set boolean;
BEGIN
    UPDATE meter.organization o
    SET polar_customer_id = customer_provisioned.polar_customer_id, provision_error = NULL
    WHERE o.id = org_id AND o.polar_customer_id IS NULL
    RETURNING true INTO v_set;
    IF v_set THEN
        UPDATE meter.meter_event e SET polar_customer_id = customer_provisioned.polar_customer_id
        WHERE e.organization_id = org_id AND e.polar_customer_id IS NULL;
        PERFORM meter._audit(org_id, 'customer.provisioned', customer_provisioned.polar_customer_id, '{}');
    END IF;
    RETURN coalesce(v_set, false);
END
$$;
COMMENT ON FUNCTION meter.customer_provisioned(text, text) IS
  'Writes back the Polar customer id of an organization (once: an org that already has one is left alone) and onto its events. Returns whether it was set.';

CREATE FUNCTION meter.provisioning_failed(org_id text, error text) RETURNS timestamptz
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    v_next timestamptz;
BEGIN
    UPDATE meter.organization o
    SET provision_attempts = o.provision_attempts + 1,
        provision_error = left(error, 1000),
        provision_next_at = now() + meter.backoff_delay(o.provision_attempts + 1)
    WHERE o.id = org_id AND o.polar_customer_id IS NULL
    RETURNING o.provision_next_at INTO v_next;
    RETURN v_next;
END
$$;
COMMENT ON FUNCTION meter.provisioning_failed(text, text) IS
  'Records a failed customer creation; the org is retried after backoff_delay(attempts), without limit. Orgs unprovisioned too long raise customer_provisioning_failed (check_delivery_health). Returns the next try.';

CREATE FUNCTION meter.backfill_polar_customers() RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    n bigint;
BEGIN
    UPDATE meter.organization o SET provision_next_at = now()
    WHERE o.polar_customer_id IS NULL;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pg_notify('meter_provision', 'backfill');
    END IF;
    PERFORM meter._audit('', 'customers.backfill', NULL, jsonb_build_object('organizations', n));
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.backfill_polar_customers() IS
  'Queues provisioning now for every organization without a Polar customer (also `polar-meterd backfill`). Returns how many.';
