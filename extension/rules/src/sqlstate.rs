//! Every error polar_meter raises has its own SQLSTATE in class `PM`, so a
//! client (the sidecar, a DBA's script) can branch on the code, never on text.
//! The table in docs/sql-api.md mirrors this list; the sidecar maps each code
//! to an HTTP status and an RFC 9457 problem type.

pub const KEY_MALFORMED: &str = "PM001";
pub const KEY_UNKNOWN: &str = "PM002";
pub const KEY_REVOKED: &str = "PM003";
pub const KEY_EXPIRED: &str = "PM004";
pub const KEY_PERMISSION: &str = "PM005";

pub const EVENT_NAME: &str = "PM010";
pub const EVENT_TIMESTAMP: &str = "PM011";
pub const EVENT_TIMESTAMP_FUTURE: &str = "PM012";
pub const EVENT_METADATA: &str = "PM013";
pub const IDEMPOTENCY_KEY: &str = "PM014";
pub const IDEMPOTENCY_CONFLICT: &str = "PM020";

pub const ORG_UNKNOWN: &str = "PM030";
pub const PERMISSION_UNKNOWN: &str = "PM031";
pub const KEY_NAME: &str = "PM032";
pub const KEY_NOT_FOUND: &str = "PM033";
pub const ARGUMENT: &str = "PM034";

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
