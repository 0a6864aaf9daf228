//! The error table as SQL sees it, and the one convention for Rust helpers
//! that judge input: they return NULL when it is fine, else `{sqlstate,
//! message}`, which the SQL caller raises with `meter._raise` (pgrx can raise
//! only PostgreSQL's own SQLSTATEs, never class PM).
use pgrx::prelude::*;
use polar_meter_rules::{sqlstate, Violation};

pub(crate) fn violation(v: Violation) -> Vec<String> {
    vec![v.sqlstate.to_string(), v.message]
}

pub(crate) fn check(r: Result<(), Violation>) -> Option<Vec<String>> {
    r.err().map(violation)
}

#[pg_extern(immutable, parallel_safe)]
fn error_codes() -> TableIterator<
    'static,
    (
        name!(sqlstate, String),
        name!(name, String),
        name!(http_status, i32),
        name!(problem_type, String),
        name!(title, String),
        name!(cause, String),
    ),
> {
    TableIterator::new(sqlstate::ALL.iter().map(|c| {
        (
            c.code.to_string(),
            c.name.to_ascii_lowercase(),
            i32::from(c.http_status),
            c.problem.to_string(),
            c.title.to_string(),
            c.cause.to_string(),
        )
    }))
}
