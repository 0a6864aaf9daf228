//! TLS on both sides of polar-meterd, with certificates the tests make:
//! to PostgreSQL (a cluster that accepts TLS only; libpq's sslmode), and
//! HTTPS to its clients (its own certificate, reloaded on SIGHUP), and the
//! refusal to serve API keys over plain HTTP on a network address.
use pm_e2e::certs::{scratch_dir, write, Ca, ScratchDir};
use pm_e2e::Value1;
use pm_e2e::{eventually, idem, now_rfc3339, Sidecar, TestDb, TlsCluster};
use serde_json::json;

/// A TLS-only cluster with an organization, a key and a sidecar login role,
/// and a directory holding the CA certificate as ca.pem (removed when dropped).
async fn tls_database(names: &[&str]) -> (Ca, TlsCluster, String, String, ScratchDir) {
    let ca = Ca::new("polar-meter test CA");
    let cluster = TlsCluster::start(&ca.leaf(names)).await;
    let db = cluster.socket("meter_tls").await;
    db.run("SELECT meter.upsert_organization('acme', 'Acme', 'billing@acme.example')")
        .await;
    let key: String = db
        .value("SELECT key FROM meter.create_api_key('acme', 'k')")
        .await;
    let role = format!("meterd_{}", uuid::Uuid::new_v4().simple());
    db.run(&format!(
        "CREATE ROLE {role} LOGIN IN ROLE polar_meter_sidecar"
    ))
    .await;
    let dir = scratch_dir("tls-ca");
    write(&dir, "ca.pem", &ca.cert_pem);
    (ca, cluster, role, key, dir)
}

