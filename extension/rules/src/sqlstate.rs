//! Every error polar_meter raises, in one table: its SQLSTATE (class `PM`),
//! what causes it, and how polar-meterd answers it over HTTP. SQL raises these
//! codes (a test scans the SQL and requires each code it raises to be declared
//! here, and each code declared here to be raised somewhere), the sidecar maps
//! them through `ALL`, and `meter.error_codes()` publishes the table to SQL,
//! docs/sql-api.md and the README's table (checked by a test).

/// One cause of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode {
    pub code: &'static str,
    /// The constant's name, lower-cased (a stable identifier for docs).
    pub name: &'static str,
    pub http_status: u16,
    /// The problem type's slug: `https://polar-meter.dev/problems/<slug>`.
    pub problem: &'static str,
    pub title: &'static str,
    pub cause: &'static str,
}

macro_rules! codes {
    ($( $konst:ident = $code:literal, $http:literal, $slug:literal, $title:literal, $cause:literal; )*) => {
        $( pub const $konst: &str = $code; )*
        /// Every declared code, in code order.
        pub const ALL: &[ErrorCode] = &[ $( ErrorCode {
            code: $code, name: stringify!($konst), http_status: $http, problem: $slug, title: $title, cause: $cause,
        }, )* ];
    };
}

