-- The SQL API reference (docs/sql-api.md), generated from the catalog: one
-- block per public function (helpers named _x are internal and left out),
-- then the error table (meter.error_codes()) and the settings (meter.settings()).
WITH f AS (
    SELECT p.proname AS name,
           format('meter.%s(%s)', p.proname, pg_get_function_arguments(p.oid)) AS signature,
           pg_get_function_result(p.oid) AS result,
           obj_description(p.oid, 'pg_proc') AS comment,
           p.prosecdef AS definer
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'meter' AND p.proname NOT LIKE '\_%'
)
SELECT E'# polar_meter SQL API reference\n\n'
    || E'Generated from the installed extension by `scripts/sql-docs.sh`; `make test` fails when it is out of date.\n'
    || E'Every function lives in schema `meter`; the errors and settings are at the end.\n\n'
    || (SELECT string_agg(
        format(E'## `%s`\n\n```sql\n%s\n  RETURNS %s\n```\n\n%s%s\n',
               name, signature, result, comment,
               CASE WHEN definer THEN E'\n\nRuns with the extension owner''s rights (SECURITY DEFINER).' ELSE '' END),
        E'\n' ORDER BY name, signature) FROM f)
    || E'\n## Errors\n\nEvery error has its own SQLSTATE (class `PM`); polar-meterd answers it with the HTTP status and RFC 9457 problem type shown (prefix `https://polar-meter.dev/problems/`).\n\n'
    || E'| SQLSTATE | name | HTTP | problem type | cause |\n|---|---|---|---|---|\n'
    || (SELECT string_agg(format(E'| %s | %s | %s | `%s` | %s |', e.sqlstate, e.name, e.http_status, e.problem_type, e.cause), E'\n' ORDER BY e.sqlstate)
        FROM meter.error_codes() e)
    || E'\n\n## Settings\n\nChanged with `SELECT meter.set_setting(name, value)` (polar_meter_admin); `NULL` restores the default.\n\n'
    || E'| name | default | kind | bounds | what it does |\n|---|---|---|---|---|\n'
    || (SELECT string_agg(format(E'| `%s` | %s | %s | %s .. %s | %s |', s.name, s.default_value, s.kind, s.min_value, s.max_value, s.description), E'\n' ORDER BY s.name)
        FROM meter.settings() s)
    || E'\n';
