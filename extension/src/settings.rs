//! Tunables: names, defaults and bounds come from polar_meter_rules::settings;
//! values live in meter.setting_value (settings.sql).
use pgrx::prelude::*;
use polar_meter_rules::settings;

#[pg_extern(immutable, strict, parallel_safe)]
fn _setting_default(name: &str) -> Option<&'static str> {
    settings::lookup(name).map(|s| s.default)
}

#[pg_extern(immutable, parallel_safe)]
fn _setting_catalog() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(default_value, String),
        name!(kind, String),
        name!(min_value, String),
        name!(max_value, String),
        name!(description, String),
    ),
> {
    TableIterator::new(settings::ALL.iter().map(|s| {
        (
            s.name.to_string(),
            s.default.to_string(),
            s.kind.as_str().to_string(),
            s.min.to_string(),
            s.max.to_string(),
            s.about.to_string(),
        )
    }))
}
