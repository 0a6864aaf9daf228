//! record_event through SQL: idempotency, isolation between orgs, concurrency
//! and every validation rule.
use pm_e2e::Value1;
use pm_e2e::{db_error, sqlstate, TestDb};
use serde_json::{json, Value};
use tokio_postgres::Client;

async fn setup() -> (TestDb, Client, String) {
    let (db, c) = TestDb::with_admin().await;
    db.org(&c, "acme").await;
    let (_, key) = db.key(&c, "acme", &["fence:meter"]).await;
    (db, c, key)
}

async fn record(
    c: &Client,
    key: &str,
    idem: &str,
    name: &str,
    ts: &str,
    meta: Value,
) -> Result<(String, uuid::Uuid), tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT status, event_id FROM meter.record_event($1, $2, $3, $4::text, $5)",
            &[&key, &idem, &name, &ts, &meta],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

const TS: &str = "2026-01-31T12:00:00Z";

#[tokio::test]
async fn replay_returns_the_original_and_a_changed_payload_is_refused() {
    let (_db, c, key) = setup().await;
    let (s1, id1) = record(
        &c,
        &key,
        "req-1",
        "api.request",
        TS,
        json!({"tokens": 5, "model": "m"}),
    )
    .await
    .unwrap();
    assert_eq!(s1, "recorded");
    // Same payload, other JSON spelling (key order, offset notation): a replay.
    let (s2, id2) = record(
        &c,
        &key,
        "req-1",
        "api.request",
        "2026-01-31T14:00:00+02:00",
        json!({"model": "m", "tokens": 5}),
    )
    .await
    .unwrap();
    assert_eq!((s2.as_str(), id2), ("already_recorded", id1));
    for (name, ts, meta) in [
        ("api.request", TS, json!({"tokens": 6, "model": "m"})),
        ("api.other", TS, json!({"tokens": 5, "model": "m"})),
        (
            "api.request",
            "2026-01-31T12:00:01Z",
            json!({"tokens": 5, "model": "m"}),
        ),
    ] {
        let (code, msg) = db_error(record(&c, &key, "req-1", name, ts, meta).await);
        assert_eq!(code, "PM020");
        assert!(
            msg.contains("req-1") && msg.contains(&id1.to_string()),
            "{msg}"
        );
    }
    let rows: i64 = c.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(rows, 1);
    let audit: i64 = c
        .value("SELECT count(*) FROM meter.audit_log WHERE action = 'event.recorded'")
        .await;
    assert_eq!(
        audit, 1,
        "one audit row per recorded event, none for replays"
    );
}

#[tokio::test]
async fn the_stored_row_is_what_was_sent() {
    let (_db, c, key) = setup().await;
    let meta = json!({"tokens": 1200, "model": "gpt-x", "cached": false, "latency_ms": 41.5,
                      "big": serde_json::from_str::<Value>("123456789012345678901234567890").unwrap()});
    let (_, id) = record(
        &c,
        &key,
        "req-1",
        "api.request",
        "2026-01-31T12:00:00.123456Z",
        meta.clone(),
    )
    .await
    .unwrap();
    let row = c
        .query_one(
            "SELECT event_name, event_timestamp = '2026-01-31T12:00:00.123456Z'::timestamptz, metadata::text = $2::jsonb::text,
                    polar_status, attempts, external_id, api_key_id IS NOT NULL, next_attempt_at <= now()
             FROM meter.meter_event WHERE id = $1",
            &[&id, &meta],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "api.request");
    assert!(row.get::<_, bool>(1));
    assert!(
        row.get::<_, bool>(2),
        "metadata stored exactly, 30-digit integer included"
    );
    assert_eq!(row.get::<_, String>(3), "pending");
    assert_eq!(row.get::<_, i32>(4), 0);
    let ext: String = row.get(5);
    assert!(ext.starts_with("pm_") && ext.len() == 43, "{ext}");
    assert!(row.get::<_, bool>(6));
    assert!(row.get::<_, bool>(7), "due at once");
}

