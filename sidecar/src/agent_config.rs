//! GET /.well-known/agent-configuration: a static description of how clients
//! (shells, agents, browsers) authenticate here and which endpoints exist.
//! Discovery only: no agent registration and no AAP token format.
use serde_json::{json, Value};

pub fn document() -> Value {
    json!({
        "issuer": "polar-meter",
        "version": crate::VERSION,
        "auth_schemes": [
            {
                "type": "api_key",
                "scheme": "bearer",
                "header": "Authorization",
                "format": "ak_ followed by 48 base62 characters",
                "for": ["shell", "agent"],
                "status": "supported",
                "permissions": ["fence:meter", "keys:manage"]
            },
            {
                "type": "session_cookie",
                "for": ["browser"],
                "status": "supported",
                "note": "served by the platform's web application, not by polar-meterd"
            },
            {
                "type": "paseto",
                "scheme": "bearer",
                "for": ["agent"],
                "status": "future",
                "accepted": false
            }
        ],
        "endpoints": {
            "meter": {"method": "POST", "path": "/api/v1/meter", "permission": "fence:meter",
                      "headers": ["Authorization", "Idempotency-Key"]},
            "meter_batch": {"method": "POST", "path": "/api/v1/meter/batch", "permission": "fence:meter",
                            "headers": ["Authorization"], "max_events": polar_meter_rules::batch::MAX_EVENTS},
            "api_keys_create": {"method": "POST", "path": "/api/v1/api-keys", "permission": "keys:manage"},
            "api_keys_list": {"method": "GET", "path": "/api/v1/api-keys", "permission": "keys:manage"},
            "api_keys_revoke": {"method": "DELETE", "path": "/api/v1/api-keys/{id}", "permission": "keys:manage"},
            "health": {"method": "GET", "path": "/healthz"},
            "ready": {"method": "GET", "path": "/readyz"},
            "metrics": {"method": "GET", "path": "/metrics"}
        },
        "errors": {"format": "application/problem+json", "type_base": crate::problem::TYPE_BASE}
    })
}
