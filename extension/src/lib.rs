//! polar_meter: the PostgreSQL side of polar-meter. Rust computes (the pure
//! rules of `polar_meter_rules`, exposed as `meter._*` helpers in the modules
//! below); SQL touches rows, takes locks and notifies (one `.sql` file per
//! area, beside its Rust). docs/architecture.md follows one event through it.
::pgrx::pg_module_magic!();

mod audit;
mod compat;
mod drift;
mod errors;
mod events;
mod keys;
mod organizations;
mod outbox;
mod settings;

// The install script, in order. Tables and types come first (bootstrap) and
// grants last (finalize); in between, each file requires the one before it,
// so this list is the order, and the first file requires every Rust helper
// because SQL-language functions and COMMENTs need them to exist.
pgrx::extension_sql_file!("../../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!(
    "errors.sql",
    name = "errors",
    requires = [
        errors::error_codes,
        settings::_setting_default,
        settings::_setting_catalog,
        keys::_generate_api_key,
        keys::_api_key_wellformed,
        keys::_key_hash,
        keys::_api_key_start,
        organizations::_organization_violation,
        events::_prepare_batch,
        events::_reserved_metadata_key,
        outbox::_backoff_seconds,
        outbox::_max_attempts,
        outbox::_bound,
        drift::_drift_violation,
        drift::_drift,
        audit::_audit_chain_hashes,
    ]
);
pgrx::extension_sql_file!("settings.sql", name = "settings", requires = ["errors"]);
pgrx::extension_sql_file!("audit.sql", name = "audit", requires = ["settings"]);
pgrx::extension_sql_file!("alerts.sql", name = "alerts", requires = ["audit"]);
pgrx::extension_sql_file!(
    "organizations.sql",
    name = "organizations",
    requires = ["alerts"]
);
pgrx::extension_sql_file!("keys.sql", name = "keys", requires = ["organizations"]);
pgrx::extension_sql_file!("events.sql", name = "events", requires = ["keys"]);
pgrx::extension_sql_file!("outbox.sql", name = "outbox", requires = ["events"]);
pgrx::extension_sql_file!("drift.sql", name = "drift", requires = ["outbox"]);
pgrx::extension_sql_file!("reconcile.sql", name = "reconcile", requires = ["drift"]);
pgrx::extension_sql_file!("health.sql", name = "health", requires = ["reconcile"]);
pgrx::extension_sql_file!("schedules.sql", name = "schedules", requires = ["health"]);
pgrx::extension_sql_file!("citus.sql", name = "citus", requires = ["schedules"]);
pgrx::extension_sql_file!("../../sql/grants.sql", name = "grants", finalize);
