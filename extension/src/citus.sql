-- Running on Citus. The schema is already shaped for it: every primary or
-- unique key of a per-organization table starts with organization_id, the
-- audit chain and its counter are per organization, and no hot-path
-- statement touches two organizations. meter.citus_distribute() turns that
-- into a distribution, once, on the coordinator.

CREATE FUNCTION meter._distributed() RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN false;
    END IF;
    -- Only reached with Citus installed: pg_dist_partition exists then.
    RETURN EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition p WHERE p.logicalrelid = 'meter.meter_event'::regclass);
END
$$;
COMMENT ON FUNCTION meter._distributed() IS
  'Internal: is meter_event distributed by Citus (meter.citus_distribute)? A few statements take another form there.';

CREATE FUNCTION meter.citus_distribute() RETURNS TABLE (table_name text, distribution text)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    -- Small, read on every call, written rarely: a copy on every node.
    v_reference text[] := ARRAY['setting_value', 'organization', 'api_key', 'polar_budget',
                                'audit_chain_legacy', 'reconcile_run'];
    -- Per organization: one shard each, all co-located with meter_event, so
    -- an organization's event, audit row, chain head and alerts are written
    -- on one worker in one transaction.
    v_distributed text[] := ARRAY['meter_event', 'api_key_usage', 'audit_log', 'audit_chain', 'alert_state',
                                  'alert', 'reconcile_count', 'reconcile_remote', 'reconcile_finding',
                                  'reconcile_dirty'];
    t text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RAISE EXCEPTION USING ERRCODE = 'PM072', MESSAGE = 'citus is not installed in this database: CREATE EXTENSION citus first';
    END IF;
    -- The append-only, no-delete and no-truncate triggers are the point of
    -- these tables; Citus keeps triggers on distributed tables only when told.
    PERFORM set_config('citus.enable_unsafe_triggers', 'on', true);
    -- api_key references organization. Making organization a reference table
    -- while api_key is still local would have Citus convert api_key to a
    -- "citus local" table, re-creating it on workers where the extension
    -- already created it. So the key is set aside (here and on the workers'
    -- copies) and put back once both are reference tables.
    IF NOT EXISTS (SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = 'meter.api_key'::regclass) THEN
        ALTER TABLE meter.api_key DROP CONSTRAINT IF EXISTS api_key_organization_id_fkey;
        PERFORM run_command_on_workers(
            'ALTER TABLE meter.api_key DROP CONSTRAINT IF EXISTS api_key_organization_id_fkey');
    END IF;
    FOREACH t IN ARRAY v_reference LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = format('meter.%I', t)::regclass) THEN
            PERFORM create_reference_table(format('meter.%I', t));
        END IF;
        table_name := t;
        distribution := 'reference';
        RETURN NEXT;
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint c
                   WHERE c.conrelid = 'meter.api_key'::regclass AND c.conname = 'api_key_organization_id_fkey') THEN
        ALTER TABLE meter.api_key ADD CONSTRAINT api_key_organization_id_fkey
            FOREIGN KEY (organization_id) REFERENCES meter.organization (id);
    END IF;
    FOREACH t IN ARRAY v_distributed LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = format('meter.%I', t)::regclass) THEN
            PERFORM create_distributed_table(format('meter.%I', t), 'organization_id',
                colocate_with => CASE WHEN t = 'meter_event' THEN 'default' ELSE 'meter.meter_event' END);
        END IF;
        table_name := t;
        distribution := 'by organization_id, co-located with meter_event';
        RETURN NEXT;
    END LOOP;
    PERFORM meter._audit('', 'citus.distributed', NULL,
        jsonb_build_object('reference', v_reference, 'distributed', v_distributed));
END
$$;
COMMENT ON FUNCTION meter.citus_distribute() IS
  'On a Citus coordinator (CREATE EXTENSION citus, workers added, then this, once): makes the small tables reference tables and distributes every per-organization table by organization_id, co-located, so that an organization''s writes go to one worker in a single-shard transaction. Idempotent; lists what it did. PM072 without citus.';
