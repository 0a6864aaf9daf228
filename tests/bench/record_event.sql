-- record_event() called directly: the extension's cost without HTTP.
\set n random(1, 2000000000)
SELECT * FROM meter.record_event(:key::text, 'fn-' || :client_id || '-' || :n, 'api.request', :ts::text, '{"tokens": 12, "model": "m"}');
