//! API keys through SQL: format, hashing, verify's distinct SQLSTATEs, revoke.
use pm_e2e::{db_error, sqlstate, TestDb};

#[tokio::test]
async fn ten_thousand_generated_keys_are_wellformed_and_unique() {
    let (_db, c) = TestDb::with_admin().await;
    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT k), bool_and(k ~ '^ak_[0-9A-Za-z]{48}$')
             FROM (SELECT meter._generate_api_key() k FROM generate_series(1, 10000)) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 10_000);
    assert_eq!(row.get::<_, i64>(1), 10_000);
    assert!(row.get::<_, bool>(2));
}

#[tokio::test]
async fn create_returns_the_key_once_and_stores_only_its_hash() {
    let (db, c) = TestDb::with_admin().await;
    db.org(&c, "acme").await;
    let row = c
        .query_one(
            "SELECT id, key, start FROM meter.create_api_key('acme', 'ci')",
            &[],
        )
        .await
        .unwrap();
    let (id, key, start): (uuid::Uuid, String, String) = (row.get(0), row.get(1), row.get(2));
    assert!(key.starts_with("ak_") && key.len() == 51);
    assert_eq!(start, &key[..7]);
    let stored = c
        .query_one("SELECT key_hash = sha256(convert_to($2, 'UTF8')), permissions FROM meter.api_key WHERE id = $1", &[&id, &key])
        .await
        .unwrap();
    assert!(stored.get::<_, bool>(0));
    assert_eq!(stored.get::<_, Vec<String>>(1), vec!["fence:meter"]);
    // The plaintext appears nowhere in the database.
    let leaks: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM meter.api_key k WHERE k::text LIKE '%' || $1 || '%')
                  + (SELECT count(*) FROM meter.audit_log a WHERE a::text LIKE '%' || $1 || '%')",
            &[&&key[3..]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaks, 0);
    // list_api_keys has no hash column.
    let cols: Vec<String> = c
        .query("SELECT * FROM meter.list_api_keys('acme')", &[])
        .await
        .unwrap()[0]
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    assert!(
        !cols.iter().any(|c| c.contains("hash") || c == "key"),
        "{cols:?}"
    );
    assert!(cols.contains(&"start".to_string()));
    // Creation is audited.
    let n: i64 = c
        .query_one("SELECT count(*) FROM meter.audit_log WHERE action = 'api_key.created' AND subject = $1", &[&id.to_string()])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn create_rejects_bad_arguments_with_distinct_codes() {
    let (db, c) = TestDb::with_admin().await;
    db.org(&c, "acme").await;
    assert_eq!(
        sqlstate(
            c.query("SELECT * FROM meter.create_api_key('nope', 'x')", &[])
                .await
        ),
        "PM030"
    );
    assert_eq!(
        sqlstate(
            c.query("SELECT * FROM meter.create_api_key('acme', '  ')", &[])
                .await
        ),
        "PM032"
    );
    let (code, msg) = db_error(
        c.query(
            "SELECT * FROM meter.create_api_key('acme', 'x', '{fence:meter,root}')",
            &[],
        )
        .await,
    );
    assert_eq!(code, "PM031");
    assert!(msg.contains("root"), "{msg}");
    assert_eq!(
        sqlstate(
            c.query("SELECT * FROM meter.create_api_key('acme', 'x', '{}')", &[])
                .await
        ),
        "PM031"
    );
    assert_eq!(
        sqlstate(c.query("SELECT * FROM meter.create_api_key('acme', 'x', expires_at => now() - interval '1s')", &[]).await),
        "PM034"
    );
}

