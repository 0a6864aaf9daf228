//! The suites that matter most, on Citus: a coordinator and two workers
//! (scripts/citus.sh), the extension distributed by meter.citus_distribute().
//! Recording over HTTP writes only on the worker that holds the
//! organization's shard, in a single-shard transaction; delivery is exactly
//! once under faults and a killed sidecar; reconciliation finds injected
//! drift; every organization's audit chain verifies.
//!
//! One database serves every test (a template clone does not reach the
//! workers), so each test makes organizations of its own, filters by them,
//! and leaves none of its events undelivered; the suite runs one test at a
//! time (scripts/test.sh). Without PM_CITUS_PORT it has nothing to run on.
use pm_e2e::{
    connect_port, customer_id, eventually, http, idem, now_rfc3339, reconcile_done, record_many,
    sqlstate, Emulator, Fetch, Sidecar, Value1,
};
use serde_json::{json, Value};
use tokio_postgres::Client;

struct Citus {
    port: u16,
    db: String,
    pg: Client,
}

async fn citus() -> Option<Citus> {
    let Some(port) = std::env::var("PM_CITUS_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
    else {
        eprintln!("skipped: PM_CITUS_PORT is not set (scripts/test.sh starts Citus and sets it)");
        return None;
    };
    let db = std::env::var("PM_CITUS_DB").unwrap_or_else(|_| "pm_citus".into());
    let pg = connect_port(&db, "postgres", port).await;
    Some(Citus { port, db, pg })
}

impl Citus {
    /// A fresh organization (with a provisionable email) and a fence:meter key.
    async fn org(&self) -> (String, String) {
        let org = format!("c_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        self.pg
            .execute(
                "SELECT meter.upsert_organization($1, $1, $1 || '@example.org')",
                &[&org],
            )
            .await
            .unwrap();
        let key: String = self
            .pg
            .query_one("SELECT key FROM meter.create_api_key($1, 'citus')", &[&org])
            .await
            .unwrap()
            .get(0);
        (org, key)
    }

    async fn sidecar(&self, env: &[(&str, &str)]) -> Sidecar {
        Sidecar::start_on(&self.db, self.port, env).await
    }

    /// A sidecar delivering to `emu`.
    async fn sidecar_for(&self, emu: &Emulator) -> Sidecar {
        let env = emu.sidecar_env();
        let mut env: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        // Two-phase commit records name their backend's pid: the request
        // pool's connections are kept for the whole test, so that its pids
        // name every backend recording went through.
        env.push(("POLAR_METER_DB_CONNECTION_MAX_AGE_SECS", "0"));
        self.sidecar(&env).await
    }

    /// How many events `org` has recorded.
    async fn events_of(&self, org: &str) -> i64 {
        self.pg
            .query_one(
                "SELECT count(*) FROM meter.meter_event WHERE organization_id = $1",
                &[&org],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Citus' two-phase commit records (kept: recovery is off on these nodes).
    async fn two_phase_records(&self) -> std::collections::HashSet<String> {
        self.pg
            .query("SELECT gid FROM pg_dist_transaction", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// The worker port holding `org`'s shard of meter_event.
    async fn worker_of(&self, org: &str) -> i32 {
        self.pg
            .query_one(
                "SELECT nodeport FROM pg_dist_shard_placement
                 WHERE shardid = get_shard_id_for_distribution_column('meter.meter_event', $1::text)",
                &[&org],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Rows inserted so far into the meter_event and audit_log shards of each
    /// worker, from the worker's own statistics.
    async fn inserts_by_worker(&self) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        for port in [self.port + 1, self.port + 2] {
            let w = connect_port(&self.db, "postgres", port).await;
            // Citus hides shards from catalog views unless asked.
            w.batch_execute("SET citus.show_shards_for_app_name_prefixes = '*'")
                .await
                .unwrap();
            let n: i64 = w
                .value(
                    "SELECT coalesce(sum(n_tup_ins), 0)::bigint FROM pg_stat_user_tables
                     WHERE schemaname = 'meter' AND (relname LIKE 'meter\\_event\\_%' OR relname LIKE 'audit\\_log\\_%')",
                )
                .await;
            out.push((port as i32, n));
        }
        out
    }

    async fn statuses(&self, orgs: &[&str]) -> std::collections::BTreeMap<String, i64> {
        let orgs: Vec<String> = orgs.iter().map(|s| s.to_string()).collect();
        self.pg
            .query(
                "SELECT polar_status, count(*) FROM meter.meter_event WHERE organization_id = ANY($1) GROUP BY 1",
                &[&orgs],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    async fn all_sent(&self, orgs: &[&str], n: i64) {
        eventually(180, "every event sent", || async {
            (self.statuses(orgs).await.get("sent").copied().unwrap_or(0) == n).then_some(())
        })
        .await;
    }
}

fn event() -> Value {
    json!({"event_name": "api.request", "event_timestamp": now_rfc3339(), "metadata": {"tokens": 3}})
}

#[tokio::test]
async fn the_tables_are_distributed_by_organization_and_co_located() {
    let Some(c) = citus().await else { return };
    let kinds: Vec<(String, String)> =
        c.pg.query(
            "SELECT logicalrelid::text, partmethod::text FROM pg_dist_partition
             WHERE logicalrelid::text LIKE 'meter.%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let get = |t: &str| kinds.iter().find(|(n, _)| n == t).map(|(_, m)| m.as_str());
    for t in [
        "meter.organization",
        "meter.api_key",
        "meter.setting_value",
        "meter.reconcile_run",
    ] {
        assert_eq!(get(t), Some("n"), "{t} is a reference table: {kinds:?}");
    }
    for t in [
        "meter.meter_event",
        "meter.audit_log",
        "meter.audit_chain",
        "meter.alert",
        "meter.api_key_usage",
    ] {
        assert_eq!(get(t), Some("h"), "{t} is distributed: {kinds:?}");
    }
    let groups: i64 =
        c.pg.value(
            "SELECT count(DISTINCT colocationid) FROM pg_dist_partition
             WHERE partmethod = 'h' AND logicalrelid::text LIKE 'meter.%'",
        )
        .await;
    assert_eq!(groups, 1, "every per-organization table is co-located");

    // The guards travel with the rows: refused on the shards as on one node.
    let (org, _) = c.org().await;
    c.pg.execute(
        "SELECT meter.record_event_for_org($1, 'g', 'e', now())",
        &[&org],
    )
    .await
    .unwrap();
    for (sql, code) in [
        (
            "DELETE FROM meter.meter_event WHERE organization_id = $1",
            "PM041",
        ),
        (
            "UPDATE meter.audit_log SET action = 'x' WHERE organization_id = $1",
            "PM040",
        ),
        ("DELETE FROM meter.organization WHERE id = $1", "PM041"),
    ] {
        assert_eq!(sqlstate(c.pg.execute(sql, &[&org]).await), code, "{sql}");
    }
    assert_eq!(
        sqlstate(c.pg.execute("TRUNCATE meter.meter_event", &[]).await),
        "PM042"
    );
}

#[tokio::test]
async fn recording_over_http_writes_only_on_the_organizations_worker_without_two_phase_commit() {
    let Some(c) = citus().await else { return };
    let (org, key) = c.org().await;
    let emu = Emulator::start(&[]).await;
    let side = c.sidecar_for(&emu).await;
    // pg_cron's drain raises reconcile_overdue after 12 UTC, writing an
    // audit row on whichever worker holds organization ''. Today's run done
    // keeps the workers' statistics to this test's own writes.
    c.pg.execute(
        "INSERT INTO meter.reconcile_run (window_start, window_end, status, finished_at)
         VALUES (date_trunc('day', now()) - interval '1 day', date_trunc('day', now()), 'done', now())",
        &[],
    )
    .await
    .unwrap();
    let before = c.inserts_by_worker().await;
    let two_phase_before = c.two_phase_records().await;
    // Single events, a batch, a replay, a conflicting replay, a revoked key.
    for _ in 0..10 {
        assert_eq!(side.record(&key).await, 202);
    }
    let items: Vec<Value> = (0..10)
        .map(|i| json!({"idempotency_key": format!("b{i}"), "event_name": "e", "event_timestamp": now_rfc3339()}))
        .collect();
    let (status, v) = http()
        .post(side.url("/api/v1/meter/batch"))
        .bearer_auth(&key)
        .json(&json!({"events": items}))
        .fetch()
        .await;
    assert_eq!(status, 202, "{v}");
    assert!(
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "recorded"),
        "{v}"
    );
    let post = |k: &str, body: Value| {
        http()
            .post(side.url("/api/v1/meter"))
            .bearer_auth(&key)
            .header("Idempotency-Key", k.to_string())
            .json(&body)
            .fetch()
    };
    let body = event();
    let (s1, first) = post("same", body.clone()).await;
    let (s2, again) = post("same", body).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(again["status"], "already_recorded");
    assert_eq!(again["event_id"], first["event_id"]);
    let (s3, conflict) = post(
        "same",
        json!({"event_name": "other", "event_timestamp": now_rfc3339()}),
    )
    .await;
    assert_eq!(
        (s3, conflict["type"].as_str()),
        (
            422,
            Some("https://polar-meter.dev/problems/idempotency-key-reused")
        )
    );
    let recorded = c.events_of(&org).await;
    assert_eq!(recorded, 21);

    // Where the rows went: every insert on the organization's worker (21
    // events and 21 audit rows at least), none on the other.
    let home = c.worker_of(&org).await;
    let after = eventually(30, "the workers' statistics", || async {
        let after = c.inserts_by_worker().await;
        let grew = |p: i32| {
            after.iter().find(|(q, _)| *q == p).unwrap().1
                - before.iter().find(|(q, _)| *q == p).unwrap().1
        };
        (grew(home) >= 42).then_some(after)
    })
    .await;
    for ((port, b), (_, a)) in before.iter().zip(&after) {
        if *port != home {
            assert_eq!(
                a - b,
                0,
                "worker {port} got inserts for {org}, whose shard is on {home}"
            );
        }
    }
    // The background pool writes reference tables (the fleet's rate budget,
    // provisioning), which takes two-phase commit; the request pool must not.
    // A record's gid names the coordinator backend: citus_<group>_<pid>_...
    let request_pids: Vec<i32> =
        c.pg.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'polar-meterd requests'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!request_pids.is_empty(), "the request pool is connected");
    let by_requests: Vec<String> = c
        .two_phase_records()
        .await
        .into_iter()
        .filter(|gid| !two_phase_before.contains(gid))
        .filter(|gid| {
            let pid = gid.split('_').nth(2).and_then(|p| p.parse::<i32>().ok());
            pid.is_some_and(|p| request_pids.contains(&p))
        })
        .collect();
    assert_eq!(
        by_requests,
        Vec::<String>::new(),
        "no two-phase commit from recording: single-shard transactions"
    );

    // A revoked key is refused from the next request on.
    let id: uuid::Uuid =
        c.pg.query_one(
            "SELECT id FROM meter.api_key WHERE organization_id = $1",
            &[&org],
        )
        .await
        .unwrap()
        .get(0);
    c.pg.execute("SELECT meter.revoke_api_key($1)", &[&id])
        .await
        .unwrap();
    let (s, v) = post(&idem(), event()).await;
    assert_eq!(
        (s, v["type"].as_str()),
        (
            401,
            Some("https://polar-meter.dev/problems/revoked-api-key")
        )
    );
    c.all_sent(&[&org], 21).await;
}

#[tokio::test]
async fn delivery_is_exactly_once_under_faults_and_a_killed_sidecar() {
    let Some(c) = citus().await else { return };
    let (a, ka) = c.org().await;
    let (b, kb) = c.org().await;
    let emu = Emulator::start(&[]).await;
    let one = c.sidecar_for(&emu).await;
    let two = c.sidecar_for(&emu).await;
    // The customers first: a failed creation waits out its backoff, and the
    // faults are for delivery.
    eventually(60, "both customers created", || async {
        (customer_id(&c.pg, &a).await.is_some() && customer_id(&c.pg, &b).await.is_some())
            .then_some(())
    })
    .await;
    emu.faults(json!({"error_5xx": 0.2, "rate_429": 0.1, "commit_then_drop": 0.05}))
        .await;
    let sent = record_many(&one, &[(a.clone(), ka), (b.clone(), kb)], 1_000, 16).await;
    // One sidecar dies mid-delivery, without reporting what it held.
    eventually(60, "delivery under way", || async {
        (c.statuses(&[&a, &b])
            .await
            .get("sent")
            .copied()
            .unwrap_or(0)
            > 0)
        .then_some(())
    })
    .await;
    one.kill().await;
    emu.faults(json!({})).await;
    c.all_sent(&[&a, &b], 1_000).await;
    drop(two);
    let ours: Vec<Value> = emu.events().await["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["external_customer_id"] == a.as_str() || e["external_customer_id"] == b.as_str()
        })
        .cloned()
        .collect();
    let ids: std::collections::HashSet<&str> = ours
        .iter()
        .map(|e| e["metadata"]["meter_event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), ours.len(), "no event twice at Polar");
    let recorded: std::collections::HashSet<&str> = sent.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, recorded, "Polar holds exactly the recorded events");
}

#[tokio::test]
async fn reconciliation_finds_drift_injected_at_polar() {
    let Some(c) = citus().await else { return };
    let (org, key) = c.org().await;
    let emu = Emulator::start(&[]).await;
    let side = c.sidecar_for(&emu).await;
    record_many(&side, &[(org.clone(), key)], 300, 16).await;
    c.all_sent(&[&org], 300).await;
    // Polar loses five of them (this test's: the database is shared).
    let all = emu.events().await;
    let victims: Vec<Value> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["external_customer_id"] == org.as_str())
        .take(5)
        .cloned()
        .collect();
    let mut lost = std::collections::BTreeSet::new();
    for v in &victims {
        http()
            .delete(format!(
                "{}/__admin/events/{}",
                emu.base,
                v["id"].as_str().unwrap()
            ))
            .send()
            .await
            .unwrap();
        lost.insert(
            v["metadata"]["meter_event_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let id: i64 =
        c.pg.value(
            "SELECT meter.reconcile_meter_to_polar(now() + interval '1 minute', '1 hour', 'full')",
        )
        .await;
    let result = reconcile_done(&c.pg, id, 120).await;
    let found: std::collections::BTreeSet<String> =
        c.pg.query(
            "SELECT event_id FROM meter.reconcile_finding
             WHERE run_id = $1 AND organization_id = $2 AND kind = 'missing_at_polar'",
            &[&id, &org],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(found, lost, "exactly the lost events: {result}");
    let drift: Vec<&Value> = result["customers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["customer"] == org.as_str())
        .collect();
    assert_eq!(drift.len(), 1, "{result}");
    assert_eq!(drift[0]["delta"], -5);
}

#[tokio::test]
async fn every_organizations_audit_chain_verifies_after_a_mixed_run() {
    let Some(c) = citus().await else { return };
    let (org, key) = c.org().await;
    let side = c.sidecar(&[]).await;
    for _ in 0..20 {
        assert_eq!(side.record(&key).await, 202);
    }
    c.pg.execute(
        "SELECT meter.record_event_for_org($1, 'dba-1', 'e', now())",
        &[&org],
    )
    .await
    .unwrap();
    // pg_cron's sealer may take some of them first: what counts is that
    // none is left unsealed, not who sealed them.
    c.pg.execute("SELECT meter.seal_audit_log()", &[])
        .await
        .unwrap();
    let unsealed: i64 =
        c.pg.query_one(
            "SELECT count(*) FROM meter.audit_log WHERE organization_id = $1 AND row_hash IS NULL",
            &[&org],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unsealed, 0, "{org}'s rows are all sealed");
    let broken: Option<String> =
        c.pg.query_one("SELECT problem FROM meter.verify_audit_chain($1)", &[&org])
            .await
            .unwrap()
            .get(0);
    assert_eq!(broken, None, "{org}'s chain verifies");
    let whole: Option<String> =
        c.pg.value("SELECT problem FROM meter.verify_audit_chain()")
            .await;
    assert_eq!(whole, None, "the whole log verifies");
    let seq: i64 =
        c.pg.query_one(
            "SELECT last_seq FROM meter.audit_chain WHERE organization_id = $1",
            &[&org],
        )
        .await
        .unwrap()
        .get(0);
    assert!(seq >= 22, "the chain holds the organization's rows ({seq})");
    // This test's events have no Polar to go to; keep them from later tests'.
    let org_ref = org.as_str();
    let n = c.events_of(org_ref).await;
    assert_eq!(n, 21);
    let emu = Emulator::start(&[]).await;
    drop(side);
    let _deliverer = c.sidecar_for(&emu).await;
    c.all_sent(&[org_ref], 21).await;
}
