//! API key management over HTTP: a keys:manage key manages its own org's keys
//! and nothing else.
use pm_e2e::{http, idem, now_rfc3339, Sidecar, TestDb};
use serde_json::{json, Value};

#[tokio::test]
async fn create_list_revoke_within_one_org() {
    let db = TestDb::new().await;
    let pg = db.admin().await;
    db.org(&pg, "acme").await;
    let (_, admin) = db.key(&pg, "acme", &["keys:manage"]).await;
    let side = Sidecar::start(&db, &[]).await;
    let c = http();

    let r = c
        .post(side.url("/api/v1/api-keys"))
        .bearer_auth(&admin)
        .json(&json!({"name": "fence prod", "expires_at": "2999-01-01T00:00:00Z"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let created: Value = r.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("ak_") && key.len() == 51);
    assert_eq!(created["permissions"], json!(["fence:meter"]));
    assert_eq!(created["start"], &key[..7]);
    assert_eq!(created["expires_at"], "2999-01-01T00:00:00Z");

    // The new key records events.
    let r = c
        .post(side.url("/api/v1/meter"))
        .bearer_auth(&key)
        .header("Idempotency-Key", idem())
        .json(&json!({"event_name": "e", "event_timestamp": now_rfc3339()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    let list: Value = c
        .get(side.url("/api/v1/api-keys"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = list["data"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let text = list.to_string();
    assert!(
        !text.contains(&key[3..]) && !text.contains("hash"),
        "list never shows keys or hashes"
    );
    assert!(items
        .iter()
        .any(|i| i["id"] == created["id"] && i["last_used_at"].is_string()));

    let id = created["id"].as_str().unwrap();
    let r = c
        .delete(side.url(&format!("/api/v1/api-keys/{id}")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let revoked: Value = r.json().await.unwrap();
    assert!(revoked["revoked_at"].is_string());

    // Bad input: unknown permission, blank name, naive expiry, junk id.
    for (body, slug) in [
        (
            json!({"name": "x", "permissions": ["root"]}),
            "invalid-permissions",
        ),
        (json!({"name": " "}), "invalid-key-name"),
        (
            json!({"name": "x", "expires_at": "2999-01-01T00:00:00"}),
            "invalid-argument",
        ),
        (
            json!({"name": "x", "expires_at": "2000-01-01T00:00:00Z"}),
            "invalid-argument",
        ),
        (json!({"nam": "x"}), "malformed-body"),
    ] {
        let r = c
            .post(side.url("/api/v1/api-keys"))
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["type"],
            format!("https://polar-meter.dev/problems/{slug}"),
            "{body}: {v}"
        );
    }
    let r = c
        .delete(side.url("/api/v1/api-keys/not-a-uuid"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_key_of_org_a_cannot_manage_org_b() {
    let db = TestDb::new().await;
    let pg = db.admin().await;
    db.org(&pg, "acme").await;
    db.org(&pg, "globex").await;
    let (_, acme_admin) = db.key(&pg, "acme", &["keys:manage"]).await;
    let (b_id, b_key) = db.key(&pg, "globex", &["fence:meter"]).await;
    let (_, fence_only) = db.key(&pg, "acme", &["fence:meter"]).await;
    let side = Sidecar::start(&db, &[]).await;
    let c = http();

    let r = c
        .delete(side.url(&format!("/api/v1/api-keys/{b_id}")))
        .bearer_auth(&acme_admin)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "another org's key looks like no key at all"
    );
    let revoked: Option<chrono::DateTime<chrono::Utc>> = pg
        .query_one(
            "SELECT revoked_at FROM meter.api_key WHERE id = $1",
            &[&b_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(revoked.is_none());
    let list: Value = c
        .get(side.url("/api/v1/api-keys"))
        .bearer_auth(&acme_admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["id"] != b_id.to_string()));
    // Globex's key still works; a fence-only key cannot manage keys.
    let r = c
        .post(side.url("/api/v1/meter"))
        .bearer_auth(&b_key)
        .header("Idempotency-Key", idem())
        .json(&json!({"event_name": "e", "event_timestamp": now_rfc3339()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c
        .get(side.url("/api/v1/api-keys"))
        .bearer_auth(&fence_only)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .post(side.url("/api/v1/api-keys"))
        .bearer_auth(&fence_only)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}
