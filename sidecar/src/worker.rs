//! The Polar caller: LISTEN for the database's wake-ups, drain the outbox,
//! provision customers, forward alerts. NOTIFY is only a hint: every loop also
//! runs at start, on a timer and after every reconnect, so a missed
//! notification delays work and never loses it.
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio_postgres::AsyncMessage;

use crate::polar::{Client, Ingest};

#[derive(Clone, Debug)]
pub struct Settings {
    pub database_url: String,
    pub batch_size: i32,
    pub lease: Duration,
    pub poll: Duration,
    pub alert_webhook_url: Option<String>,
}

/// Polar caps a body at 10 MiB; stay well under it.
const MAX_BODY_BYTES: usize = 9 * 1024 * 1024;

pub struct Workers {
    pool: Pool,
    polar: Arc<Client>,
    s: Settings,
    drain: Notify,
    provision: Notify,
    reconcile: Notify,
    batches: tokio::sync::Mutex<Vec<uuid::Uuid>>,
}

impl Workers {
    pub fn new(pool: Pool, polar: Arc<Client>, s: Settings) -> Self {
        Workers {
            pool,
            polar,
            s,
            drain: Notify::new(),
            provision: Notify::new(),
            reconcile: Notify::new(),
            batches: Default::default(),
        }
    }
}

pub fn spawn(
    pool: Pool,
    polar: Arc<Client>,
    s: Settings,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let w = Arc::new(Workers::new(pool, polar, s));
    let (alert_tx, alert_rx) = mpsc::channel::<String>(1024);
    vec![
        tokio::spawn(w.clone().listen(alert_tx, stop.clone())),
        tokio::spawn(w.clone().drainer(stop.clone())),
        tokio::spawn(w.clone().provisioner(stop.clone())),
        tokio::spawn(w.clone().reconciler(stop.clone())),
        tokio::spawn(w.clone().alerts(alert_rx)),
    ]
}

impl Workers {
    async fn listen(
        self: Arc<Self>,
        alerts: mpsc::Sender<String>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match tokio_postgres::connect(&self.s.database_url, tokio_postgres::NoTls).await {
                Ok((client, mut conn)) => {
                    backoff = Duration::from_millis(200);
                    // Drive the connection ourselves: notifications arrive as
                    // messages on it and would otherwise be dropped.
                    let (tx, mut rx) = mpsc::unbounded_channel();
                    let driver = tokio::spawn(async move {
                        let mut stream =
                            futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                        while let Some(msg) = stream.next().await {
                            match msg {
                                Ok(AsyncMessage::Notification(n)) => {
                                    let _ =
                                        tx.send((n.channel().to_string(), n.payload().to_string()));
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::warn!(error = %e, "notification connection lost");
                                    break;
                                }
                            }
                        }
                    });
                    let listened = client
                        .batch_execute("LISTEN meter_outbox; LISTEN meter_provision; LISTEN meter_reconcile; LISTEN polar_meter_alert;")
                        .await;
                    if let Err(e) = listened {
                        tracing::warn!(error = %e, "LISTEN failed");
                    } else {
                        tracing::info!("listening for database notifications");
                        // Whatever was notified while we were away is in the tables.
                        self.drain.notify_one();
                        self.provision.notify_one();
                        self.reconcile.notify_one();
                        loop {
                            tokio::select! {
                                m = rx.recv() => match m {
                                    Some((channel, payload)) => self.on_notification(&channel, payload, &alerts).await,
                                    None => break,
                                },
                                _ = stop.changed() => { driver.abort(); return; }
                            }
                        }
                    }
                    driver.abort();
                }
                Err(e) => tracing::warn!(error = %e, "notification connection failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn on_notification(&self, channel: &str, payload: String, alerts: &mpsc::Sender<String>) {
        match channel {
            "meter_outbox" => {
                if let Ok(batch) = payload.parse::<uuid::Uuid>() {
                    self.batches.lock().await.push(batch);
                }
                self.drain.notify_one();
            }
            "meter_provision" => self.provision.notify_one(),
            "meter_reconcile" => self.reconcile.notify_one(),
            "polar_meter_alert" => {
                let _ = alerts.try_send(payload);
            }
            _ => {}
        }
    }

    async fn wait(&self, what: &Notify, stop: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            _ = what.notified() => true,
            _ = tokio::time::sleep(self.s.poll) => true,
            _ = stop.changed() => false,
        }
    }

    async fn drainer(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            if let Err(e) = self.drain_until_empty(&stop).await {
                tracing::warn!(error = %e, "draining the outbox failed; will retry");
            }
            if !self.wait(&self.drain, &mut stop).await {
                return;
            }
        }
    }

