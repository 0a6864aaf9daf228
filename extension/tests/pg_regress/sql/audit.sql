-- The audit log: append-only, sealed into a per-organization hash chain
-- that verification recomputes, and billing rows that are never deleted.
\i common/setup.sql
SELECT (meter.upsert_organization('acme', 'Acme', 'billing@acme.test')).id;
SELECT (meter.upsert_organization('beta', 'Beta', 'billing@beta.test')).id;
SELECT count(*) AS acme_keys FROM meter.create_api_key('acme', 'fence');
SELECT count(*) AS beta_keys FROM meter.create_api_key('beta', 'fence');

SELECT count(*) FILTER (WHERE row_hash IS NULL) AS unsealed FROM meter.audit_log;
SELECT meter.seal_audit_log(1000) > 0 AS sealed_some;
SELECT count(*) FILTER (WHERE row_hash IS NULL) AS unsealed FROM meter.audit_log;
-- verify_audit_chain answers one row of NULLs when the chain holds.
SELECT organization_id, id IS NULL AS intact, problem FROM meter.verify_audit_chain('acme');
SELECT count(*) AS broken_chains FROM meter.verify_audit_chain() WHERE id IS NOT NULL;

-- Append-only: no UPDATE (beyond sealing), no DELETE, no TRUNCATE.
SELECT pg_temp.try($$UPDATE meter.audit_log SET action = 'x'$$) AS update_refused;
SELECT pg_temp.try($$DELETE FROM meter.audit_log$$) AS delete_refused;
SELECT pg_temp.try($$TRUNCATE meter.audit_log$$) AS truncate_refused;
SELECT pg_temp.try($$DELETE FROM meter.organization WHERE id = 'beta'$$) AS org_delete_refused;
SELECT pg_temp.try($$DELETE FROM meter.api_key$$) AS key_delete_refused;

-- A row edited behind the triggers' back is found by verification.
ALTER TABLE meter.audit_log DISABLE TRIGGER USER;
UPDATE meter.audit_log SET detail = detail || '{"forged": true}'
WHERE id = (SELECT min(id) FROM meter.audit_log WHERE organization_id = 'acme');
ALTER TABLE meter.audit_log ENABLE TRIGGER USER;
SELECT organization_id, id = (SELECT min(id) FROM meter.audit_log WHERE organization_id = 'acme') AS names_the_row, problem
FROM meter.verify_audit_chain('acme');
SELECT id IS NULL AS beta_intact FROM meter.verify_audit_chain('beta');
