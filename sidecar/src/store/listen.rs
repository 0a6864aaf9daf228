//! The LISTEN session's one statement.
use super::DbError;

/// The channels the extension notifies: each only wakes its job.
pub const CHANNELS: [&str; 4] = [
    "meter_outbox",
    "meter_provision",
    "meter_reconcile",
    "polar_meter_alert",
];

/// Subscribes `client` (a connection of its own) to every channel.
pub async fn listen(client: &tokio_postgres::Client) -> Result<(), DbError> {
    let sql: String = CHANNELS.iter().map(|c| format!("LISTEN {c};")).collect();
    Ok(client.batch_execute(&sql).await?)
}