#[tokio::test]
async fn verify_has_a_distinct_sqlstate_per_failure() {
    let (db, c) = TestDb::with_admin().await;
    db.org(&c, "acme").await;
    let (id, key) = db.key(&c, "acme", &["fence:meter"]).await;
    let verify = |k: String, p: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT organization_id, api_key_id FROM meter.verify_api_key($1, $2)",
                &[&k, &p],
            )
            .await
        }
    };
    let ok = verify(key.clone(), "fence:meter").await.unwrap();
    assert_eq!(ok.get::<_, String>(0), "acme");
    assert_eq!(ok.get::<_, uuid::Uuid>(1), id);

    for malformed in [
        "",
        "ak_short",
        "sk_live_xxx",
        &format!("{key}x"),
        &key.replace("ak_", "ak-"),
    ] {
        assert_eq!(
            sqlstate(verify(malformed.to_string(), "fence:meter").await),
            "PM001",
            "{malformed}"
        );
    }
    let unknown = format!("ak_{}", "Z".repeat(48));
    let (code, msg) = db_error(verify(unknown.clone(), "fence:meter").await);
    assert_eq!(code, "PM002");
    assert!(
        !msg.contains(&unknown[3..]),
        "error must not echo the key: {msg}"
    );
    assert_eq!(sqlstate(verify(key.clone(), "keys:manage").await), "PM005");

    // Expired: as a DBA, move the expiry into the past.
    c.execute(
        "UPDATE meter.api_key SET expires_at = now() - interval '1 second' WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    assert_eq!(sqlstate(verify(key.clone(), "fence:meter").await), "PM004");
    c.execute(
        "UPDATE meter.api_key SET expires_at = NULL WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    verify(key.clone(), "fence:meter").await.unwrap();

    // Revoked: effective on the very next call.
    c.query_one("SELECT meter.revoke_api_key($1)", &[&id])
        .await
        .unwrap();
    assert_eq!(sqlstate(verify(key.clone(), "fence:meter").await), "PM003");
    // Revoking again is idempotent; an unknown id is PM033.
    c.query_one("SELECT meter.revoke_api_key($1)", &[&id])
        .await
        .unwrap();
    assert_eq!(
        sqlstate(
            c.query_one("SELECT meter.revoke_api_key(gen_random_uuid())", &[])
                .await
        ),
        "PM033"
    );
    let audited: i64 = c
        .query_one("SELECT count(*) FROM meter.audit_log WHERE action = 'api_key.revoked' AND subject = $1", &[&id.to_string()])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 2);
}

#[tokio::test]
async fn revoke_applies_to_the_next_record_event_from_another_session() {
    let (db, dba) = TestDb::with_admin().await;
    let app = db.admin().await;
    db.org(&dba, "acme").await;
    let (id, key) = db.key(&dba, "acme", &["fence:meter"]).await;
    let rec = |k: &str, idem: &str| {
        let (k, idem, app) = (k.to_string(), idem.to_string(), &app);
        async move {
            app.query_one(
                "SELECT status FROM meter.record_event($1, $2, 'api.request', now(), '{}')",
                &[&k, &idem],
            )
            .await
        }
    };
    rec(&key, "a").await.unwrap();
    dba.query_one("SELECT meter.revoke_api_key($1)", &[&id])
        .await
        .unwrap();
    assert_eq!(sqlstate(rec(&key, "b").await), "PM003");
}

