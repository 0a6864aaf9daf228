//! TLS to PostgreSQL with libpq's meaning of sslmode, over rustls:
//!   disable      no TLS
//!   prefer       TLS if the server offers it, unverified (libpq's default)
//!   require      TLS, unverified (verify-ca when sslrootcert is given, as libpq does)
//!   verify-ca    TLS, the chain must lead to sslrootcert
//!   verify-full  TLS, the chain must lead to sslrootcert and name the host
//! tokio-postgres's own parser refuses verify-ca, verify-full and sslrootcert,
//! so they are taken out of DATABASE_URL here and the rest is handed to it.
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCerts {
    /// `sslrootcert=<file>` (PEM), or libpq's default ~/.postgresql/root.crt.
    File(PathBuf),
    /// `sslrootcert=system`: the public web CAs (Mozilla's list).
    System,
    None,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SslSettings {
    pub mode: Mode,
    pub roots: RootCerts,
}

fn mode(v: &str) -> Result<Mode, String> {
    Ok(match v {
        "disable" => Mode::Disable,
        "allow" | "prefer" => Mode::Prefer,
        "require" => Mode::Require,
        "verify-ca" => Mode::VerifyCa,
        "verify-full" => Mode::VerifyFull,
        other => {
            return Err(format!(
                "DATABASE_URL: sslmode must be disable, prefer, require, verify-ca or verify-full (got {other:?})"
            ))
        }
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `key=value` pairs of a libpq keyword/value string, with their byte spans,
/// so that everything but the TLS keys can be handed on unchanged.
fn keyword_pairs(s: &str) -> Result<Vec<(String, String, std::ops::Range<usize>)>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            return Ok(out);
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = s[start..i].to_string();
        skip_ws(&mut i);
        if i >= b.len() || b[i] != b'=' {
            return Err(format!("DATABASE_URL: expected `=` after {key:?}"));
        }
        i += 1;
        skip_ws(&mut i);
        let mut value = String::new();
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err("DATABASE_URL: unterminated quoted value".into()),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < b.len() => {
                        value.push(b[i + 1] as char);
                        i += 2;
                    }
                    Some(_) => {
                        let ch = s[i..].chars().next().unwrap();
                        value.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
        } else {
            let vs = i;
            while i < b.len() && !b[i].is_ascii_whitespace() {
                i += 1;
            }
            value = s[vs..i].to_string();
        }
        out.push((key, value, start..i));
    }
}

/// Takes sslmode and sslrootcert out of a connection string (URL or
/// keyword/value form) and returns the rest with the settings they make.
pub fn split_ssl_params(url: &str) -> Result<(String, SslSettings), String> {
    let mut sslmode = None;
    let mut rootcert = None;
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    match k {
                        "sslmode" => sslmode = Some(percent_decode(v)),
                        "sslrootcert" => rootcert = Some(percent_decode(v)),
                        _ => kept.push(pair),
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut rest = String::new();
        let mut last = 0;
        for (k, v, span) in keyword_pairs(url)? {
            match k.as_str() {
                "sslmode" => sslmode = Some(v),
                "sslrootcert" => rootcert = Some(v),
                _ => continue,
            }
            rest.push_str(&url[last..span.start]);
            last = span.end;
        }
        rest.push_str(&url[last..]);
        rest
    };
    let explicit_root = rootcert.is_some();
    let roots = match rootcert.as_deref() {
        Some("system") => RootCerts::System,
        Some(path) => RootCerts::File(PathBuf::from(path)),
        None => {
            match std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt")) {
                Some(p) if p.exists() => RootCerts::File(p),
                _ => RootCerts::None,
            }
        }
    };
    let mut m = match sslmode.as_deref() {
        None => Mode::Prefer,
        Some(v) => mode(v)?,
    };
    if m == Mode::Require && explicit_root {
        m = Mode::VerifyCa;
    }
    if matches!(m, Mode::VerifyCa | Mode::VerifyFull) && roots == RootCerts::None {
        return Err(
            "DATABASE_URL: sslmode=verify-ca/verify-full needs sslrootcert (a PEM file of the CA, or `system` for public CAs)"
                .into(),
        );
    }
    Ok((rest.trim().to_string(), SslSettings { mode: m, roots }))
}

impl SslSettings {
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            Mode::Disable | Mode::Prefer | Mode::Require => Arc::new(Lenient {
                provider,
                chain: None,
            }),
            Mode::VerifyCa | Mode::VerifyFull => {
                let roots = Arc::new(self.root_store()?);
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    provider.clone(),
                )
                .build()
                .map_err(|e| format!("sslrootcert: {e}"))?;
                if self.mode == Mode::VerifyFull {
                    inner
                } else {
                    Arc::new(Lenient {
                        provider,
                        chain: Some(inner),
                    })
                }
            }
        };
        Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth())
    }

    fn root_store(&self) -> Result<RootCertStore, String> {
        let mut store = RootCertStore::empty();
        match &self.roots {
            RootCerts::System => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            RootCerts::File(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                    store
                        .add(cert)
                        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                }
                if store.is_empty() {
                    return Err(format!(
                        "sslrootcert {}: no certificate in it",
                        path.display()
                    ));
                }
            }
            RootCerts::None => {}
        }
        Ok(store)
    }
}

/// What sslmode prefer/require and verify-ca check short of verify-full:
/// with no `chain`, nothing about the certificate (libpq's prefer/require);
/// with one, that it leads to a trusted root, whatever name it bears
/// (verify-ca). The handshake's signatures are verified either way.
#[derive(Debug)]
struct Lenient {
    provider: Arc<rustls::crypto::CryptoProvider>,
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_form_loses_only_the_tls_keys() {
        let (rest, s) = split_ssl_params(
            "postgres://u:p%40ss@db.example:5432/x?application_name=a&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db.example:5432/x?application_name=a"
        );
        assert_eq!(s.mode, Mode::VerifyFull);
        assert_eq!(s.roots, RootCerts::File("/etc/ca.pem".into()));
        let (rest, s) = split_ssl_params("postgres://u@h/x?sslmode=disable").unwrap();
        assert_eq!((rest.as_str(), s.mode), ("postgres://u@h/x", Mode::Disable));
        let (_, s) = split_ssl_params("postgres://u@h/x").unwrap();
        assert_eq!(s.mode, Mode::Prefer, "libpq's default");
    }

    #[test]
    fn keyword_form_keeps_quotes_and_order() {
        let (rest, s) = split_ssl_params(
            "host=h port=5 sslmode = 'verify-ca' password='a b\\'c' sslrootcert=/ca.pem dbname=x",
        )
        .unwrap();
        assert_eq!(rest, "host=h port=5  password='a b\\'c'  dbname=x");
        assert_eq!(s.mode, Mode::VerifyCa);
        use std::str::FromStr;
        assert!(tokio_postgres::Config::from_str(&rest).is_ok());
    }

    #[test]
    fn require_with_a_root_is_verify_ca_and_verify_needs_a_root() {
        let (_, s) = split_ssl_params("host=h sslmode=require sslrootcert=system").unwrap();
        assert_eq!((s.mode, s.roots), (Mode::VerifyCa, RootCerts::System));
        if std::env::var_os("HOME").is_some_and(|h| {
            std::path::Path::new(&h)
                .join(".postgresql/root.crt")
                .exists()
        }) {
            return;
        }
        let e = split_ssl_params("host=h sslmode=verify-full").unwrap_err();
        assert!(e.contains("sslrootcert"), "{e}");
        assert!(split_ssl_params("host=h sslmode=bogus").is_err());
        assert!(split_ssl_params("host=h sslmode").is_err());
    }
}
