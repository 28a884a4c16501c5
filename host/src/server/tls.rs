//! TLS for the node: a development CA created on first start (so `cachet
//! serve` and `cachet set` work locally with no setup), or operator-supplied
//! certificates in production. TLS 1.3 only, ring as the one crypto
//! provider, no 0-RTT (so no request, and in particular no write, is ever
//! accepted in early data).

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File names inside the data directory.
pub const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
const NODE_CERT: &str = "node.pem";
const NODE_KEY: &str = "node-key.pem";

/// TLS set-up that failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Generating the development CA failed.
    #[error("cannot generate the development CA: {0}")]
    Generate(String),
    /// rustls or quinn refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Where the node's certificate comes from.
#[derive(Clone, Debug)]
pub enum TlsSource {
    /// The development CA in this data directory (created if missing).
    DevCa {
        /// The data directory.
        data_dir: PathBuf,
    },
    /// Operator-supplied PEM files.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
        /// When set, clients must present a certificate signed by this CA
        /// (mutual TLS).
        client_ca: Option<PathBuf>,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_path_buf(), source }
}

/// Creates the development CA and a node certificate for `localhost` and
/// the loopback addresses in `data_dir`, unless they exist already.
pub fn ensure_dev_ca(data_dir: &Path) -> Result<(), TlsError> {
    let node_cert = data_dir.join(NODE_CERT);
    if node_cert.exists() && data_dir.join(NODE_KEY).exists() && data_dir.join(CA_CERT).exists() {
        return Ok(());
    }
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let ca_params = dev_ca_params()?;
    let ca_key = KeyPair::generate().map_err(generate)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(generate)?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let mut node_params = CertificateParams::new(names).map_err(generate)?;
    node_params.distinguished_name.push(DnType::CommonName, "cachet node");
    let node_key = KeyPair::generate().map_err(generate)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let node = node_params.signed_by(&node_key, &issuer).map_err(generate)?;
    let write = |name: &str, pem: String| {
        let path = data_dir.join(name);
        std::fs::write(&path, pem).map_err(io(&path))
    };
    write(CA_CERT, ca_cert.pem())?;
    write(CA_KEY, issuer.key().serialize_pem())?;
    write(NODE_KEY, node_key.serialize_pem())?;
    // The node certificate last: its presence marks a complete set.
    write(NODE_CERT, node.pem())?;
    tracing::info!(dir = %data_dir.display(), "created a development CA and node certificate");
    Ok(())
}

/// The development CA's parameters. Rebuilt, not parsed, when the CA signs
/// again: the issuer name and the key are all a signature refers to.
fn dev_ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| TlsError::Generate(e.to_string()))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "Cachet development CA");
    Ok(params)
}

/// Issues a client certificate for `name`, signed by the development CA in
/// `data_dir`, and writes `client-NAME.pem` and `client-NAME-key.pem` there.
/// For trying mutual TLS locally; production client certificates come from
/// the operator's own CA.
pub fn issue_client_cert(data_dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let ca_key_path = data_dir.join(CA_KEY);
    let ca_key = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let issuer = Issuer::new(dev_ca_params()?, KeyPair::from_pem(&ca_key).map_err(generate)?);
    let mut params = CertificateParams::new(vec![name.to_string()]).map_err(generate)?;
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().map_err(generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;
    let cert_path = data_dir.join(format!("client-{name}.pem"));
    let key_path = data_dir.join(format!("client-{name}-key.pem"));
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    std::fs::write(&key_path, key.serialize_pem()).map_err(io(&key_path))?;
    Ok((cert_path, key_path))
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Pem { path: path.to_path_buf(), detail: e.to_string() })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_path_buf(), detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.to_path_buf(), detail: "no certificate in the file".into() });
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The quinn server configuration for `source`, speaking `alpn`.
pub fn server_config(source: &TlsSource, alpn: &[u8]) -> Result<quinn::ServerConfig, TlsError> {
    let (cert, key, client_ca) = match source {
        TlsSource::DevCa { data_dir } => {
            ensure_dev_ca(data_dir)?;
            (data_dir.join(NODE_CERT), data_dir.join(NODE_KEY), None)
        }
        TlsSource::Files { cert, key, client_ca } => (cert.clone(), key.clone(), client_ca.clone()),
    };
    let certs = load_certs(&cert)?;
    let key =
        PrivateKeyDer::from_pem_file(&key).map_err(|e| TlsError::Pem { path: key.clone(), detail: e.to_string() })?;
    let config = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config(&e))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(&path)? {
                roots.add(cert).map_err(|e| config(&e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| config(&e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut tls = builder.with_single_cert(certs, key).map_err(|e| config(&e))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    // No early data: a replayed 0-RTT write could apply twice.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}
