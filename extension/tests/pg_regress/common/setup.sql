-- Shared by every golden: quiet output, and pg_temp.try(sql), which runs a
-- statement and answers 'ok' or its SQLSTATE and message, so that a golden
-- shows what the extension answers without psql's error formatting. Ids
-- that differ from run to run (UUIDs, a key's visible start) are masked.
\set VERBOSITY terse
\set SHOW_CONTEXT never
SET client_min_messages = warning;
CREATE FUNCTION pg_temp.try(sql text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE sql;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || regexp_replace(regexp_replace(SQLERRM,
        '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<uuid>', 'g'),
        'ak_[0-9A-Za-z]{4}\M', 'ak_<start>', 'g');
END
$$;
