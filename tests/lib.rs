//! Helpers shared by Cachet's integration tests (`tests/all`).

use std::path::PathBuf;

/// The misbehaving test policy (`tests/guests/hostile`) as a component,
/// built by this crate's build script.
pub fn hostile_component() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/guests/hostile.wasm"))
}

/// The misbehaving test loader (`tests/guests/hostile-loader`).
pub fn hostile_loader_component() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/guests/hostile-loader.wasm"))
}

/// The example `users` loader (`examples/postgres-read-through`).
pub fn users_loader_component() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/guests/users-loader.wasm"))
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The trace directory (`traces/` in the checkout): the trace files and
/// `reference.md`, the tables the trace tests compare against.
pub fn traces_dir() -> PathBuf {
    workspace().join("traces")
}

/// A bare QUIC client endpoint trusting the CA in `ca_pem` and offering
/// `alpn`, for tests that speak to a node below the SDK.
pub fn raw_endpoint(ca_pem: &std::path::Path, alpn: &[u8]) -> quinn::Endpoint {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).expect("ca file") {
        roots.add(cert.expect("ca cert")).expect("root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    endpoint
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `cachet-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cachet-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
