//! The audit log: append-only, sealed asynchronously into a hash chain that
//! detects altered, removed and skipped rows.
use pm_e2e::{sqlstate, TestDb};
use tokio_postgres::Client;

async fn with_events(n: i32) -> (TestDb, Client) {
    let db = TestDb::new().await;
    let c = db.admin().await;
    db.org(&c, "acme").await;
    c.execute(
        "SELECT meter.record_event_for_org('acme', 'k' || i, 'api.request', now()) FROM generate_series(1, $1) i",
        &[&n],
    )
    .await
    .unwrap();
    (db, c)
}

async fn verify(c: &Client) -> Option<(i64, String)> {
    let r = c
        .query_one(
            "SELECT b.id, b.problem FROM meter.verify_audit_chain() b",
            &[],
        )
        .await
        .unwrap();
    r.get::<_, Option<i64>>(0).map(|id| (id, r.get(1)))
}

async fn seal(c: &Client) -> i32 {
    c.query_one("SELECT meter.seal_audit_log()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn sealing_chains_every_row_and_verify_passes() {
    let (_db, c) = with_events(20).await;
    assert_eq!(verify(&c).await, None, "an unsealed tail is not a break");
    assert_eq!(
        seal(&c).await,
        20,
        "no other writer in this database, so all are final"
    );
    assert_eq!(seal(&c).await, 0, "nothing left to seal");
    assert_eq!(verify(&c).await, None);
    let unsealed: i64 = c
        .query_one(
            "SELECT count(*) FROM meter.audit_log WHERE row_hash IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unsealed, 0);
    let linked: bool = c
        .query_one(
            "SELECT bool_and(a.prev_hash = b.row_hash) FROM meter.audit_log a
             JOIN meter.audit_log b ON b.id = (SELECT max(id) FROM meter.audit_log WHERE id < a.id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(linked, "each row holds its predecessor's hash");
}

#[tokio::test]
async fn the_log_is_append_only() {
    let (_db, c) = with_events(3).await;
    seal(&c).await;
    assert_eq!(
        sqlstate(
            c.execute("UPDATE meter.audit_log SET action = 'x'", &[])
                .await
        ),
        "PM040"
    );
    assert_eq!(
        sqlstate(c.execute("DELETE FROM meter.audit_log", &[]).await),
        "PM040"
    );
    assert_eq!(
        sqlstate(c.execute("TRUNCATE meter.audit_log", &[]).await),
        "PM040"
    );
    // Not even filling in hashes by hand on a sealed row.
    assert_eq!(
        sqlstate(
            c.execute("UPDATE meter.audit_log SET row_hash = '\\x00'", &[])
                .await
        ),
        "PM040"
    );
}

/// Tampering as a superuser with the triggers disabled, as an attacker would.
async fn tamper(c: &Client, sql: &str) {
    c.batch_execute(&format!(
        "ALTER TABLE meter.audit_log DISABLE TRIGGER USER; {sql}; ALTER TABLE meter.audit_log ENABLE TRIGGER USER;"
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn an_altered_row_is_the_first_broken_link() {
    let (_db, c) = with_events(10).await;
    seal(&c).await;
    tamper(
        &c,
        "UPDATE meter.audit_log SET detail = detail || '{\"payload_hash\":\"00\"}' WHERE id = 6",
    )
    .await;
    let (id, problem) = verify(&c).await.expect("tampering detected");
    assert_eq!(id, 6);
    assert!(problem.contains("altered"), "{problem}");
}

#[tokio::test]
async fn a_removed_row_is_detected() {
    let (_db, c) = with_events(10).await;
    seal(&c).await;
    tamper(&c, "DELETE FROM meter.audit_log WHERE id = 4").await;
    let (id, problem) = verify(&c).await.expect("removal detected");
    assert_eq!(id, 5, "the row after the gap no longer links");
    assert!(problem.contains("removed"), "{problem}");

    let (_db2, c2) = with_events(5).await;
    seal(&c2).await;
    tamper(&c2, "DELETE FROM meter.audit_log WHERE id = 5").await;
    assert_eq!(
        verify(&c2).await.map(|b| b.0),
        Some(5),
        "removing the newest row breaks the head"
    );
}

#[tokio::test]
async fn an_unsealed_row_below_the_frontier_is_an_anomaly() {
    let (_db, c) = with_events(6).await;
    seal(&c).await;
    tamper(
        &c,
        "UPDATE meter.audit_log SET row_hash = NULL, prev_hash = NULL WHERE id = 3",
    )
    .await;
    let (id, problem) = verify(&c).await.expect("anomaly detected");
    assert_eq!(id, 3);
    assert!(problem.contains("below the sealed frontier"), "{problem}");
}

#[tokio::test]
async fn the_sealer_waits_for_a_transaction_that_could_hold_a_lower_id() {
    let (db, c) = with_events(2).await;
    assert_eq!(seal(&c).await, 2);
    // Session A takes audit id 3 and stays open; B takes id 4 and commits.
    let a = db.admin().await;
    a.batch_execute("BEGIN; SELECT meter.record_event_for_org('acme', 'slow', 'e', now());")
        .await
        .unwrap();
    c.execute(
        "SELECT meter.record_event_for_org('acme', 'fast', 'e', now())",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(seal(&c).await, 0, "id 4 must wait: A may still commit id 3");
    a.batch_execute("COMMIT").await.unwrap();
    // The sealer may also wait on unrelated writers of this database (none
    // here), so poll with a deadline rather than expect one call to do it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut sealed = 0;
    while sealed < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "ids 3 and 4 not sealed in time"
        );
        sealed += seal(&c).await;
    }
    assert_eq!(sealed, 2);
    assert_eq!(verify(&c).await, None);
    let order: Vec<i64> = c
        .query("SELECT id FROM meter.audit_log ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(order, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn concurrent_sealers_never_fork_the_chain() {
    let (db, c) = with_events(300).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let s = db.admin().await;
        tasks.push(tokio::spawn(async move {
            s.query_one("SELECT meter.seal_audit_log(50)", &[])
                .await
                .unwrap()
                .get::<_, i32>(0)
        }));
    }
    let sealed: i32 = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum();
    assert_eq!(sealed, 200);
    while seal(&c).await > 0 {}
    assert_eq!(verify(&c).await, None);
}
