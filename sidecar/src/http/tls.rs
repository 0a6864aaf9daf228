//! HTTPS: polar-meterd's own certificate (POLAR_METER_TLS_CERT and
//! POLAR_METER_TLS_KEY, PEM), reloaded on SIGHUP without dropping
//! connections: new handshakes use the new pair, a bad new pair is refused
//! and the old one kept.
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

pub struct Reloadable {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<TlsAcceptor>,
}

fn load(cert: &PathBuf, key: &PathBuf) -> Result<TlsAcceptor, String> {
    let chain_pem =
        std::fs::read(cert).map_err(|e| format!("POLAR_METER_TLS_CERT {}: {e}", cert.display()))?;
    let chain = rustls_pemfile::certs(&mut chain_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("POLAR_METER_TLS_CERT {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "POLAR_METER_TLS_CERT {}: no certificate in it",
            cert.display()
        ));
    }
    let key_pem =
        std::fs::read(key).map_err(|e| format!("POLAR_METER_TLS_KEY {}: {e}", key.display()))?;
    let private = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("POLAR_METER_TLS_KEY {}: {e}", key.display()))?
        .ok_or_else(|| {
            format!(
                "POLAR_METER_TLS_KEY {}: no private key in it",
                key.display()
            )
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| format!("POLAR_METER_TLS_CERT/KEY: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Reloadable {
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Arc<Self>, String> {
        let current = RwLock::new(load(&cert, &key)?);
        Ok(Arc::new(Reloadable { cert, key, current }))
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().unwrap().clone()
    }

    /// Reads the files again; on error the serving pair stays.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = load(&self.cert, &self.key)?;
        *self.current.write().unwrap() = fresh;
        Ok(())
    }
}