#[tokio::test]
async fn last_used_at_is_written_at_most_once_a_minute() {
    let (db, c) = TestDb::with_admin().await;
    db.org(&c, "acme").await;
    let (id, key) = db.key(&c, "acme", &["fence:meter"]).await;
    let last = || async {
        c.query_one(
            "SELECT last_used_at FROM meter.list_api_keys('acme') WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get::<_, Option<chrono::DateTime<chrono::Utc>>>(0)
    };
    assert!(last().await.is_none());
    c.query("SELECT * FROM meter.verify_api_key($1)", &[&key])
        .await
        .unwrap();
    let first = last().await.expect("set on first use");
    for _ in 0..5 {
        c.query("SELECT * FROM meter.verify_api_key($1)", &[&key])
            .await
            .unwrap();
    }
    assert_eq!(last().await, Some(first), "not rewritten within the minute");
    c.execute(
        "UPDATE meter.api_key_usage SET last_used_at = now() - interval '61 seconds' WHERE api_key_id = $1",
        &[&id],
    )
    .await
    .unwrap();
    let stale = last().await;
    c.query("SELECT * FROM meter.verify_api_key($1)", &[&key])
        .await
        .unwrap();
    assert!(last().await > stale, "rewritten once a minute has passed");
}

#[tokio::test]
async fn rotation_hands_over_to_a_new_key_within_the_grace() {
    let (db, c) = TestDb::with_admin().await;
    db.org(&c, "acme").await;
    let (old_id, old_key) = db.key(&c, "acme", &["fence:meter", "keys:manage"]).await;
    let verify = |k: String| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT api_key_id FROM meter.verify_api_key($1, 'keys:manage')",
                &[&k],
            )
            .await
            .map(|r| r.get::<_, uuid::Uuid>(0))
        }
    };

    let r = c
        .query_one(
            "SELECT new_id, key, start, old_key_expires_at - now() <= interval '1 hour' FROM meter.rotate_api_key($1, interval '1 hour')",
            &[&old_id],
        )
        .await
        .unwrap();
    let (new_id, new_key): (uuid::Uuid, String) = (r.get(0), r.get(1));
    assert!(r.get::<_, bool>(3));
    assert_ne!(new_id, old_id);
    assert_eq!(r.get::<_, String>(2), new_key[..7]);
    // Both work during the grace; the new one has the old one's name and permissions.
    assert_eq!(verify(new_key.clone()).await.unwrap(), new_id);
    assert_eq!(verify(old_key.clone()).await.unwrap(), old_id);
    let same: bool = c
        .query_one(
            "SELECT o.name = n.name AND o.permissions = n.permissions AND o.organization_id = n.organization_id
             FROM meter.api_key o, meter.api_key n WHERE o.id = $1 AND n.id = $2",
            &[&old_id, &new_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(same);
    let audit = c
        .query_one(
            "SELECT detail->>'new_id' FROM meter.audit_log WHERE action = 'api_key.rotated' AND subject = $1",
            &[&old_id.to_string()],
        )
        .await
        .unwrap();
    assert_eq!(audit.get::<_, String>(0), new_id.to_string());

    // A grace never lengthens a key's life; zero ends it at once.
    let (short_id, short_key) = db.key(&c, "acme", &["keys:manage"]).await;
    c.execute(
        "UPDATE meter.api_key SET expires_at = now() + interval '5 minutes' WHERE id = $1",
        &[&short_id],
    )
    .await
    .unwrap();
    let kept: bool = c
        .query_one(
            "SELECT old_key_expires_at = (SELECT expires_at FROM meter.api_key WHERE id = $1) AND old_key_expires_at < now() + interval '6 minutes'
             FROM meter.rotate_api_key($1, interval '1 day')",
            &[&short_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(kept);
    let (zero_id, zero_key) = db.key(&c, "acme", &["keys:manage"]).await;
    c.query_one(
        "SELECT new_id FROM meter.rotate_api_key($1, interval '0')",
        &[&zero_id],
    )
    .await
    .unwrap();
    assert_eq!(sqlstate(verify(zero_key).await), "PM004");
    assert_eq!(verify(short_key).await.unwrap(), short_id);
    // A key is rotated once: a second rotation would give a replacement that
    // dies when the first grace period ends.
    assert_eq!(
        sqlstate(
            c.query("SELECT * FROM meter.rotate_api_key($1)", &[&old_id])
                .await
        ),
        "PM007"
    );
    assert_eq!(verify(old_key).await.unwrap(), old_id, "still in its grace");

    // Refusals, each with its own code.
    c.query_one("SELECT meter.revoke_api_key($1)", &[&new_id])
        .await
        .unwrap();
    for (sql, code) in [
        (
            format!("SELECT * FROM meter.rotate_api_key('{new_id}')"),
            "PM003",
        ),
        (
            format!("SELECT * FROM meter.rotate_api_key('{zero_id}')"),
            "PM004",
        ),
        (
            "SELECT * FROM meter.rotate_api_key(gen_random_uuid())".to_string(),
            "PM033",
        ),
        (
            format!("SELECT * FROM meter.rotate_api_key('{short_id}', interval '31 days')"),
            "PM037",
        ),
        (
            format!("SELECT * FROM meter.rotate_api_key('{short_id}', interval '-1 second')"),
            "PM037",
        ),
        (
            format!("SELECT * FROM meter.rotate_api_key('{short_id}', NULL)"),
            "PM037",
        ),
    ] {
        assert_eq!(sqlstate(c.query(&sql, &[]).await), code, "{sql}");
    }
}

/// A key minted over HTTP (create_own_api_key) records its minter; revoking
/// a key revokes what it minted, transitively; a rotation's replacement takes
/// its predecessor's place; the audit rows name the minting key.
#[tokio::test]
async fn minted_keys_die_with_their_minter_and_follow_its_replacement() {
    let (db, c) = TestDb::with_admin().await;
    db.org(&c, "acme").await;
    let (root_id, root_key) = db.key(&c, "acme", &["fence:meter", "keys:manage"]).await;
    let mint = |by: String, perms: &'static str| {
        let c = &c;
        async move {
            let r = c
                .query_one(
                    "SELECT id, key FROM meter.create_own_api_key($1, 'child', $2::text::text[])",
                    &[&by, &perms],
                )
                .await
                .unwrap();
            (r.get::<_, uuid::Uuid>(0), r.get::<_, String>(1))
        }
    };
    let (child_id, child_key) = mint(root_key.clone(), "{fence:meter,keys:manage}").await;
    let (grandchild_id, grandchild_key) = mint(child_key.clone(), "{fence:meter}").await;
    let (sibling_id, _) = mint(root_key.clone(), "{fence:meter}").await;
    let minted: Vec<(uuid::Uuid, Option<uuid::Uuid>)> = c
        .query(
            "SELECT id, minted_by FROM meter.api_key WHERE id = ANY($1) ORDER BY created_at, id",
            &[&vec![root_id, child_id, grandchild_id, sibling_id]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let by = |id: uuid::Uuid| minted.iter().find(|(k, _)| *k == id).unwrap().1;
    assert_eq!(by(root_id), None, "a key made in SQL is a root");
    assert_eq!(by(child_id), Some(root_id));
    assert_eq!(by(grandchild_id), Some(child_id));
    let audit: String = c
        .query_one(
            "SELECT detail->>'minted_by' FROM meter.audit_log WHERE action = 'api_key.created' AND subject = $1",
            &[&grandchild_id.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        audit,
        child_id.to_string(),
        "the audit row names the minter"
    );

    // Rotating the child: its replacement takes its place, and the
    // grandchild now hangs from the replacement.
    let replacement: uuid::Uuid = c
        .query_one(
            "SELECT new_id FROM meter.rotate_api_key($1, interval '0')",
            &[&child_id],
        )
        .await
        .unwrap()
        .get(0);
    let (new_minter, grand_minter): (Option<uuid::Uuid>, Option<uuid::Uuid>) = {
        let r = c
            .query_one(
                "SELECT (SELECT minted_by FROM meter.api_key WHERE id = $1), (SELECT minted_by FROM meter.api_key WHERE id = $2)",
                &[&replacement, &grandchild_id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(new_minter, Some(root_id));
    assert_eq!(grand_minter, Some(replacement));

    // Revoking the root revokes every key below it, each audited.
    c.query_one("SELECT meter.revoke_api_key($1)", &[&root_id])
        .await
        .unwrap();
    let alive: i64 = c
        .query_one(
            "SELECT count(*) FROM meter.api_key WHERE organization_id = 'acme' AND revoked_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        alive, 0,
        "root, child, its replacement, grandchild and sibling"
    );
    let audited: i64 = c
        .query_one(
            "SELECT count(*) FROM meter.audit_log WHERE action = 'api_key.revoked' AND detail->>'with' = $1",
            &[&root_id.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 4, "child, replacement, grandchild, sibling");
    let refused = c
        .query_one(
            "SELECT api_key_id FROM meter.verify_api_key($1, 'fence:meter')",
            &[&grandchild_key],
        )
        .await;
    assert_eq!(sqlstate(refused), "PM003");
}