#[tokio::test]
async fn event_ids_are_version_7_uuids_of_the_recording_transaction() {
    let (_db, c, key) = setup().await;
    let batch = json!([
        {"idempotency_key": "a", "event_name": "e", "event_timestamp": TS},
        {"idempotency_key": "b", "event_name": "e", "event_timestamp": TS},
    ]);
    c.execute("SELECT meter.record_events($1, $2)", &[&key, &batch])
        .await
        .unwrap();
    let (_, later) = record(&c, &key, "c", "e", TS, json!({})).await.unwrap();
    // The first 48 bits are the Unix milliseconds of the transaction that
    // recorded the row (its created_at), then the version nibble 7.
    let rows = c
        .query(
            "SELECT id, ('x' || substr(replace(id::text, '-', ''), 1, 12))::bit(48)::bigint
                        = floor(extract(epoch FROM created_at) * 1000)::bigint,
                    substr(id::text, 15, 1), substr(id::text, 20, 1)
             FROM meter.meter_event ORDER BY idempotency_key",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        let id: uuid::Uuid = r.get(0);
        assert!(r.get::<_, bool>(1), "{id}: its time is not its recording's");
        assert_eq!(r.get::<_, String>(2), "7", "{id}");
        assert!("89ab".contains(&r.get::<_, String>(3)), "{id}: variant");
    }
    // A later recording's id sorts after an earlier one's once their
    // milliseconds differ (within one millisecond the random bits decide).
    let ms = |u: uuid::Uuid| u.as_bytes()[..6].to_vec();
    assert!(rows
        .iter()
        .take(2)
        .all(|r| ms(r.get::<_, uuid::Uuid>(0)) <= ms(later)));
}

#[tokio::test]
async fn idempotency_keys_are_per_organization() {
    let (db, c, key_a) = setup().await;
    db.org(&c, "globex").await;
    let (_, key_b) = db.key(&c, "globex", &["fence:meter"]).await;
    let (sa, ida) = record(&c, &key_a, "shared-key", "api.request", TS, json!({"n": 1}))
        .await
        .unwrap();
    // Org B's identical key and even a different payload: its own event.
    let (sb, idb) = record(&c, &key_b, "shared-key", "api.request", TS, json!({"n": 2}))
        .await
        .unwrap();
    assert_eq!((sa.as_str(), sb.as_str()), ("recorded", "recorded"));
    assert_ne!(ida, idb);
    let orgs: Vec<(String, Value)> = c
        .query("SELECT organization_id, metadata FROM meter.meter_event WHERE idempotency_key = 'shared-key' ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        orgs,
        vec![
            ("acme".into(), json!({"n": 1})),
            ("globex".into(), json!({"n": 2}))
        ]
    );
    let ext: i64 = c
        .value("SELECT count(DISTINCT external_id) FROM meter.meter_event")
        .await;
    assert_eq!(ext, 2, "external ids differ across orgs");
}

