//! polar_meter: the PostgreSQL side of polar-meter. Tables are in
//! sql/schema.sql; each module below declares its SQL API in a `.sql` file
//! beside it and implements the parts that are pure Rust rules (from
//! `polar_meter_rules`) as `meter._*` helpers.
::pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../../sql/schema.sql", name = "schema", bootstrap);

mod audit;
mod drift;
mod events;
mod keys;
mod outbox;
mod provision;
mod schedules;

pgrx::extension_sql_file!("../../sql/grants.sql", name = "grants", finalize);

/// A broken rule as SQL sees it: `{sqlstate, message}`, raised by the caller
/// (`meter._raise`), because pgrx can only raise PostgreSQL's own SQLSTATEs.
pub(crate) fn violation(v: polar_meter_rules::Violation) -> Vec<String> {
    vec![v.sqlstate.to_string(), v.message]
}
