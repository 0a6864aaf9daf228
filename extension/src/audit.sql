-- Audit log: append-only (schema.sql's triggers), one hash chain per
-- organization. Rows are inserted unsealed, so recording never waits on a
-- chain head; the sealer (pg_cron, every minute) chains each organization's
-- committed unsealed rows in id order after its head. A row that commits
-- late is chained by a later pass, after rows that committed before it: the
-- chain records the order the sealer saw rows become visible, so no running
-- writer can make a pass skip a row (the race of 0.2's global chain, which
-- chained by id). Everything of one organization stays on its own shard.

CREATE FUNCTION meter._audit(organization_id text, action text, subject text, detail jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql
-- No SET search_path: internal, called from SECURITY DEFINER functions that set it.
AS $$
DECLARE
    v_id  bigint := nextval('meter.audit_log_id_seq');
    v_org text := coalesce(_audit.organization_id, '');
    v_detail jsonb := coalesce(_audit.detail, '{}');
BEGIN
    INSERT INTO meter.audit_log (organization_id, id, action, subject, detail)
    VALUES (v_org, v_id, _audit.action, _audit.subject, v_detail);
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION meter._audit(text, text, text, jsonb) IS
  'Internal: append an unsealed audit row and return its id. The sealer chains it later; nothing here locks a chain head.';

-- What a row's hash covers: every column but the hashes, in a fixed text
-- form. One definition, for the sealer and the verifier.
CREATE FUNCTION meter._audit_text(organization_id text, seq bigint, id bigint, action text, subject text,
                                  detail jsonb, actor text, created_at timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT concat_ws(chr(31), $1, $2::text, $3::text, $4, coalesce($5, ''), $6::text, $7,
                     (extract(epoch FROM $8) * 1000000)::bigint::text)
$$;
COMMENT ON FUNCTION meter._audit_text(text, bigint, bigint, text, text, jsonb, text, timestamptz) IS
  'Internal: the canonical text of an audit row that its hash covers: organization, seq, id, action, subject, detail, actor, created_at (microseconds), joined by 0x1F.';

-- 0.2's definition, for the frozen global chain (audit_chain_legacy).
CREATE FUNCTION meter._audit_digest_legacy(prev_hash bytea, a meter.audit_log) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT sha256(prev_hash || convert_to(concat_ws(chr(31),
        a.id::text, a.organization_id, a.action, coalesce(a.subject, ''), a.detail::text, a.actor,
        (extract(epoch FROM a.created_at) * 1000000)::bigint::text), 'UTF8'))
$$;
COMMENT ON FUNCTION meter._audit_digest_legacy(bytea, meter.audit_log) IS
  'Internal: the row hash of polar_meter 0.1/0.2''s global chain, to verify rows sealed before the upgrade to 0.3.';

CREATE FUNCTION meter.seal_audit_chain(org_id text, max_rows int DEFAULT 100000) RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_seq   bigint;
    v_hash  bytea;
    v_now   timestamptz := now();
    v_ids   bigint[];
    v_seqs  bigint[];
    v_texts text[];
    v_prevs bytea[];
    v_hashes bytea[];
BEGIN
    INSERT INTO meter.audit_chain (organization_id) VALUES (org_id) ON CONFLICT DO NOTHING;
    -- The head's lock makes sealers of one organization take turns; the
    -- rows below are read after it, so a second sealer sees the first's work.
    SELECT c.last_seq, c.last_hash INTO v_seq, v_hash
    FROM meter.audit_chain c WHERE c.organization_id = org_id FOR UPDATE;

    SELECT array_agg(x.id ORDER BY x.id), array_agg(x.seq ORDER BY x.id),
           array_agg(meter._audit_text(x.organization_id, x.seq, x.id, x.action, x.subject, x.detail, x.actor, x.created_at)
                     ORDER BY x.id)
    INTO v_ids, v_seqs, v_texts
    FROM (SELECT a.organization_id, a.id, a.action, a.subject, a.detail, a.actor, a.created_at,
                 v_seq + row_number() OVER (ORDER BY a.id) AS seq
          FROM meter.audit_log a
          WHERE a.organization_id = org_id AND a.row_hash IS NULL
          ORDER BY a.id LIMIT max_rows) x;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    v_hashes := meter._audit_chain_hashes(v_hash, v_texts);
    v_prevs := v_hash || v_hashes[1:cardinality(v_hashes) - 1];
    UPDATE meter.audit_log a SET seq = u.seq, prev_hash = u.prev, row_hash = u.hash
    FROM unnest(v_ids, v_seqs, v_prevs, v_hashes) AS u(id, seq, prev, hash)
    WHERE a.organization_id = org_id AND a.id = u.id;
    -- The new head into scalars first: Citus crashes deparsing an array
    -- subscript of a parameter inside an UPDATE of a distributed table.
    v_seq := v_seqs[cardinality(v_seqs)];
    v_hash := v_hashes[cardinality(v_hashes)];
    UPDATE meter.audit_chain c SET last_seq = v_seq, last_hash = v_hash, sealed_at = v_now
    WHERE c.organization_id = org_id;
    RETURN cardinality(v_ids);
END
$$;
COMMENT ON FUNCTION meter.seal_audit_chain(text, int) IS
  'Chains one organization''s unsealed audit rows (at most max_rows, in id order) after its chain head and returns how many. Safe to run concurrently (one waits for the other).';

CREATE FUNCTION meter.seal_audit_log(max_rows int DEFAULT 100000) RETURNS int
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    -- pg_cron runs this every minute: keep going while there is work, but
    -- leave the next run its minute.
    v_until timestamptz := clock_timestamp() + interval '50 seconds';
    org text;
    n int := 0;
    k int;
BEGIN
    FOR org IN SELECT DISTINCT a.organization_id FROM meter.audit_log a WHERE a.row_hash IS NULL LOOP
        LOOP
            k := meter.seal_audit_chain(org, max_rows);
            n := n + k;
            EXIT WHEN k < max_rows OR clock_timestamp() > v_until;
        END LOOP;
        EXIT WHEN clock_timestamp() > v_until;
    END LOOP;
    RETURN n;
END
$$;
COMMENT ON FUNCTION meter.seal_audit_log(int) IS
  'Seals every organization''s unsealed audit rows, max_rows at a time (seal_audit_chain), until none is left or 50 seconds have passed. Returns rows sealed. Run by pg_cron every minute; sealing runs at about 50,000 rows a second (BENCHMARKS.md).';

CREATE FUNCTION meter._verify_legacy_chain() RETURNS meter.audit_break
LANGUAGE plpgsql
STABLE
AS $$
DECLARE
    v_prev bytea := '\x';
    v_frontier bigint := coalesce((SELECT c.last_id FROM meter.audit_chain_legacy c), 0);
    r meter.audit_log;
BEGIN
    FOR r IN SELECT * FROM meter.audit_log a WHERE a.seq IS NULL AND a.row_hash IS NOT NULL ORDER BY a.id LOOP
        IF r.id > v_frontier THEN
            RETURN ROW(r.organization_id, r.id, 'sealed row beyond the legacy chain''s head')::meter.audit_break;
        END IF;
        IF r.prev_hash IS DISTINCT FROM v_prev THEN
            RETURN ROW(r.organization_id, r.id, 'prev_hash does not match the preceding row of the legacy chain (a row was removed or reordered)')::meter.audit_break;
        END IF;
        IF meter._audit_digest_legacy(v_prev, r) IS DISTINCT FROM r.row_hash THEN
            RETURN ROW(r.organization_id, r.id, 'row content does not match its hash (the row was altered)')::meter.audit_break;
        END IF;
        v_prev := r.row_hash;
    END LOOP;
    IF v_frontier > 0 AND v_prev IS DISTINCT FROM (SELECT c.last_hash FROM meter.audit_chain_legacy c) THEN
        RETURN ROW('', v_frontier, 'legacy chain head does not match its last row (rows were removed)')::meter.audit_break;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION meter._verify_legacy_chain() IS
  'Internal: checks the global chain of rows sealed before the upgrade to 0.3 (0.2''s algorithm, up to audit_chain_legacy''s head).';

CREATE FUNCTION meter.verify_audit_chain(org_id text) RETURNS meter.audit_break
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    v_prev bytea := '\x';
    v_next bigint := 1;
    v_head meter.audit_chain;
    v_ids bigint[];
    v_seqs bigint[];
    v_texts text[];
    v_prevs bytea[];
    v_hashes bytea[];
    v_expect bytea[];
    i int;
BEGIN
    SELECT * INTO v_head FROM meter.audit_chain c WHERE c.organization_id = org_id;
    -- In slices, so that a long chain never sits in memory whole.
    LOOP
        SELECT array_agg(a.id ORDER BY a.seq), array_agg(a.seq ORDER BY a.seq),
               array_agg(meter._audit_text(a.organization_id, a.seq, a.id, a.action, a.subject, a.detail, a.actor, a.created_at)
                         ORDER BY a.seq),
               array_agg(a.prev_hash ORDER BY a.seq),
               array_agg(a.row_hash ORDER BY a.seq)
        INTO v_ids, v_seqs, v_texts, v_prevs, v_hashes
        FROM (SELECT * FROM meter.audit_log x WHERE x.organization_id = org_id AND x.seq >= v_next
              ORDER BY x.seq LIMIT 10000) a;
        EXIT WHEN v_ids IS NULL;
        v_expect := meter._audit_chain_hashes(v_prev, v_texts);
        FOR i IN 1 .. cardinality(v_ids) LOOP
            IF v_seqs[i] <> v_next THEN
                RETURN ROW(org_id, v_ids[i], format('seq %s follows %s (a row was removed)', v_seqs[i], v_next - 1))::meter.audit_break;
            END IF;
            IF v_prevs[i] IS DISTINCT FROM v_prev THEN
                RETURN ROW(org_id, v_ids[i], 'prev_hash does not match the preceding row (a row was removed or reordered)')::meter.audit_break;
            END IF;
            IF v_hashes[i] IS DISTINCT FROM v_expect[i] THEN
                RETURN ROW(org_id, v_ids[i], 'row content does not match its hash (the row was altered)')::meter.audit_break;
            END IF;
            v_prev := v_hashes[i];
            v_next := v_next + 1;
        END LOOP;
    END LOOP;
    IF v_next - 1 <> coalesce(v_head.last_seq, 0) OR v_prev IS DISTINCT FROM coalesce(v_head.last_hash, '\x') THEN
        RETURN ROW(org_id, NULL::bigint, format('chain head (seq %s) does not match the last sealed row (seq %s): rows were removed',
                                                coalesce(v_head.last_seq, 0), v_next - 1))::meter.audit_break;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION meter.verify_audit_chain(text) IS
  'Walks one organization''s audit chain in seq order; returns the first broken link (organization_id, id, problem) or NULL when intact. Unsealed rows (the tail waiting for the sealer) are not links yet.';

CREATE FUNCTION meter.verify_audit_chain() RETURNS meter.audit_break
LANGUAGE plpgsql
STABLE
SECURITY DEFINER
SET search_path = meter, pg_catalog, pg_temp
AS $$
DECLARE
    b meter.audit_break;
    org text;
BEGIN
    -- A break always names its problem; its id may be NULL (a head that
    -- lost its rows), so test the problem, not the row (a row with one NULL
    -- field is not IS NOT NULL).
    b := meter._verify_legacy_chain();
    IF b.problem IS NOT NULL THEN
        RETURN b;
    END IF;
    -- Every organization with sealed rows or a head, so a head whose rows all vanished is caught too.
    FOR org IN SELECT DISTINCT x.o FROM (
                   SELECT a.organization_id AS o FROM meter.audit_log a WHERE a.seq IS NOT NULL
                   UNION SELECT c.organization_id FROM meter.audit_chain c) x ORDER BY 1 LOOP
        b := meter.verify_audit_chain(org);
        IF b.problem IS NOT NULL THEN
            RETURN b;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION meter.verify_audit_chain() IS
  'Checks the whole audit log: the global chain frozen by the upgrade to 0.3, then every organization''s chain. Returns the first broken link (organization_id, id, problem) or NULL when intact.';