#[tokio::test]
async fn verify_full_reaches_a_database_that_requires_tls_on_every_connection() {
    let (_ca, cluster, role, key, ca_dir) = tls_database(&["localhost"]).await;
    let ca_file = ca_dir.join("ca.pem");
    let url = format!(
        "postgres://{role}@localhost:{}/meter_tls?sslmode=verify-full&sslrootcert={}",
        cluster.port,
        ca_file.display()
    );
    let side = Sidecar::start_url(&url, &[]).await;
    assert_eq!(side.record(&key).await, 202);
    // The pools and the LISTEN session all came in over TLS.
    let db = cluster.socket("meter_tls").await;
    let (all, tls): (i64, i64) = eventually(30, "the LISTEN session connected", || async {
        let r = db
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
                 WHERE a.usename = $1",
                &[&role],
            )
            .await
            .unwrap();
        let listening: i64 = db
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND query LIKE 'LISTEN%'", &[&role])
            .await
            .unwrap()
            .get(0);
        (listening > 0).then(|| (r.get(0), r.get(1)))
    })
    .await;
    assert!(
        all >= 2,
        "a request connection and the LISTEN session: {all}"
    );
    assert_eq!(all, tls, "every connection is encrypted");
    // The keyword/value form says the same.
    let kv = format!(
        "host=localhost port={} user={role} dbname=meter_tls sslmode=verify-full sslrootcert='{}'",
        cluster.port,
        ca_file.display()
    );
    let side = Sidecar::start_url(&kv, &[]).await;
    assert_eq!(side.record(&key).await, 202);
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_host_and_verify_ca_does_not_ask() {
    let (_ca, cluster, role, key, ca_dir) = tls_database(&["db.internal"]).await;
    let ca_file = ca_dir.join("ca.pem");
    let url = |mode: &str| {
        format!(
            "postgres://{role}@127.0.0.1:{}/meter_tls?sslmode={mode}&sslrootcert={}",
            cluster.port,
            ca_file.display()
        )
    };
    let wrong_name = Sidecar::start_url(&url("verify-full"), &[]).await;
    assert_eq!(
        wrong_name.record(&key).await,
        503,
        "the certificate names db.internal, not 127.0.0.1"
    );
    assert!(
        wrong_name.logs_text().contains("database"),
        "the refusal is logged"
    );
    let ready = pm_e2e::http()
        .get(wrong_name.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let ca_only = Sidecar::start_url(&url("verify-ca"), &[]).await;
    assert_eq!(
        ca_only.record(&key).await,
        202,
        "verify-ca checks the chain, not the name"
    );
    // A CA that did not sign it: refused even by verify-ca.
    let other = scratch_dir("other-ca");
    let other_ca = write(&other, "ca.pem", &Ca::new("someone else").cert_pem);
    let foreign = format!(
        "postgres://{role}@127.0.0.1:{}/meter_tls?sslmode=verify-ca&sslrootcert={}",
        cluster.port,
        other_ca.display()
    );
    assert_eq!(
        Sidecar::start_url(&foreign, &[]).await.record(&key).await,
        503
    );
}

#[tokio::test]
async fn require_encrypts_without_verifying_and_disable_is_turned_away() {
    let (_ca, cluster, role, key, _ca_dir) = tls_database(&["localhost"]).await;
    let url = |mode: &str| {
        format!(
            "postgres://{role}@127.0.0.1:{}/meter_tls?sslmode={mode}",
            cluster.port
        )
    };
    assert_eq!(
        Sidecar::start_url(&url("require"), &[])
            .await
            .record(&key)
            .await,
        202
    );
    assert_eq!(
        Sidecar::start_url(&url("prefer"), &[])
            .await
            .record(&key)
            .await,
        202
    );
    assert_eq!(
        Sidecar::start_url(&url("disable"), &[])
            .await
            .record(&key)
            .await,
        503,
        "the server accepts TLS only"
    );
}

/// The certificate a TLS server presents, as DER.
async fn presented(port: u16, ca: &Ca) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca.cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn https_is_served_with_its_own_certificate_and_reloaded_on_sighup() {
    let (db, _pg, key) = TestDb::acme().await;
    let ca = Ca::new("polar-meter test CA");
    let first = ca.leaf(&["localhost"]);
    let dir = scratch_dir("https");
    let cert = write(&dir, "cert.pem", &first.cert_pem);
    let tls_key = write(&dir, "key.pem", &first.key_pem);
    let side = Sidecar::start(
        &db,
        &[
            ("POLAR_METER_TLS_CERT", cert.to_str().unwrap()),
            ("POLAR_METER_TLS_KEY", tls_key.to_str().unwrap()),
        ],
    )
    .await;
    let port: u16 = side.base.rsplit(':').next().unwrap().parse().unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}/api/v1/meter");
    let r = https
        .post(&url)
        .bearer_auth(&key)
        .header("Idempotency-Key", idem())
        .json(&json!({"event_name": "e", "event_timestamp": now_rfc3339()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(
        pm_e2e::http()
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_err(),
        "no plain HTTP on the HTTPS port"
    );
    assert_eq!(presented(port, &ca).await, der(&first.cert_pem));
    // A new pair, then SIGHUP: new connections get it; the process goes on.
    let second = ca.leaf(&["localhost"]);
    write(&dir, "cert.pem", &second.cert_pem);
    write(&dir, "key.pem", &second.key_pem);
    std::process::Command::new("kill")
        .args(["-HUP", &side.pid().to_string()])
        .status()
        .unwrap();
    eventually(20, "the new certificate presented", || async {
        (presented(port, &ca).await == der(&second.cert_pem)).then_some(())
    })
    .await;
    // A broken pair is refused and the serving one kept.
    write(&dir, "key.pem", "not a key");
    std::process::Command::new("kill")
        .args(["-HUP", &side.pid().to_string()])
        .status()
        .unwrap();
    eventually(20, "the refusal logged", || async {
        side.logs_text()
            .contains("TLS certificate not reloaded")
            .then_some(())
    })
    .await;
    assert_eq!(presented(port, &ca).await, der(&second.cert_pem));
    assert_eq!(
        https
            .get(format!("https://localhost:{port}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn plain_http_on_a_network_address_is_refused_without_a_tls_proxy() {
    let db = TestDb::new().await;
    let role = pm_e2e::sidecar_role(&db.name, pm_e2e::pg::port()).await;
    let url = format!(
        "postgres://{role}@127.0.0.1:{}/{}",
        pm_e2e::pg::port(),
        db.name
    );
    // Refused before binding anything.
    let (status, log) = Sidecar::refused(&url, &[("POLAR_METER_LISTEN", "0.0.0.0:0")]).await;
    assert!(!status.success());
    assert!(log.contains("POLAR_METER_BEHIND_TLS_PROXY"), "{log}");
    let (status, log) = Sidecar::refused(
        &url,
        &[
            ("POLAR_API_URL", "http://polar.example:8788"),
            ("POLAR_ACCESS_TOKEN", "polar_oat_x"),
        ],
    )
    .await;
    assert!(!status.success());
    assert!(log.contains("plain http"), "{log}");
}
