//! LISTEN for the database's wake-ups. A notification only sets its job's
//! flag: its payload is never read (anyone who can connect can NOTIFY), and
//! a flood of them costs one pending wake-up per job, not memory.
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::AsyncMessage;

use super::Jobs;

pub async fn run(jobs: Arc<Jobs>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match jobs.target.connect().await {
            Ok((client, mut conn)) => {
                backoff = Duration::from_millis(200);
                // Drive the connection ourselves: notifications arrive as
                // messages on it and would otherwise be dropped.
                let wake = jobs.clone();
                let mut driver = tokio::spawn(async move {
                    let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                    while let Some(msg) = stream.next().await {
                        match msg {
                            Ok(AsyncMessage::Notification(n)) => match n.channel() {
                                "meter_outbox" => wake.wake.drain.notify_one(),
                                "meter_provision" => wake.wake.provision.notify_one(),
                                "meter_reconcile" => wake.wake.reconcile.notify_one(),
                                "polar_meter_alert" => wake.wake.alerts.notify_one(),
                                _ => {}
                            },
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "notification connection lost");
                                break;
                            }
                        }
                    }
                });
                match crate::store::listen::listen(&client).await {
                    Err(e) => tracing::warn!(error = %e, "subscribing to notifications failed"),
                    Ok(()) => {
                        tracing::info!("listening for database notifications");
                        // Whatever was notified while we were away is in the tables.
                        jobs.wake.all();
                        tokio::select! {
                            _ = &mut driver => {}
                            _ = stop.changed() => { driver.abort(); return; }
                        }
                    }
                }
                driver.abort();
            }
            Err(e) => {
                tracing::warn!(error = %crate::db::DbError::from(e), "notification connection failed; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
