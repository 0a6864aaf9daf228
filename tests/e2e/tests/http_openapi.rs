//! docs/openapi.json describes what polar-meterd really answers: every real
//! response below has a status the document declares for its operation, the
//! declared media type, and a body valid against the declared schema.
use pm_e2e::Fetch;
use pm_e2e::{http, idem, now_rfc3339, repo_root, Sidecar, TestDb};
use serde_json::{json, Value};

fn resolve<'a>(doc: &'a Value, s: &'a Value) -> &'a Value {
    match s["$ref"].as_str() {
        Some(r) => doc
            .pointer(&r[1..])
            .unwrap_or_else(|| panic!("dangling $ref {r}")),
        None => s,
    }
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        other => panic!("unsupported type {other}"),
    }
}

/// The subset of JSON Schema the document uses.
fn validate(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let s = resolve(doc, schema);
    match &s["type"] {
        Value::String(t) if !type_ok(t, v) => return Err(format!("{at}: expected {t}, got {v}")),
        Value::Array(ts) if !ts.iter().any(|t| type_ok(t.as_str().unwrap(), v)) => {
            return Err(format!("{at}: expected {ts:?}, got {v}"))
        }
        _ => {}
    }
    if let Some(e) = s["enum"].as_array() {
        if !e.contains(v) {
            return Err(format!("{at}: {v} not in {e:?}"));
        }
    }
    if let Some(options) = s["oneOf"].as_array() {
        let n = options
            .iter()
            .filter(|o| validate(doc, o, v, at).is_ok())
            .count();
        if n != 1 {
            return Err(format!("{at}: {v} matches {n} of oneOf"));
        }
    }
    if let (Some(str), Some(min)) = (v.as_str(), s["minLength"].as_u64()) {
        if (str.chars().count() as u64) < min {
            return Err(format!("{at}: shorter than {min}"));
        }
    }
    if let Value::Object(m) = v {
        for r in s["required"].as_array().into_iter().flatten() {
            if !m.contains_key(r.as_str().unwrap()) {
                return Err(format!("{at}: missing {r}"));
            }
        }
        let props = s["properties"].as_object();
        for (k, val) in m {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate(doc, ps, val, &format!("{at}.{k}"))?,
                None if s["additionalProperties"] == json!(false) => {
                    return Err(format!("{at}: unexpected {k}"))
                }
                None if s["additionalProperties"].is_object() => {
                    validate(doc, &s["additionalProperties"], val, &format!("{at}.{k}"))?
                }
                None => {}
            }
        }
    }
    if let (Value::Array(items), Some(item)) = (v, s.get("items")) {
        for (i, x) in items.iter().enumerate() {
            validate(doc, item, x, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// Checks one real response against the operation `method template`.
async fn conforms(doc: &Value, method: &str, template: &str, resp: reqwest::Response) -> u16 {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
        .unwrap_or_default();
    let body = resp.bytes().await.unwrap();
    let op = &doc["paths"][template][method];
    assert!(op.is_object(), "{method} {template} is not documented");
    let declared = &op["responses"][status.to_string()];
    assert!(
        declared.is_object(),
        "{method} {template} answered {status}, which the document does not declare"
    );
    let media = &declared["content"][&ct];
    assert!(
        media.is_object(),
        "{method} {template} {status}: content-type {ct} not declared"
    );
    let v: Value = if ct.ends_with("json") {
        serde_json::from_slice(&body).unwrap()
    } else {
        Value::String(String::from_utf8_lossy(&body).into())
    };
    if let Err(e) = validate(doc, &media["schema"], &v, "body") {
        panic!("{method} {template} {status}: {e}\n{v}");
    }
    status
}

/// (path template, URL, key, Idempotency-Key, content type, body, the status expected)
type Case<'a> = (
    &'a str,
    &'a str,
    Option<&'a str>,
    Option<String>,
    Option<&'a str>,
    String,
    u16,
);

#[tokio::test]
async fn real_responses_match_the_openapi_document() {
    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("docs/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let (db, pg, key) = TestDb::acme().await;
    let (_, admin) = db.key(&pg, "acme", &["keys:manage"]).await;
    let side = Sidecar::start(&db, &[]).await;
    let c = http();
    let event = json!({"event_name": "api.request", "event_timestamp": now_rfc3339(), "metadata": {"n": 1, "s": "x", "b": true}});
    let mut seen = std::collections::BTreeSet::new();
    let k = idem();
    // A POST with an optional key, Idempotency-Key, content type and body.
    let post =
        |url: &str, key: Option<&str>, idem: Option<&str>, ct: Option<&str>, body: String| {
            let mut r = c.post(url).body(body);
            for (h, v) in [
                ("authorization", key.map(|k| format!("Bearer {k}"))),
                ("idempotency-key", idem.map(String::from)),
                ("content-type", ct.map(String::from)),
            ] {
                if let Some(v) = v {
                    r = r.header(h, v);
                }
            }
            r.send()
        };
    let json_ct = Some("application/json");
    let other = json!({"event_name": "other", "event_timestamp": now_rfc3339()}).to_string();
    let huge = json!({"event_name": "x".repeat(70_000), "event_timestamp": "t"}).to_string();
    let item = |k: &str, name: &str| json!({"idempotency_key": k, "event_name": name, "event_timestamp": now_rfc3339()});
    let mixed =
        json!({"events": [item(&idem(), "api.request"), item(&idem(), ""), item(&k, "other")]})
            .to_string();
    let one = json!({"events": [item(&idem(), "e")]}).to_string();
    let huge_batch = json!({"events": [item(&idem(), &"x".repeat(1_100_000))]}).to_string();
    let (m, b) = ("/api/v1/meter", "/api/v1/meter/batch");
    let (meter, batch) = (side.url(m), side.url(b));
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        (m, &meter, Some(&key), Some(k.clone()), json_ct, event.to_string(), 202),
        (m, &meter, Some(&key), Some(k.clone()), json_ct, event.to_string(), 202),
        (m, &meter, Some(&key), Some(k.clone()), json_ct, other, 422),
        (m, &meter, Some(&key), Some(idem()), json_ct, "{".into(), 400),
        (m, &meter, None, Some(idem()), json_ct, event.to_string(), 401),
        (m, &meter, Some(&admin), Some(idem()), json_ct, event.to_string(), 403),
        (m, &meter, Some(&key), Some(idem()), json_ct, huge, 413),
        (m, &meter, Some(&key), Some(idem()), None, "x".into(), 415),
        (b, &batch, Some(&key), None, json_ct, mixed, 202),
        (b, &batch, Some(&key), None, json_ct, r#"{"events": []}"#.into(), 400),
        (b, &batch, None, None, json_ct, one.clone(), 401),
        (b, &batch, Some(&admin), None, json_ct, one, 403),
        (b, &batch, Some(&key), None, json_ct, huge_batch, 413),
        (b, &batch, Some(&key), None, None, "x".into(), 415),
    ];
    for (template, url, key, idem, ct, body, want) in cases {
        let resp = post(url, key, idem.as_deref(), ct, body).await.unwrap();
        assert_eq!(
            conforms(&doc, "post", template, resp).await,
            want,
            "{template} {want}"
        );
        seen.insert(("post", template, want));
    }
    // Every problem type the extension's error table can produce is declared.
    let declared = doc["components"]["schemas"]["Problem"]["properties"]["type"]["enum"]
        .as_array()
        .unwrap();
    for row in pg
        .query("SELECT problem_type FROM meter.error_codes()", &[])
        .await
        .unwrap()
    {
        let t = format!(
            "https://polar-meter.dev/problems/{}",
            row.get::<_, String>(0)
        );
        assert!(
            declared.contains(&json!(t)),
            "{t} is not in the Problem schema's enum"
        );
    }
    let keys = side.url("/api/v1/api-keys");
    let created = c
        .post(&keys)
        .bearer_auth(&admin)
        .json(&json!({"name": "ci", "permissions": ["keys:manage"]}))
        .send()
        .await
        .unwrap();
    let created_body: Value = {
        let bytes = created.bytes().await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    };
    let schema = &doc["paths"]["/api/v1/api-keys"]["post"]["responses"]["201"]["content"]
        ["application/json"]["schema"];
    validate(&doc, schema, &created_body, "body").unwrap();
    let id = created_body["id"].as_str().unwrap();
    let checks: Vec<(&str, &str, reqwest::Response, u16)> = vec![
        (
            "post",
            "/api/v1/api-keys",
            c.post(&keys)
                .bearer_auth(&admin)
                .json(&json!({"name": " ", "permissions": ["keys:manage"]}))
                .send()
                .await
                .unwrap(),
            400,
        ),
        (
            "get",
            "/api/v1/api-keys",
            c.get(&keys).bearer_auth(&admin).send().await.unwrap(),
            200,
        ),
        (
            "get",
            "/api/v1/api-keys",
            c.get(&keys).send().await.unwrap(),
            401,
        ),
        (
            "delete",
            "/api/v1/api-keys/{id}",
            c.delete(side.url(&format!("/api/v1/api-keys/{id}")))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap(),
            200,
        ),
        (
            "delete",
            "/api/v1/api-keys/{id}",
            c.delete(side.url(&format!("/api/v1/api-keys/{}", uuid::Uuid::new_v4())))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap(),
            404,
        ),
        (
            "get",
            "/.well-known/agent-configuration",
            c.get(side.url("/.well-known/agent-configuration"))
                .send()
                .await
                .unwrap(),
            200,
        ),
        (
            "get",
            "/healthz",
            c.get(side.url("/healthz")).send().await.unwrap(),
            200,
        ),
        (
            "get",
            "/readyz",
            c.get(side.url("/readyz")).send().await.unwrap(),
            200,
        ),
        (
            "get",
            "/openapi.json",
            c.get(side.url("/openapi.json")).send().await.unwrap(),
            200,
        ),
    ];
    for (method, template, resp, want) in checks {
        assert_eq!(
            conforms(&doc, method, template, resp).await,
            want,
            "{method} {template}"
        );
        seen.insert((method, template, want));
    }
    // The served document is the one in docs/.
    let served: Value = c.get(side.url("/openapi.json")).fetch_json().await;
    assert_eq!(served, doc);
    // Every documented operation was exercised.
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            assert!(
                seen.iter().any(|(m, p, _)| m == method && p == path),
                "{method} {path} not exercised"
            );
        }
    }
}

#[test]
fn the_validator_rejects_what_it_should() {
    let doc = json!({"components": {"schemas": {"A": {"type": "object", "required": ["x"], "additionalProperties": false,
        "properties": {"x": {"type": "string", "enum": ["a"]}}}}}});
    let a = json!({"$ref": "#/components/schemas/A"});
    assert!(validate(&doc, &a, &json!({"x": "a"}), "b").is_ok());
    assert!(validate(&doc, &a, &json!({}), "b").is_err());
    assert!(validate(&doc, &a, &json!({"x": "b"}), "b").is_err());
    assert!(validate(&doc, &a, &json!({"x": "a", "y": 1}), "b").is_err());
    assert!(validate(&doc, &a, &json!([]), "b").is_err());
}
