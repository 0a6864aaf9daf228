//! The audit log: append-only, each organization's rows sealed asynchronously
//! into a hash chain of their own that detects altered and removed rows, and
//! that a writer holding an id open can never make skip a row.
use pm_e2e::Value1;
use pm_e2e::{sqlstate, TestDb};
use tokio_postgres::Client;

async fn with_events(orgs: &[&str], n: i32) -> (TestDb, Client) {
    let (db, c) = TestDb::with_admin().await;
    for org in orgs {
        db.org(&c, org).await;
        c.execute(
            "SELECT meter.record_event_for_org($2, 'k' || i, 'api.request', now()) FROM generate_series(1, $1) i",
            &[&n, org],
        )
        .await
        .unwrap();
    }
    (db, c)
}

/// The first broken link: (organization, row id, problem).
async fn verify(c: &Client) -> Option<(String, Option<i64>, String)> {
    let r = c
        .query_one(
            "SELECT b.organization_id, b.id, b.problem FROM meter.verify_audit_chain() b",
            &[],
        )
        .await
        .unwrap();
    r.get::<_, Option<String>>(2)
        .map(|p| (r.get(0), r.get(1), p))
}

async fn seal(c: &Client) -> i32 {
    c.value("SELECT meter.seal_audit_log()").await
}

async fn chain(c: &Client, org: &str) -> Vec<(i64, i64)> {
    c.query(
        "SELECT seq, id FROM meter.audit_log WHERE organization_id = $1 AND seq IS NOT NULL ORDER BY seq",
        &[&org],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test]
async fn each_organization_gets_a_gapless_chain_of_its_own() {
    let (_db, c) = with_events(&["acme", "globex"], 20).await;
    assert_eq!(verify(&c).await, None, "an unsealed tail is not a break");
    // 20 events + the organization's creation, per organization.
    assert_eq!(seal(&c).await, 42);
    assert_eq!(seal(&c).await, 0, "nothing left to seal");
    assert_eq!(verify(&c).await, None);
    for org in ["acme", "globex"] {
        let seqs: Vec<i64> = chain(&c, org).await.iter().map(|x| x.0).collect();
        assert_eq!(seqs, (1..=21).collect::<Vec<i64>>(), "{org}");
        let linked: bool = c
            .query_one(
                "SELECT bool_and(a.prev_hash = b.row_hash) FROM meter.audit_log a
                 JOIN meter.audit_log b ON b.organization_id = a.organization_id AND b.seq = a.seq - 1
                 WHERE a.organization_id = $1",
                &[&org],
            )
            .await
            .unwrap()
            .get(0);
        assert!(linked, "each row holds its predecessor's hash");
    }
    let heads: i64 = c
        .value("SELECT count(*) FROM meter.audit_chain WHERE last_seq = 21")
        .await;
    assert_eq!(heads, 2);
}

#[tokio::test]
async fn the_log_is_append_only_and_never_truncated() {
    let (_db, c) = with_events(&["acme"], 3).await;
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
        "PM042"
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
    c.run(&format!(
        "ALTER TABLE meter.audit_log DISABLE TRIGGER USER; {sql}; ALTER TABLE meter.audit_log ENABLE TRIGGER USER;"
    )).await;
}

#[tokio::test]
async fn an_altered_row_is_the_first_broken_link() {
    let (_db, c) = with_events(&["acme", "globex"], 10).await;
    seal(&c).await;
    let victim = chain(&c, "globex").await[5].1;
    tamper(
        &c,
        &format!("UPDATE meter.audit_log SET detail = detail || '{{\"payload_hash\":\"00\"}}' WHERE organization_id = 'globex' AND id = {victim}"),
    )
    .await;
    let (org, id, problem) = verify(&c).await.expect("tampering detected");
    assert_eq!((org.as_str(), id), ("globex", Some(victim)));
    assert!(problem.contains("altered"), "{problem}");
}

#[tokio::test]
async fn a_removed_row_is_detected() {
    let (_db, c) = with_events(&["acme"], 10).await;
    seal(&c).await;
    let rows = chain(&c, "acme").await;
    tamper(
        &c,
        &format!(
            "DELETE FROM meter.audit_log WHERE organization_id = 'acme' AND id = {}",
            rows[3].1
        ),
    )
    .await;
    let (_, id, problem) = verify(&c).await.expect("removal detected");
    assert_eq!(id, Some(rows[4].1), "the row after the gap no longer links");
    assert!(problem.contains("removed"), "{problem}");

    let (_db2, c2) = with_events(&["acme"], 5).await;
    seal(&c2).await;
    let last = *chain(&c2, "acme").await.last().unwrap();
    tamper(
        &c2,
        &format!(
            "DELETE FROM meter.audit_log WHERE organization_id = 'acme' AND id = {}",
            last.1
        ),
    )
    .await;
    let (_, _, problem) = verify(&c2)
        .await
        .expect("removing the newest row is detected");
    assert!(problem.contains("chain head"), "{problem}");
}

#[tokio::test]
async fn a_forged_row_after_the_head_is_detected() {
    let (_db, c) = with_events(&["acme"], 3).await;
    seal(&c).await;
    // Extend the chain by hand, correctly hashed, without moving the head.
    tamper(
        &c,
        "INSERT INTO meter.audit_log (organization_id, action, detail) VALUES ('acme', 'event.recorded', '{}');
         UPDATE meter.audit_log a SET seq = 5, prev_hash = (SELECT last_hash FROM meter.audit_chain WHERE organization_id = 'acme'),
             row_hash = (meter._audit_chain_hashes((SELECT last_hash FROM meter.audit_chain WHERE organization_id = 'acme'),
                 ARRAY[meter._audit_text(a.organization_id, 5, a.id, a.action, a.subject, a.detail, a.actor, a.created_at)]))[1]
         WHERE a.row_hash IS NULL",
    )
    .await;
    let (_, _, problem) = verify(&c)
        .await
        .expect("a row the sealer did not make is detected");
    assert!(problem.contains("chain head"), "{problem}");
}

#[tokio::test]
async fn a_writer_holding_an_earlier_id_open_is_chained_after_the_rows_that_committed_first() {
    let (db, c) = with_events(&["acme"], 2).await;
    assert_eq!(seal(&c).await, 3);
    // Session A takes the next audit id and stays open; B takes a later one and commits.
    let a = db.admin().await;
    a.run("BEGIN; SELECT meter.record_event_for_org('acme', 'slow', 'e', now());")
        .await;
    c.execute(
        "SELECT meter.record_event_for_org('acme', 'fast', 'e', now())",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        seal(&c).await,
        1,
        "B's row is sealed now: nothing waits on A"
    );
    a.run("COMMIT").await;
    assert_eq!(
        seal(&c).await,
        1,
        "A's row joins the chain when it becomes visible"
    );
    assert_eq!(verify(&c).await, None);
    let rows = chain(&c, "acme").await;
    assert_eq!(rows.len(), 5);
    assert!(
        rows[4].1 < rows[3].1,
        "A's lower id comes after B's in the chain: {rows:?}"
    );
}

#[tokio::test]
async fn concurrent_sealers_never_fork_the_chain() {
    let (db, c) = with_events(&["acme"], 299).await;
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
    // Each sealer goes on in chunks of 50 until none is left: together they
    // seal every row (299 events and the organization's own row) once.
    assert_eq!(sealed, 300);
    assert_eq!(seal(&c).await, 0);
    assert_eq!(verify(&c).await, None);
    assert_eq!(chain(&c, "acme").await.len(), 300);
}
