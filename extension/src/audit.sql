-- Audit log: append-only, hash-chained by an asynchronous sealer.

CREATE FUNCTION meter._audit(organization_id text, action text, subject text, detail jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql
-- No SET search_path: internal, called from SECURITY DEFINER functions that set it.
AS $$
DECLARE
    v_id  bigint;
    v_xid xid8;
BEGIN
    -- Our transaction holds an xid (so the sealer sees it as a running
    -- writer) before it takes an id; created_at is read after the id.
    v_xid := pg_current_xact_id();
    v_id := nextval('meter.audit_log_id_seq');
    INSERT INTO meter.audit_log (organization_id, id, action, subject, detail, created_at)
    VALUES (coalesce(_audit.organization_id, ''), v_id, _audit.action, _audit.subject,
            coalesce(_audit.detail, '{}'), clock_timestamp());
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION meter._audit(text, text, text, jsonb) IS
  'Internal: append an unsealed audit row and return its id. The sealer chains it later; nothing here locks a chain head.';

-- What a row's hash covers. One definition, used by the sealer and the verifier.
CREATE FUNCTION meter._audit_digest(prev_hash bytea, a meter.audit_log) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT sha256(prev_hash || convert_to(concat_ws(chr(31),
        a.id::text, a.organization_id, a.action, coalesce(a.subject, ''), a.detail::text, a.actor,
        (extract(epoch FROM a.created_at) * 1000000)::bigint::text), 'UTF8'))
$$;
COMMENT ON FUNCTION meter._audit_digest(bytea, meter.audit_log) IS
  'Internal: sha256(prev_hash || every column of the row but the hashes, in a fixed text form).';

CREATE FUNCTION meter._audit_append_only() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    -- The one update allowed: the sealer filling in the hashes of an unsealed row.
    IF TG_OP = 'UPDATE' AND OLD.row_hash IS NULL AND NEW.row_hash IS NOT NULL
       AND (NEW.organization_id, NEW.id, NEW.action, NEW.subject, NEW.detail, NEW.actor, NEW.created_at)
           IS NOT DISTINCT FROM
           (OLD.organization_id, OLD.id, OLD.action, OLD.subject, OLD.detail, OLD.actor, OLD.created_at)
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'PM040',
        MESSAGE = format('meter.audit_log is append-only: %s refused', TG_OP);
END
$$;
COMMENT ON FUNCTION meter._audit_append_only() IS
  'Internal trigger: refuses UPDATE, DELETE and TRUNCATE on meter.audit_log, except sealing an unsealed row.';

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON meter.audit_log
    FOR EACH ROW EXECUTE FUNCTION meter._audit_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON meter.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION meter._audit_append_only();

CREATE FUNCTION meter.seal_audit_log(max_rows int DEFAULT 1000000) RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    -- A running writer holding a lower id than row X took its id before X
    -- did, so it started before X.created_at. Rows created before the oldest
    -- running writer started are therefore final. Only writers of this
    -- database matter (sequences are per database); autovacuum takes no ids.
    -- A prepared transaction's start is unknown: wait for it.
    v_oldest timestamptz := (
        SELECT min(s) FROM (
            SELECT a.xact_start FROM pg_catalog.pg_stat_activity a
            WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_backend_pid()
              AND a.datname = current_database() AND a.backend_type <> 'autovacuum worker'
            UNION ALL
            SELECT '-infinity'::timestamptz FROM pg_catalog.pg_prepared_xacts p
            WHERE p.database = current_database()
        ) t(s));
    v_last_id bigint;
    v_last_hash bytea;
    v_hash bytea;
    r meter.audit_log;
    n int := 0;
BEGIN
    INSERT INTO meter.audit_chain DEFAULT VALUES ON CONFLICT DO NOTHING;
    SELECT c.last_id, c.last_hash INTO v_last_id, v_last_hash FROM meter.audit_chain c FOR UPDATE;
    FOR r IN
        SELECT * FROM meter.audit_log a
        WHERE a.row_hash IS NULL AND a.id > v_last_id
        ORDER BY a.id
        LIMIT max_rows
    LOOP
        -- A transaction that began before this row took its id may still be
        -- running and hold a lower id: stop here, the next run continues.
        EXIT WHEN r.created_at >= v_oldest;
        v_hash := meter._audit_digest(v_last_hash, r);
        UPDATE meter.audit_log a SET prev_hash = v_last_hash, row_hash = v_hash
        WHERE a.organization_id = r.organization_id AND a.id = r.id;
        v_last_id := r.id;
        v_last_hash := v_hash;
        n := n + 1;
    END LOOP;
    UPDATE meter.audit_chain SET last_id = v_last_id, last_hash = v_last_hash;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.seal_audit_log(int) IS
  'Chains unsealed audit rows in id order (at most max_rows), stopping at the first row a still-running transaction could precede. Returns rows sealed. Run by pg_cron every minute; safe to run concurrently (one waits).';

CREATE TYPE meter.audit_break AS (id bigint, problem text);
COMMENT ON TYPE meter.audit_break IS 'The first broken link of the audit chain: row id and what is wrong.';

CREATE FUNCTION meter.verify_audit_chain() RETURNS meter.audit_break
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = meter, pg_catalog
AS $$
DECLARE
    v_prev bytea := '\x';
    v_frontier bigint := coalesce((SELECT c.last_id FROM meter.audit_chain c), 0);
    r meter.audit_log;
BEGIN
    FOR r IN SELECT * FROM meter.audit_log ORDER BY id LOOP
        IF r.row_hash IS NULL THEN
            IF r.id <= v_frontier THEN
                RETURN ROW(r.id, 'unsealed row below the sealed frontier')::meter.audit_break;
            END IF;
            CONTINUE;   -- the unsealed tail, waiting for the sealer
        END IF;
        IF r.id > v_frontier THEN
            RETURN ROW(r.id, 'sealed row beyond the recorded chain head')::meter.audit_break;
        END IF;
        IF r.prev_hash IS DISTINCT FROM v_prev THEN
            RETURN ROW(r.id, 'prev_hash does not match the preceding row (a row was removed or reordered)')::meter.audit_break;
        END IF;
        IF meter._audit_digest(v_prev, r) IS DISTINCT FROM r.row_hash THEN
            RETURN ROW(r.id, 'row content does not match its hash (the row was altered)')::meter.audit_break;
        END IF;
        v_prev := r.row_hash;
    END LOOP;
    IF v_frontier > 0 AND v_prev IS DISTINCT FROM (SELECT c.last_hash FROM meter.audit_chain c) THEN
        RETURN ROW(v_frontier, 'chain head does not match the last sealed row (rows were removed)')::meter.audit_break;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION meter.verify_audit_chain() IS
  'Walks the audit chain in id order; returns the first broken link (id, problem) or NULL when intact. An unsealed row below the sealed frontier counts as broken.';
