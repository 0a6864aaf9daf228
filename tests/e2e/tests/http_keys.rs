//! API key management over HTTP: a keys:manage key manages its own org's keys
//! and nothing else.
use pm_e2e::{http, Sidecar, TestDb};
use pm_e2e::{Fetch, Value1};
use serde_json::{json, Value};

#[tokio::test]
async fn create_list_revoke_within_one_org() {
    let (db, pg) = TestDb::with_admin().await;
    db.org(&pg, "acme").await;
    let (_, admin) = db.key(&pg, "acme", &["fence:meter", "keys:manage"]).await;
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
    assert_eq!(side.record(&key).await, 202);

    let list: Value = c
        .get(side.url("/api/v1/api-keys"))
        .bearer_auth(&admin)
        .fetch_json()
        .await;
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
            "invalid-expiry",
        ),
        (
            json!({"name": "x", "expires_at": "2000-01-01T00:00:00Z"}),
            "invalid-expiry",
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
    let (db, pg) = TestDb::with_admin().await;
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
        .fetch_json()
        .await;
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["id"] != b_id.to_string()));
    // Globex's key still works; a fence-only key cannot manage keys.
    assert_eq!(side.record(&b_key).await, 202);
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

#[tokio::test]
async fn a_key_hands_on_only_what_it_holds_and_for_no_longer_than_it_lives() {
    let (db, pg) = TestDb::with_admin().await;
    db.org(&pg, "acme").await;
    let row = pg
        .query_one(
            "SELECT key FROM meter.create_api_key('acme', 'short-lived admin', '{keys:manage}', now() + interval '1 hour')",
            &[],
        )
        .await
        .unwrap();
    let manage_only: String = row.get(0);
    let side = Sidecar::start(&db, &[]).await;
    let c = http();
    let create = |perms: Value, expires: Option<&str>| {
        let mut body = json!({"name": "minted", "permissions": perms});
        if let Some(e) = expires {
            body["expires_at"] = json!(e);
        }
        c.post(side.url("/api/v1/api-keys"))
            .bearer_auth(&manage_only)
            .json(&body)
            .send()
    };
    // fence:meter is not held: refused, with its own problem type.
    let r = create(json!(["fence:meter"]), None).await.unwrap();
    assert_eq!(r.status(), 403);
    let p: Value = r.json().await.unwrap();
    assert_eq!(
        p["type"],
        "https://polar-meter.dev/problems/permission-not-held"
    );
    // What it holds, asked for forever: clamped to its own expiry.
    let r = create(json!(["keys:manage"]), Some("2999-01-01T00:00:00Z"))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let minted: Value = r.json().await.unwrap();
    let until =
        chrono::DateTime::parse_from_rfc3339(minted["expires_at"].as_str().unwrap()).unwrap();
    assert!(
        until < chrono::Utc::now() + chrono::Duration::minutes(61),
        "clamped: {until}"
    );
    let r = create(json!(["keys:manage"]), None).await.unwrap();
    let minted: Value = r.json().await.unwrap();
    assert!(
        !minted["expires_at"].is_null(),
        "no expiry asked for: the minter's own"
    );
    // An unknown permission stays a 400, not a 403.
    let r = create(json!(["root"]), None).await.unwrap();
    assert_eq!(r.status(), 400);
    let n: i64 = pg
        .value("SELECT count(*) FROM meter.api_key WHERE permissions @> '{fence:meter}'")
        .await;
    assert_eq!(n, 0, "no escalation reached the table");
}

/// The runbook's HTTP rotation, step by step as written (docs/runbook.md,
/// "Rotate an API key"): a key manager made in SQL as the README shows, a
/// new fence key over HTTP with the default permission, the old one revoked;
/// then what the README promises about minted keys: a `{keys:manage}`-only
/// manager cannot mint `{fence:meter}`, and revoking a manager ends the keys
/// it minted.
#[tokio::test]
async fn the_runbooks_http_rotation_works_as_written() {
    let (db, pg) = TestDb::with_admin().await;
    db.org(&pg, "acme").await;
    let runbook = std::fs::read_to_string(pm_e2e::repo_root().join("docs/runbook.md")).unwrap();
    let manager_sql =
        "SELECT * FROM meter.create_api_key('acme', 'key manager', '{fence:meter,keys:manage}')";
    assert!(runbook.contains(manager_sql), "the runbook's manager key");
    let manager: String = pg
        .value(&manager_sql.replace("SELECT *", "SELECT key"))
        .await;
    let (old_id, old_key) = db.key(&pg, "acme", &["fence:meter"]).await;
    let side = Sidecar::start(&db, &[]).await;
    let c = http();

    // 1. The new key, with the default permission.
    let created: Value = c
        .post(side.url("/api/v1/api-keys"))
        .bearer_auth(&manager)
        .json(&json!({"name": "fence prod"}))
        .fetch_json()
        .await;
    assert_eq!(created["permissions"], json!(["fence:meter"]), "{created}");
    let new_key = created["key"].as_str().unwrap().to_string();
    // 2. Deployed: it records.
    assert_eq!(side.record(&new_key).await, 202);
    // 3. The old key revoked by id, found in the list.
    let list: Value = c
        .get(side.url("/api/v1/api-keys"))
        .bearer_auth(&manager)
        .fetch_json()
        .await;
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["id"] == json!(old_id)));
    let r = c
        .delete(side.url(&format!("/api/v1/api-keys/{old_id}")))
        .bearer_auth(&manager)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(side.record(&old_key).await, 401);
    assert_eq!(side.record(&new_key).await, 202);

    // A manager holding only keys:manage cannot hand on fence:meter.
    let (_, narrow) = db.key(&pg, "acme", &["keys:manage"]).await;
    let r = c
        .post(side.url("/api/v1/api-keys"))
        .bearer_auth(&narrow)
        .json(&json!({"name": "fence prod"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let p: Value = r.json().await.unwrap();
    assert_eq!(
        p["type"],
        "https://polar-meter.dev/problems/permission-not-held"
    );

    // Revoking the manager revokes what it minted.
    let manager_id: uuid::Uuid = pg
        .value("SELECT id FROM meter.api_key WHERE name = 'key manager'")
        .await;
    pg.query_one("SELECT meter.revoke_api_key($1)", &[&manager_id])
        .await
        .unwrap();
    assert_eq!(side.record(&new_key).await, 401);
}
