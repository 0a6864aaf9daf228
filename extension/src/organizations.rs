//! Polar's rule for a team customer, applied before an organization is
//! stored (polar_meter_rules::validate::organization). Storage: organizations.sql.
use pgrx::prelude::*;
use polar_meter_rules::validate;

#[pg_extern(immutable, parallel_safe)]
fn _organization_violation(
    id: Option<&str>,
    name: Option<&str>,
    email: Option<&str>,
    owner_email: Option<&str>,
    owner_name: Option<&str>,
    owner_external_id: Option<&str>,
) -> Option<Vec<String>> {
    crate::errors::check(validate::organization(&validate::Organization {
        id,
        name,
        email,
        owner_email,
        owner_name,
        owner_external_id,
    }))
}
