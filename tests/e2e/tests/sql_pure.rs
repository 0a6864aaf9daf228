//! The pure functions as SQL exposes them, and the reconcile entry point.
use pm_e2e::Value1;
use pm_e2e::{sqlstate, TestDb};
use serde_json::json;

#[tokio::test]
async fn backoff_delay_doubles_with_jitter_and_honours_the_settings() {
    let (db, c) = TestDb::with_admin().await;
    let secs = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, f64>(0) }
    };
    assert_eq!(
        secs("SELECT extract(epoch FROM meter.backoff_delay(1, 0.5))::float8").await,
        60.0
    );
    assert_eq!(
        secs("SELECT extract(epoch FROM meter.backoff_delay(6, 0.5))::float8").await,
        1920.0
    );
    assert_eq!(
        secs("SELECT extract(epoch FROM meter.backoff_delay(3, 0))::float8").await,
        180.0
    );
    assert_eq!(
        secs("SELECT extract(epoch FROM meter.backoff_delay(3, 1))::float8").await,
        300.0
    );
    assert_eq!(
        secs("SELECT extract(epoch FROM meter.backoff_delay(40, 0.5))::float8").await,
        21600.0
    );
    let (lo, hi): (f64, f64) = {
        let r = c
            .query_one(
                "SELECT min(extract(epoch FROM meter.backoff_delay(2)))::float8, max(extract(epoch FROM meter.backoff_delay(2)))::float8
                 FROM generate_series(1, 2000)",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        lo >= 90.0 && hi <= 150.0 && hi - lo > 40.0,
        "default jitter spreads 120s by ±25%: {lo}..{hi}"
    );
    // A session's own GUC means nothing now: only meter.set_setting does.
    c.run("SET polar_meter.backoff_base = '100 milliseconds'")
        .await;
    assert_eq!(
        secs("SELECT extract(epoch FROM meter.backoff_delay(1, 0.5))::float8").await,
        60.0
    );
    db.set(&c, "backoff_base", "100 milliseconds").await;
    db.set(&c, "backoff_cap", "1 second").await;
    assert_eq!(
        secs("SELECT extract(epoch FROM meter.backoff_delay(1, 0.5))::float8").await,
        0.1
    );
    assert_eq!(
        secs("SELECT extract(epoch FROM meter.backoff_delay(7, 0.5))::float8").await,
        1.0
    );
}

#[tokio::test]
async fn compute_drift_from_sql() {
    let (_db, c) = TestDb::with_admin().await;
    let d: serde_json::Value = c
        .query_one(
            "SELECT meter.compute_drift($1, $2)",
            &[
                &json!({"a": 100, "b": 50}),
                &json!({"a": 98, "b": 50, "c": 1}),
            ],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(d["local_total"], 150);
    assert_eq!(d["remote_total"], 149);
    assert_eq!(d["drift"], 3);
    assert_eq!(d["drift_ratio"], 0.02);
    assert_eq!(d["customers"].as_array().unwrap().len(), 2);
    assert_eq!(
        sqlstate(
            c.query_one("SELECT meter.compute_drift('[]', '{}')", &[])
                .await
        ),
        "PM063"
    );
    let empty: serde_json::Value = c.value("SELECT meter.compute_drift(NULL, NULL)").await;
    assert_eq!(empty["drift"], 0);
}

#[tokio::test]
async fn reconcile_opens_a_lagged_run() {
    let (_db, c) = TestDb::with_admin().await;
    let id: i64 = c.value("SELECT meter.reconcile_meter_to_polar()").await;
    let r = c
        .query_one(
            "SELECT status, window_end - window_start, window_end <= now() - interval '6 hours', date_trunc('hour', window_end) = window_end
             FROM meter.reconcile_run WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "requested");
    assert!(r.get::<_, bool>(2) && r.get::<_, bool>(3));
    let explicit: i64 = c
        .value("SELECT meter.reconcile_meter_to_polar('2026-01-02T00:00:00Z', '1 hour')")
        .await;
    let w = c
        .query_one(
            "SELECT window_start = '2026-01-01T23:00:00Z' FROM meter.reconcile_run WHERE id = $1",
            &[&explicit],
        )
        .await
        .unwrap();
    assert!(w.get::<_, bool>(0));
    assert_eq!(
        sqlstate(
            c.query_one(
                "SELECT meter.reconcile_meter_to_polar(now(), '-1 hour')",
                &[]
            )
            .await
        ),
        "PM060"
    );
}