codes! {
    KEY_MALFORMED = "PM001", 401, "malformed-api-key", "Malformed API key",
        "the API key is not ak_ followed by 48 base62 characters";
    KEY_UNKNOWN = "PM002", 401, "unknown-api-key", "Unknown API key",
        "no key has this hash";
    KEY_REVOKED = "PM003", 401, "revoked-api-key", "Revoked API key",
        "the key was revoked";
    KEY_EXPIRED = "PM004", 401, "expired-api-key", "Expired API key",
        "the key's expires_at has passed";
    KEY_PERMISSION = "PM005", 403, "insufficient-permission", "Insufficient permission",
        "the key does not hold the permission the call needs";
    PERMISSION_NOT_HELD = "PM006", 403, "permission-not-held", "Permission not held",
        "a keys:manage key tried to grant a permission it does not hold itself";
    KEY_ROTATED = "PM007", 409, "key-already-rotated", "API key already rotated",
        "the key was rotated before: rotate its replacement instead";
    EVENT_NAME = "PM010", 400, "invalid-event-name", "Invalid event_name",
        "event_name is missing, not a string, empty, longer than 128 characters or holds NUL";
    EVENT_TIMESTAMP = "PM011", 400, "invalid-timestamp", "Invalid event_timestamp",
        "event_timestamp is missing, not RFC 3339 with a timezone, or before 1970";
    EVENT_TIMESTAMP_FUTURE = "PM012", 400, "timestamp-in-future", "event_timestamp in the future",
        "event_timestamp is later than now plus max_future_skew";
    EVENT_METADATA = "PM013", 400, "invalid-metadata", "Invalid metadata",
        "metadata is not a flat object of at most 49 keys with string, number or boolean values";
    IDEMPOTENCY_KEY = "PM014", 400, "invalid-idempotency-key", "Missing or invalid Idempotency-Key",
        "the idempotency key is missing, longer than 255 characters or not printable ASCII";
    EVENT_SHAPE = "PM015", 400, "invalid-event", "Invalid event",
        "a batch item is not a JSON object of idempotency_key, event_name, event_timestamp and metadata";
    BATCH_ENVELOPE = "PM016", 400, "invalid-batch", "Invalid batch",
        "events is not an array of 1 to 1000 items";
    IDEMPOTENCY_CONFLICT = "PM020", 422, "idempotency-key-reused", "Idempotency-Key reused with a different payload",
        "the idempotency key was already used for an event with another payload";
    ORG_UNKNOWN = "PM030", 404, "unknown-organization", "Unknown organization",
        "no organization has this id";
    PERMISSION_UNKNOWN = "PM031", 400, "invalid-permissions", "Invalid permissions",
        "permissions is empty or names a permission that does not exist";
    KEY_NAME = "PM032", 400, "invalid-key-name", "Invalid key name",
        "the key's name is blank or longer than 128 characters";
    KEY_NOT_FOUND = "PM033", 404, "not-found", "Not found",
        "no such API key (or it belongs to another organization)";
    KEY_EXPIRY = "PM034", 400, "invalid-expiry", "Invalid expires_at",
        "expires_at is not in the future";
    PG_CRON_MISSING = "PM035", 409, "pg-cron-missing", "pg_cron is not installed",
        "a schedule was changed in a database without pg_cron";
    ORG_INVALID = "PM036", 400, "invalid-organization", "Invalid organization",
        "Polar would refuse this team customer: bad id, name or email, or neither an email nor an owner with an email";
    ROTATE_GRACE = "PM037", 400, "invalid-grace", "Invalid grace period",
        "rotate_api_key's grace is not between 0 and 30 days";
    SETTING_UNKNOWN = "PM038", 400, "unknown-setting", "Unknown setting",
        "no polar_meter setting has this name";
    SETTING_VALUE = "PM039", 400, "invalid-setting", "Invalid setting value",
        "the value does not parse as the setting's type or lies outside its bounds";
    AUDIT_APPEND_ONLY = "PM040", 409, "audit-append-only", "The audit log is append-only",
        "an UPDATE or DELETE of an audit row (other than sealing it)";
    NO_DELETE = "PM041", 409, "never-deleted", "Billing records are never deleted",
        "a DELETE of an organization, key, event or alert";
    NO_TRUNCATE = "PM042", 409, "truncate-refused", "TRUNCATE refused",
        "a TRUNCATE of a billing table";
    CLAIM_ARGUMENT = "PM050", 400, "invalid-claim", "Invalid claim",
        "a claim's size is not 1 to 1000 or its lease not a positive interval of at most 10 minutes";
    ARGUMENT_BOUND = "PM051", 400, "argument-out-of-bounds", "Argument out of bounds",
        "a pause, deferral, detail or count passed to a delivery function is outside its bounds (pauses up to 1 hour, details up to 2 KiB)";
    RUN_WINDOW = "PM060", 400, "invalid-window", "Invalid reconcile window",
        "window_length is not a positive interval of at most 31 days";
    RUN_STATE = "PM061", 409, "reconcile-run-not-running", "Reconcile run not running",
        "a page, count or finish was reported for a run this caller does not hold";
    RUN_MODE = "PM062", 400, "invalid-reconcile-mode", "Invalid reconcile mode",
        "mode is neither counts nor full";
    DRIFT_INPUT = "PM063", 400, "invalid-drift-input", "Invalid drift input",
        "compute_drift's input is not {customer: count} or {customer: {event_name: count}}";
    SCHEDULE_JOB = "PM070", 400, "unknown-job", "Unknown job",
        "set_schedule names a job polar_meter does not have";
    SCHEDULE_EXPR = "PM071", 400, "invalid-schedule", "Invalid schedule",
        "the schedule is missing";
    CITUS_MISSING = "PM072", 409, "citus-missing", "Citus is not installed",
        "citus_distribute was called in a database without the citus extension";
}

/// The declared cause of a code, if any.
pub fn lookup(code: &str) -> Option<&'static ErrorCode> {
    ALL.iter().find(|c| c.code == code)
}

/// A broken rule: the SQLSTATE to raise and a message naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub sqlstate: &'static str,
    pub message: String,
}

impl Violation {
    pub fn new(sqlstate: &'static str, message: impl Into<String>) -> Self {
        Self {
            sqlstate,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_well_formed_and_client_errors() {
        let mut seen = HashSet::new();
        for c in ALL {
            assert!(seen.insert(c.code), "{} declared twice", c.code);
            assert!(c.code.len() == 5 && c.code.starts_with("PM"), "{}", c.code);
            assert!(
                (400..500).contains(&c.http_status),
                "{} must be a 4xx",
                c.code
            );
            assert!(c
                .problem
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'-'));
        }
        let mut sorted: Vec<_> = ALL.iter().map(|c| c.code).collect();
        sorted.sort_unstable();
        assert_eq!(sorted, ALL.iter().map(|c| c.code).collect::<Vec<_>>());
        assert_eq!(lookup("PM020").unwrap().http_status, 422);
        assert!(lookup("PM999").is_none());
    }
}
