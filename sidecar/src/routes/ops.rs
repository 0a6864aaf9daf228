//! Discovery, health and metrics: /readyz (is the database there, and does
//! its extension serve this binary?) and /metrics.
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::json;

use super::extract::json_response;
use super::{db_problem, App, Handled, Resp};
use crate::db::DbError;
use crate::metrics::{Now, PoolUsage};
use crate::problem::Problem;

fn version(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split(['.', '-', '+']).map(|p| p.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// Ready when the database answers and the installed extension serves this
/// binary: at least the oldest version whose functions it calls, and no newer
/// than one that still serves it (so `ALTER EXTENSION ... UPDATE` before the
/// sidecars are replaced keeps them in rotation).
pub(super) async fn readyz(app: &App) -> Handled {
    let v = match crate::store::keys::versions(&app.pools.requests).await {
        // The function that names the oldest sidecar served is missing: an
        // extension before 0.3.0.
        Err(DbError::Sql { code, .. }) if code == "42883" => {
            return Err(version_problem(
                "an older polar_meter, without oldest_supported_sidecar()".into(),
            ));
        }
        other => other.map_err(|e| db_problem(&e))?,
    };
    let (installed, oldest) = (v.installed, v.oldest_sidecar);
    let inst = installed.as_deref().and_then(version);
    let ok = inst.is_some_and(|v| Some(v) >= version(crate::MIN_EXTENSION))
        && version(&oldest) <= version(crate::VERSION);
    if !ok {
        return Err(version_problem(format!(
            "polar_meter {} (which serves polar-meterd {oldest} and later)",
            installed.as_deref().unwrap_or("none")
        )));
    }
    let delivery = match &app.health {
        None => json!({"enabled": false, "paused": false}),
        Some(h) => match h.paused() {
            Some((cause, since)) => {
                json!({"enabled": true, "paused": true, "cause": cause, "paused_for_seconds": since.elapsed().as_secs()})
            }
            None => json!({"enabled": true, "paused": false}),
        },
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": "ready", "version": crate::VERSION, "extension_version": installed,
                "polar_version": crate::polar::POLAR_VERSION, "delivery": delivery}),
    ))
}

fn version_problem(have: String) -> Problem {
    let mut p = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "extension-version-mismatch",
        "Extension version mismatch",
        format!(
            "polar-meterd {} needs polar_meter {} or later that still serves it; the database has {have}",
            crate::VERSION,
            crate::MIN_EXTENSION
        ),
    );
    p.retry_after = Some(30);
    p
}

pub(super) fn metrics(app: &App) -> Resp {
    let usage = |name, pool: &deadpool_postgres::Pool| {
        let s = pool.status();
        PoolUsage {
            name,
            max: s.max_size,
            size: s.size,
            available: s.available,
            waiting: s.waiting,
        }
    };
    let batches = app.limits.batch_concurrency - app.batch_slots.available_permits();
    let text = app.metrics.render(&Now {
        pools: &[
            usage("requests", &app.pools.requests),
            usage("background", &app.pools.background),
        ],
        batches_in_progress: batches,
        pending_events: app.recorder.pending_events(),
        body_bytes: app.bodies.in_use(),
    });
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(version("0.10.0") > version("0.9.9"));
        assert_eq!(version("0.3.0-rc1"), Some((0, 3, 0)));
        assert_eq!(version("x"), None);
    }
}
