-- API keys: minting, verifying, rotating, revoking, and every refusal.
\i common/setup.sql
SELECT (meter.upsert_organization('acme', 'Acme', 'billing@acme.test')).id;

CREATE TEMP TABLE k AS SELECT * FROM meter.create_api_key('acme', 'fence', '{fence:meter}');
-- ak_ and 48 base62 characters; only its hash is stored.
SELECT key ~ '^ak_[0-9A-Za-z]{48}$' AS well_formed, key LIKE start || '%' AS start_is_its_prefix FROM k;
SELECT count(*) AS rows_holding_the_key FROM meter.api_key a, k
WHERE row_to_json(a)::text LIKE '%' || substr(k.key, 4) || '%';

-- verify_api_key names the organization and the key.
SELECT v.organization_id, v.api_key_id = k.id AS same_key
FROM k, meter.verify_api_key(k.key, 'fence:meter') v;

-- Refusals, each with its own SQLSTATE.
SELECT pg_temp.try($$SELECT meter.verify_api_key('ak_short', 'fence:meter')$$) AS malformed;
SELECT pg_temp.try($$SELECT meter.verify_api_key('ak_' || repeat('A', 48), 'fence:meter')$$) AS unknown;
SELECT pg_temp.try(format($$SELECT meter.verify_api_key(%L, 'keys:manage')$$, key)) AS no_permission FROM k;
SELECT pg_temp.try($$SELECT meter.create_api_key('nobody', 'x')$$) AS unknown_org;
SELECT pg_temp.try($$SELECT meter.create_api_key('acme', '  ')$$) AS blank_name;
SELECT pg_temp.try($$SELECT meter.create_api_key('acme', 'x', '{fence:everything}')$$) AS bad_permission;
SELECT pg_temp.try($$SELECT meter.create_api_key('acme', 'x', '{fence:meter}', now() - interval '1 day')$$) AS past_expiry;

-- A key manager mints keys of its own organization, never with more rights than it holds.
CREATE TEMP TABLE m AS SELECT * FROM meter.create_api_key('acme', 'manager', '{fence:meter,keys:manage}');
SELECT c.granted, c.valid_until IS NULL AS no_expiry
FROM m, meter.create_own_api_key(m.key, 'minted', '{fence:meter}') c;
SELECT pg_temp.try(format($$SELECT meter.create_own_api_key(%L, 'x', '{fence:meter}')$$, key)) AS not_a_manager FROM k;
SELECT name, permissions, revoked_at IS NULL AS live FROM m, meter.list_own_api_keys(m.key) ORDER BY name;

-- Rotation: the old key lives out its grace, the new one works; a second rotation is refused.
CREATE TEMP TABLE r AS SELECT x.* FROM k, meter.rotate_api_key(k.id, interval '1 hour') x;
SELECT pg_temp.try(format($$SELECT meter.verify_api_key(%L, 'fence:meter')$$, key)) AS old_key_in_grace FROM k;
SELECT pg_temp.try(format($$SELECT meter.verify_api_key(%L, 'fence:meter')$$, key)) AS new_key FROM r;
SELECT pg_temp.try(format($$SELECT meter.rotate_api_key(%L::uuid)$$, id)) AS rotated_twice FROM k;

-- Revoking a manager revokes what it minted.
SELECT meter.revoke_api_key(id) IS NOT NULL AS revoked FROM m;
SELECT name, revoked_at IS NOT NULL AS revoked FROM meter.list_api_keys('acme') ORDER BY name, revoked;
SELECT pg_temp.try(format($$SELECT meter.verify_api_key(%L, 'fence:meter')$$, key)) AS revoked_key FROM m;

-- What the audit log kept, in order.
SELECT action, subject IS NOT NULL AS has_subject FROM meter.audit_log
WHERE action LIKE 'api_key.%' ORDER BY id;