#[tokio::test]
async fn thirty_two_concurrent_sessions_with_one_key_make_one_row() {
    let (db, c, key) = setup().await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let client = db.admin().await;
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            client
                .query_one("SELECT status, event_id FROM meter.record_event($1, 'race', 'api.request', $2::text, '{\"a\":1}')", &[&key, &TS])
                .await
                .map(|r| (r.get::<_, String>(0), r.get::<_, uuid::Uuid>(1)))
                .unwrap()
        }));
    }
    let results: Vec<(String, uuid::Uuid)> = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        results.iter().filter(|r| r.0 == "recorded").count(),
        1,
        "{results:?}"
    );
    assert_eq!(
        results.iter().filter(|r| r.0 == "already_recorded").count(),
        31
    );
    assert!(
        results.iter().all(|r| r.1 == results[0].1),
        "all see the same event id"
    );
    let rows: i64 = c.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn each_validation_rule_has_its_code_and_names_the_field() {
    let (db, c, key) = setup().await;
    let (long_name, long_idem) = ("n".repeat(129), "i".repeat(256));
    let many = |n: usize| Value::Object((0..n).map(|i| (format!("k{i}"), json!(i))).collect());
    let cases: Vec<(&str, &str, &str, Value, &str, &str)> = vec![
        ("idem", &long_name, TS, json!({}), "PM010", "event_name"),
        ("idem", "", TS, json!({}), "PM010", "event_name"),
        ("idem", "e", TS, many(50), "PM013", "50 keys"),
        ("idem", "e", TS, many(51), "PM013", "51 keys"),
        (
            "idem",
            "e",
            TS,
            json!({"outer": {"inner": 1}}),
            "PM013",
            "metadata.outer",
        ),
        (
            "idem",
            "e",
            TS,
            json!({"list": [1, 2]}),
            "PM013",
            "metadata.list",
        ),
        (
            "idem",
            "e",
            TS,
            json!({"gone": null}),
            "PM013",
            "metadata.gone",
        ),
        (
            "idem",
            "e",
            TS,
            json!({"blank": ""}),
            "PM013",
            "metadata.blank",
        ),
        (
            "idem",
            "e",
            TS,
            json!({"long": "x".repeat(501)}),
            "PM013",
            "metadata.long",
        ),
        ("idem", "e", TS, json!({"k".repeat(41): 1}), "PM013", "40"),
        (
            "idem",
            "e",
            TS,
            json!({"meter_event_id": "x"}),
            "PM013",
            "reserved",
        ),
        ("idem", "e", TS, json!([1]), "PM013", "object"),
        (
            "idem",
            "e",
            "2026-01-31T12:00:00",
            json!({}),
            "PM011",
            "event_timestamp",
        ),
        (
            "idem",
            "e",
            "2026-01-31 12:00:00",
            json!({}),
            "PM011",
            "event_timestamp",
        ),
        (
            "idem",
            "e",
            "31/01/2026",
            json!({}),
            "PM011",
            "event_timestamp",
        ),
        (
            "idem",
            "e",
            "1969-07-20T20:17:00Z",
            json!({}),
            "PM011",
            "1970",
        ),
        (
            "idem",
            "e",
            "2999-01-01T00:00:00Z",
            json!({}),
            "PM012",
            "future",
        ),
        ("", "e", TS, json!({}), "PM014", "idempotency_key"),
        (&long_idem, "e", TS, json!({}), "PM014", "idempotency_key"),
        ("tab\there", "e", TS, json!({}), "PM014", "printable"),
    ];
    for (idem, name, ts, meta, code, needle) in cases {
        let (got, msg) = db_error(record(&c, &key, idem, name, ts, meta.clone()).await);
        assert_eq!(got, code, "{name:?} {ts} {meta}: {msg}");
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    }
    // A huge number, as jsonb holds it: judged, not a crash.
    let (code, msg) = db_error(
        c.query_one(
            "SELECT * FROM meter.record_event($1, 'huge', 'e', $2::text, '{\"x\": 1e400}'::jsonb)",
            &[&key, &TS],
        )
        .await,
    );
    assert_eq!(
        (code.as_str(), msg.contains("metadata.x")),
        ("PM013", true),
        "{msg}"
    );
    // NUL cannot even enter PostgreSQL text or jsonb: refused before us, with its own SQLSTATE.
    let nul = c.query_one("SELECT * FROM meter.record_event($1, 'nul', 'e', $2::text, '{\"x\": \"a\\u0000b\"}'::jsonb)", &[&key, &TS]).await;
    assert_eq!(sqlstate(nul), "22P05");
    let nul_name = record(&c, &key, "nul2", "a\0b", TS, json!({})).await;
    assert_eq!(sqlstate(nul_name), "22021");
    // The future bound follows the configurable skew.
    db.set(&c, "max_future_skew", "1 hour").await;
    let soon = (chrono::Utc::now() + chrono::Duration::minutes(50)).to_rfc3339();
    assert_eq!(
        record(&c, &key, "soon", "e", &soon, json!({}))
            .await
            .unwrap()
            .0,
        "recorded"
    );
    // Boundaries that pass.
    let edge = Value::Object(
        (0..49)
            .map(|i| (format!("{i:0>40}"), json!("v".repeat(500))))
            .collect(),
    );
    assert_eq!(
        record(&c, &key, &"i".repeat(255), &"n".repeat(128), TS, edge)
            .await
            .unwrap()
            .0,
        "recorded"
    );
    let rows: i64 = c.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(rows, 2, "no rejected event left a row");
}

