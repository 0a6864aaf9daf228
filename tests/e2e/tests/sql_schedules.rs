//! pg_cron schedules: installed with the extension where pg_cron is, changed
//! by a function, and absent (with instructions) where it is not.
use pm_e2e::Value1;
use pm_e2e::{connect, pg, sqlstate, TestDb};

async fn jobs(c: &tokio_postgres::Client) -> Vec<(String, String, String)> {
    c.query("SELECT jobname::text, schedule::text, command FROM cron.job WHERE jobname LIKE 'polar_meter_%' ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn jobs_exist_in_the_cron_database_and_can_be_rescheduled() {
    let c = connect(&pg::cron_db(), "postgres").await;
    let j = jobs(&c).await;
    let names: Vec<&str> = j.iter().map(|x| x.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "polar_meter_drain",
            "polar_meter_reconcile",
            "polar_meter_seal"
        ]
    );
    assert_eq!(j[0].2, "SELECT meter.drain_meter_outbox()");
    assert_eq!(j[1].1, "0 3 * * *");
    // The jobs' commands run without error here.
    for (_, _, cmd) in &j {
        c.run(cmd).await;
    }
    // Reschedule in a transaction that is rolled back, so no other test (or
    // a later run) sees the change.
    c.run("BEGIN").await;
    c.query_one("SELECT meter.set_schedule('drain', '*/2 * * * *')", &[])
        .await
        .unwrap();
    assert_eq!(jobs(&c).await[0].1, "*/2 * * * *");
    c.run("ROLLBACK").await;
    assert_eq!(jobs(&c).await[0].1, "*/5 * * * *");
    assert_eq!(
        sqlstate(
            c.query_one("SELECT meter.set_schedule('nope', '* * * * *')", &[])
                .await
        ),
        "PM070"
    );
    // pg_cron refuses what it cannot run; the error surfaces unchanged.
    assert!(c
        .query_one(
            "SELECT meter.set_schedule('drain', 'every now and then')",
            &[]
        )
        .await
        .is_err());
    // Installing again keeps what is there.
    let again = c
        .query("SELECT * FROM meter.install_schedules()", &[])
        .await
        .unwrap();
    assert_eq!(again.len(), 3);
}

#[tokio::test]
async fn without_pg_cron_the_extension_installs_and_explains() {
    let (_db, c) = TestDb::with_admin().await;
    let has_cron: bool = c.value("SELECT meter._has_pg_cron()").await;
    assert!(!has_cron);
    assert!(c
        .query("SELECT * FROM meter.install_schedules()", &[])
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        sqlstate(
            c.query_one("SELECT meter.set_schedule('drain', '* * * * *')", &[])
                .await
        ),
        "PM035"
    );
    assert_eq!(
        c.query_one("SELECT meter.unschedule_jobs()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        0
    );
}
