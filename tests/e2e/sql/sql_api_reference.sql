-- The SQL API reference (docs/sql-api.md), generated from the catalog: one
-- block per public function (helpers named _x are internal and left out).
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
    || E'Every function lives in schema `meter`. Errors are listed in the README (SQLSTATE class `PM`).\n\n'
    || string_agg(
        format(E'## `%s`\n\n```sql\n%s\n  RETURNS %s\n```\n\n%s%s\n',
               name, signature, result, comment,
               CASE WHEN definer THEN E'\n\nRuns with the extension owner''s rights (SECURITY DEFINER).' ELSE '' END),
        E'\n' ORDER BY name, signature)
FROM f;