#[tokio::test]
async fn typed_timestamps_and_the_dba_entry_point() {
    let (db, c, key) = setup().await;
    let row = c
        .query_one(
            "SELECT status FROM meter.record_event($1, 'typed', 'e', now(), '{}')",
            &[&key],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "recorded");
    // Untyped literal: the text form, so a naive literal is refused.
    let naive = c
        .query_one(
            &format!(
                "SELECT * FROM meter.record_event('{key}', 'lit', 'e', '2026-01-01 00:00', '{{}}')"
            ),
            &[],
        )
        .await;
    assert_eq!(sqlstate(naive), "PM011");
    let r = c
        .query_one(
            "SELECT status, event_id FROM meter.record_event_for_org('acme', 'dba-1', 'e', now())",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "recorded");
    let id: uuid::Uuid = r.get(1);
    let key_id: Option<uuid::Uuid> = c
        .query_one(
            "SELECT api_key_id FROM meter.meter_event WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(key_id.is_none());
    assert_eq!(
        sqlstate(
            c.query_one(
                "SELECT * FROM meter.record_event_for_org('nope', 'x', 'e', now())",
                &[]
            )
            .await
        ),
        "PM030"
    );
    assert_eq!(
        sqlstate(
            c.query_one(
                "SELECT * FROM meter.record_event_for_org('acme', 'x', 'e', '2026-01-01T00:00')",
                &[]
            )
            .await
        ),
        "PM011"
    );
    // A key without fence:meter may not record.
    let (_, admin_key) = db.key(&c, "acme", &["keys:manage"]).await;
    assert_eq!(
        sqlstate(record(&c, &admin_key, "perm", "e", TS, json!({})).await),
        "PM005"
    );
    // Billing records are never deleted.
    assert_eq!(
        sqlstate(c.execute("DELETE FROM meter.meter_event", &[]).await),
        "PM041"
    );
    assert_eq!(
        sqlstate(c.execute("DELETE FROM meter.organization", &[]).await),
        "PM041"
    );
    assert_eq!(
        sqlstate(c.execute("DELETE FROM meter.api_key", &[]).await),
        "PM041"
    );
}

/// The fingerprint is computed in Rust from its own spelling of the metadata;
/// it must be the one PostgreSQL's text of the stored jsonb gives (0.1 and 0.2
/// computed it from that text, and a replay compares against stored ones).
#[tokio::test]
async fn fingerprints_are_those_of_postgresqls_text_of_the_metadata() {
    let (_db, pg) = TestDb::with_admin().await;
    pg.run("SELECT meter.upsert_organization('acme', 'Acme', 'a@b.io')")
        .await;
    let tricky = [
        r#"{}"#,
        r#"{"b": 1, "a": 2, "ccc": 3, "dd": 4}"#,
        r#"{"n": 1.50, "e": 1e3, "z": -0, "big": 12345678901234567890123, "small": 0.1e-2, "E": 1E+2}"#,
        r#"{"s": "tab\there\nnew \"quoted\" back\\slash \u0001 \u001f \u007f é 😀 \u2028"}"#,
        r#"{"t": true, "f": false, "k\"ey": "v", "ключ": "значение"}"#,
    ];
    for (i, m) in tricky.iter().enumerate() {
        let events = format!(
            r#"[{{"idempotency_key": "k{i}", "event_name": "e", "event_timestamp": "2026-01-01T00:00:00.123456Z", "metadata": {m}}}]"#
        );
        let status: String = pg
            .query_one(
                "SELECT status FROM meter.record_events_for_org('acme', $1::text::jsonb)",
                &[&events],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(status, "recorded", "{m}");
    }
    let mismatched: Vec<String> = pg
        .column(
            "SELECT metadata::text FROM meter.meter_event
             WHERE payload_hash <> sha256(convert_to(event_name || chr(31)
                   || (extract(epoch FROM event_timestamp) * 1000000)::bigint || chr(31) || metadata::text, 'UTF8'))",
        )
        .await;
    assert!(
        mismatched.is_empty(),
        "fingerprints differ for {mismatched:?}"
    );
    let n: i64 = pg.value("SELECT count(*) FROM meter.meter_event").await;
    assert_eq!(n, tricky.len() as i64);
}