    /// Keeps sending while due rows remain (a cron tick is a floor, not a
    /// ceiling); the shared limiter paces the calls.
    async fn drain_until_empty(&self, stop: &watch::Receiver<bool>) -> Result<(), String> {
        let lease = format!("{} seconds", self.s.lease.as_secs());
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let client = self.pool.get().await.map_err(db_err)?;
            // Batches the cron job claimed are taken over first.
            let taken = std::mem::take(&mut *self.batches.lock().await);
            let mut rows = Vec::new();
            for b in taken {
                rows.extend(
                    client
                        .query("SELECT new_batch_id, event_id, payload FROM meter.take_meter_batch($1, $2::text::interval)", &[&b, &lease])
                        .await
                        .map_err(db_err)?,
                );
            }
            if rows.is_empty() {
                rows = client
                    .query(
                        "SELECT batch_id, event_id, payload FROM meter.drain_meter_outbox($1, $2::text::interval, false)",
                        &[&self.s.batch_size, &lease],
                    )
                    .await
                    .map_err(db_err)?;
            }
            drop(client);
            if rows.is_empty() {
                return Ok(());
            }
            let mut by_batch: std::collections::BTreeMap<uuid::Uuid, Vec<(uuid::Uuid, Value)>> =
                Default::default();
            for r in rows {
                by_batch
                    .entry(r.get(0))
                    .or_default()
                    .push((r.get(1), r.get(2)));
            }
            for (batch, events) in by_batch {
                for chunk in chunks_under(&events, MAX_BODY_BYTES) {
                    self.send(batch, chunk).await?;
                }
            }
        }
    }

    /// Sends one chunk and reports its outcome. A 422 names the bad events:
    /// they are rejected and the rest resent at once; when Polar names none,
    /// the chunk is bisected until the bad ones stand alone.
    async fn send(&self, batch: uuid::Uuid, events: &[(uuid::Uuid, Value)]) -> Result<(), String> {
        let mut pending: Vec<&[(uuid::Uuid, Value)]> = vec![events];
        while let Some(chunk) = pending.pop() {
            if chunk.is_empty() {
                continue;
            }
            let payloads: Vec<&Value> = chunk.iter().map(|(_, p)| p).collect();
            let ids: Vec<uuid::Uuid> = chunk.iter().map(|(id, _)| *id).collect();
            match self.polar.ingest(&payloads).await {
                Ingest::Accepted {
                    inserted,
                    duplicates,
                } => {
                    let n = self
                        .report("SELECT meter.delivery_sent($1, $2)", batch, &ids, None)
                        .await?;
                    tracing::info!(
                        events = chunk.len(),
                        inserted,
                        duplicates,
                        marked_sent = n,
                        "delivered to Polar"
                    );
                }
                Ingest::RateLimited(wait) => {
                    let secs = format!("{} seconds", wait.as_secs());
                    self.report(
                        "SELECT meter.delivery_deferred($1, $2, $3::text::interval)",
                        batch,
                        &ids,
                        Some(&secs),
                    )
                    .await?;
                    tracing::info!(
                        events = chunk.len(),
                        retry_after_secs = wait.as_secs(),
                        "Polar rate-limited us"
                    );
                }
                Ingest::Failed(err) => {
                    let n = self
                        .report(
                            "SELECT meter.delivery_failed($1, $2, $3)",
                            batch,
                            &ids,
                            Some(&err),
                        )
                        .await?;
                    tracing::warn!(events = chunk.len(), marked = n, error = %err, "delivery to Polar failed; backing off");
                }
                Ingest::Invalid { indexes, message } => {
                    let bad: Vec<uuid::Uuid> = indexes
                        .iter()
                        .filter_map(|i| chunk.get(*i).map(|e| e.0))
                        .collect();
                    if !bad.is_empty() {
                        self.report(
                            "SELECT meter.delivery_rejected($1, $2, $3)",
                            batch,
                            &bad,
                            Some(&message),
                        )
                        .await?;
                        tracing::warn!(rejected = bad.len(), error = %message, "Polar rejected events; resending the rest");
                        let rest: Vec<(uuid::Uuid, Value)> = chunk
                            .iter()
                            .filter(|e| !bad.contains(&e.0))
                            .cloned()
                            .collect();
                        if !rest.is_empty() {
                            Box::pin(self.send(batch, &rest)).await?;
                        }
                    } else if chunk.len() == 1 {
                        self.report(
                            "SELECT meter.delivery_rejected($1, $2, $3)",
                            batch,
                            &ids,
                            Some(&message),
                        )
                        .await?;
                    } else {
                        let (a, b) = chunk.split_at(chunk.len() / 2);
                        pending.push(b);
                        pending.push(a);
                    }
                }
            }
        }
        Ok(())
    }

    async fn report(
        &self,
        sql: &str,
        batch: uuid::Uuid,
        ids: &[uuid::Uuid],
        arg: Option<&String>,
    ) -> Result<i32, String> {
        // Reporting must not be lost to a blip: retry until the database answers
        // (the lease keeps anyone else off these rows meanwhile).
        let mut tries = 0;
        loop {
            let res = async {
                let c = self.pool.get().await.map_err(db_err)?;
                let row = match arg {
                    Some(a) => c.query_one(sql, &[&batch, &ids, a]).await,
                    None => c.query_one(sql, &[&batch, &ids]).await,
                }
                .map_err(db_err)?;
                Ok::<i32, String>(row.get(0))
            }
            .await;
            match res {
                Ok(n) => return Ok(n),
                Err(e) if tries < 20 => {
                    tries += 1;
                    tracing::warn!(error = %e, "reporting a delivery outcome failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250 * tries)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn provisioner(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            if let Err(e) = self.provision_due().await {
                tracing::warn!(error = %e, "provisioning customers failed; will retry");
            }
            if !self.wait(&self.provision, &mut stop).await {
                return;
            }
        }
    }

    /// Provisions every due organization; returns how many got a customer.
    pub async fn provision_due(&self) -> Result<usize, String> {
        let mut done = 0;
        loop {
            let c = self.pool.get().await.map_err(db_err)?;
            let lease = format!("{} seconds", self.s.lease.as_secs());
            let orgs = c
                .query("SELECT org_id, name, email FROM meter.claim_provisioning(20, $1::text::interval)", &[&lease])
                .await
                .map_err(db_err)?;
            drop(c);
            if orgs.is_empty() {
                return Ok(done);
            }
            for o in orgs {
                let (id, name, email): (String, String, Option<String>) =
                    (o.get(0), o.get(1), o.get(2));
                let result = self
                    .polar
                    .ensure_customer(&id, &name, email.as_deref())
                    .await;
                let c = self.pool.get().await.map_err(db_err)?;
                match result {
                    Ok(customer) => {
                        c.query_one(
                            "SELECT meter.customer_provisioned($1, $2)",
                            &[&id, &customer],
                        )
                        .await
                        .map_err(db_err)?;
                        tracing::info!(organization_id = %id, polar_customer_id = %customer, "Polar customer provisioned");
                        done += 1;
                    }
                    Err(err) => {
                        c.query_one("SELECT meter.provisioning_failed($1, $2)", &[&id, &err])
                            .await
                            .map_err(db_err)?;
                        tracing::warn!(organization_id = %id, error = %err, "creating the Polar customer failed");
                    }
                }
            }
        }
    }

    async fn reconciler(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            loop {
                match self.reconcile_next(None).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "reconciliation failed; will retry");
                        break;
                    }
                }
            }
            if !self.wait(&self.reconcile, &mut stop).await {
                return;
            }
        }
    }

    /// Runs one reconcile run (the oldest due, or `only`): pages through
    /// Polar's list for its window, handing each page to the database as it
    /// comes (resuming after pages already held), then asks the database for
    /// the comparison. Returns the result, or None when no run was due.
    pub async fn reconcile_next(&self, only: Option<i64>) -> Result<Option<Value>, String> {
        let lease = "5 minutes".to_string();
        let c = self.pool.get().await.map_err(db_err)?;
        let Some(run) = c
            .query_opt("SELECT run_id, window_start, window_end, pages_done FROM meter.claim_reconcile_run($1::text::interval, $2)", &[&lease, &only])
            .await
            .map_err(db_err)?
        else {
            return Ok(None);
        };
        drop(c);
        let (id, start, end, done): (
            i64,
            chrono::DateTime<chrono::Utc>,
            chrono::DateTime<chrono::Utc>,
            i32,
        ) = (run.get(0), run.get(1), run.get(2), run.get(3));
        let fmt = |t: chrono::DateTime<chrono::Utc>| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        };
        let from = fmt(start - chrono::Duration::microseconds(1));
        let to = fmt(end);
        tracing::info!(run_id = id, window_start = %fmt(start), window_end = %to, resume_after_page = done, "reconciling");
        let mut page = done as u64 + 1;
        let mut rate_limited = 0;
        loop {
            match self.polar.list_events(&from, &to, page, 100).await {
                crate::polar::Page::Events { items, max_page } => {
                    if !items.is_empty() {
                        let c = self.pool.get().await.map_err(db_err)?;
                        c.query_one(
                            "SELECT meter.reconcile_add_remote($1, $2, $3, $4::text::interval)",
                            &[&id, &(page as i32), &Value::Array(items), &lease],
                        )
                        .await
                        .map_err(db_err)?;
                    }
                    if page >= max_page {
                        break;
                    }
                    page += 1;
                }
                crate::polar::Page::RateLimited(_) if rate_limited < 10 => rate_limited += 1,
                crate::polar::Page::RateLimited(_) => {
                    return self.reconcile_failed(id, "rate limited too often").await
                }
                crate::polar::Page::Failed(e) => return self.reconcile_failed(id, &e).await,
            }
        }
        let c = self.pool.get().await.map_err(db_err)?;
        let result: Value = c
            .query_one("SELECT meter.reconcile_finish($1)", &[&id])
            .await
            .map_err(db_err)?
            .get(0);
        let drift = result["drift"].as_i64().unwrap_or(0);
        let missing = result["missing_at_polar"]["count"].as_i64().unwrap_or(0);
        let unexpected = result["unexpected_at_polar"]["count"].as_i64().unwrap_or(0);
        if drift > 0 || missing > 0 || unexpected > 0 {
            tracing::warn!(run_id = id, drift, missing, unexpected, max_customer_drift_ratio = %result["max_customer_drift_ratio"],
                backlog = %result["backlog"], "reconciliation found drift");
        } else {
            tracing::info!(run_id = id, local_sent = %result["local_sent"], backlog = %result["backlog"], "reconciliation clean");
        }
        Ok(Some(result))
    }

    async fn reconcile_failed(&self, id: i64, error: &str) -> Result<Option<Value>, String> {
        let c = self.pool.get().await.map_err(db_err)?;
        c.query_one("SELECT meter.reconcile_failed($1, $2)", &[&id, &error])
            .await
            .map_err(db_err)?;
        Err(format!("reconcile run {id}: {error}"))
    }

    /// Logs every alert as a structured warning and forwards it to the
    /// webhook, with retries.
    async fn alerts(self: Arc<Self>, mut rx: mpsc::Receiver<String>) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client");
        while let Some(payload) = rx.recv().await {
            let v: Value = serde_json::from_str(&payload).unwrap_or(Value::String(payload.clone()));
            tracing::warn!(kind = %v["kind"], organization_id = %v["organization_id"], detail = %v["detail"], "alert");
            let Some(url) = &self.s.alert_webhook_url else {
                continue;
            };
            let mut delay = Duration::from_millis(500);
            for attempt in 1..=5 {
                match http.post(url).json(&v).send().await {
                    Ok(r) if r.status().is_success() => break,
                    Ok(r) => tracing::warn!(
                        status = r.status().as_u16(),
                        attempt,
                        "alert webhook refused the alert"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e.without_url(), attempt, "alert webhook unreachable")
                    }
                }
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

/// A database failure as text with its SQLSTATE and message (tokio-postgres's
/// Display says only "db error"), through the sidecar's one classification.
fn db_err(e: impl Into<crate::db::DbError>) -> String {
    match e.into() {
        crate::db::DbError::Sql { code, message } => format!("{code}: {message}"),
        crate::db::DbError::Unavailable(m) | crate::db::DbError::Internal(m) => m,
    }
}

/// Splits events into runs whose JSON body stays under `limit` bytes.
fn chunks_under(events: &[(uuid::Uuid, Value)], limit: usize) -> Vec<&[(uuid::Uuid, Value)]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 16);
    for (i, (_, p)) in events.iter().enumerate() {
        let n = p.to_string().len() + 1;
        if i > start && size + n > limit {
            out.push(&events[start..i]);
            start = i;
            size = 16;
        }
        size += n;
    }
    if start < events.len() {
        out.push(&events[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chunks_respect_the_byte_limit_and_keep_every_event() {
        let events: Vec<(uuid::Uuid, Value)> = (0..100)
            .map(|i| (uuid::Uuid::new_v4(), json!({"n": "x".repeat(90), "i": i})))
            .collect();
        let chunks = chunks_under(&events, 1000);
        assert!(chunks.len() > 10);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 100);
        for c in &chunks {
            let body =
                serde_json::to_vec(&json!({"events": c.iter().map(|e| &e.1).collect::<Vec<_>>()}))
                    .unwrap();
            assert!(body.len() <= 1000, "{}", body.len());
        }
        assert_eq!(chunks_under(&events, usize::MAX).len(), 1);
        assert!(chunks_under(&[], 10).is_empty());
    }
}
