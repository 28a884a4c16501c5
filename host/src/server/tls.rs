//! TLS for the node: a development CA created on first start (so `cachet
//! serve` and `cachet set` work locally with no setup), or operator-supplied
//! certificates in production. TLS 1.3 only, ring as the one crypto
//! provider, no 0-RTT (so no request, and in particular no write, is ever
//! accepted in early data).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
    string::Ia5String,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File names inside the data directory.
pub const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
const NODE_CERT: &str = "node.pem";
const NODE_KEY: &str = "node-key.pem";

/// How a certificate names the cluster member it belongs to: a URI in its
/// subject alternative names, `cachet://node/7` for node 7. Peers hold
/// each other to it (see `cluster::transport`).
pub const NODE_URI_PREFIX: &str = "cachet://node/";
/// The common name of the CA `--dev-ca` makes.
const DEV_CA_NAME: &str = "Cachet development CA";
/// The common name of the CA `cachet cert issue` makes.
const CLUSTER_CA_NAME: &str = "Cachet cluster CA";

/// The URI naming node `node_id` in a certificate.
pub fn node_uri(node_id: u32) -> String {
    format!("{NODE_URI_PREFIX}{node_id}")
}

/// Why a certificate names no cluster member.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    /// Not DER X.509.
    #[error("not a readable X.509 certificate")]
    Unreadable,
    /// No `cachet://node/ID` URI.
    #[error("the certificate names no node (no `cachet://node/ID` URI among its subject alternative names)")]
    Missing,
    /// Two different node ids.
    #[error("the certificate names more than one node ({0} and {1})")]
    Ambiguous(u32, u32),
    /// A `cachet://node/` URI whose rest is not a node id.
    #[error("`{0}` is not a node id URI (`cachet://node/` and decimal digits)")]
    Malformed(String),
}

/// The node id `cert` carries in its subject alternative names (see
/// [`NODE_URI_PREFIX`]). Exactly one id: a certificate naming two
/// different nodes, or a malformed one, names none.
pub fn cert_node_id(cert: &CertificateDer<'_>) -> Result<u32, NodeIdError> {
    let parsed = webpki::EndEntityCert::try_from(cert).map_err(|_| NodeIdError::Unreadable)?;
    let mut found: Option<u32> = None;
    for uri in parsed.valid_uri_names() {
        let Some(digits) = uri.strip_prefix(NODE_URI_PREFIX) else { continue };
        let id = Some(digits)
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u32>().ok())
            .ok_or_else(|| NodeIdError::Malformed(uri.to_string()))?;
        match found {
            Some(other) if other != id => return Err(NodeIdError::Ambiguous(other.min(id), other.max(id))),
            _ => found = Some(id),
        }
    }
    found.ok_or(NodeIdError::Missing)
}

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
    /// A development CA shared by several local nodes (`--dev-ca DIR`,
    /// created by whichever starts first), and this node's certificate,
    /// signed by it, in its own data directory.
    SharedDevCa {
        /// The shared CA's directory.
        ca_dir: PathBuf,
        /// This node's data directory.
        data_dir: PathBuf,
        /// The cluster member this node is (`--node-id`), named in its
        /// certificate; `None` for a node outside a cluster.
        node_id: Option<u32>,
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
    let write = |name: &str, pem: String, secrecy: Secrecy| write_atomically(&data_dir.join(name), &pem, secrecy);
    write(CA_CERT, ca_cert.pem(), Secrecy::Public)?;
    write(CA_KEY, issuer.key().serialize_pem(), Secrecy::Private)?;
    write(NODE_KEY, node_key.serialize_pem(), Secrecy::Private)?;
    // The node certificate last: its presence marks a complete set.
    write(NODE_CERT, node.pem(), Secrecy::Public)?;
    tracing::info!(dir = %data_dir.display(), "created a development CA and node certificate");
    Ok(())
}

/// Creates the development CA in `ca_dir` unless it is there, safely when
/// several processes start at once: each builds a complete CA in a private
/// directory beside `ca_dir` and renames it into place; the first rename
/// wins (an empty `ca_dir` may be replaced, a filled one may not) and the
/// others use the winner's.
pub fn ensure_shared_ca(ca_dir: &Path) -> Result<(), TlsError> {
    ensure_ca(ca_dir, DEV_CA_NAME)
}

/// [`ensure_shared_ca`] for a CA named `common_name`.
fn ensure_ca(ca_dir: &Path, common_name: &str) -> Result<(), TlsError> {
    let complete = |dir: &Path| dir.join(CA_CERT).is_file() && dir.join(CA_KEY).is_file();
    if complete(ca_dir) {
        return Ok(());
    }
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let parent = ca_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let name = ca_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "ca".into());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let staging = parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let ca_key = KeyPair::generate().map_err(generate)?;
    let ca_cert = ca_params(common_name)?.self_signed(&ca_key).map_err(generate)?;
    let write = |name: &str, pem: String, secrecy: Secrecy| write_atomically(&staging.join(name), &pem, secrecy);
    write(CA_KEY, ca_key.serialize_pem(), Secrecy::Private)?;
    write(CA_CERT, ca_cert.pem(), Secrecy::Public)?;
    let renamed = std::fs::rename(&staging, ca_dir);
    if renamed.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    if complete(ca_dir) {
        if renamed.is_ok() {
            tracing::info!(dir = %ca_dir.display(), name = common_name, "created a CA");
        }
        return Ok(());
    }
    match renamed {
        Err(source) => Err(TlsError::Io { path: ca_dir.to_path_buf(), source }),
        Ok(()) => Err(TlsError::Pem { path: ca_dir.to_path_buf(), detail: "the development CA vanished".into() }),
    }
}

/// A node certificate in `data_dir` signed by the shared CA in `ca_dir`
/// (made if missing, signed by another CA, or naming another node than
/// `node_id`), with a copy of the CA's certificate beside it for clients
/// that trust the data directory. With a `node_id`, the certificate names
/// it (see [`NODE_URI_PREFIX`]), so members of a local cluster are held to
/// their ids as on production certificates.
pub fn ensure_node_cert(ca_dir: &Path, data_dir: &Path, node_id: Option<u32>) -> Result<(), TlsError> {
    ensure_shared_ca(ca_dir)?;
    let read = |path: PathBuf| std::fs::read_to_string(&path).map_err(io(&path));
    let ca_pem = read(ca_dir.join(CA_CERT))?;
    let same_ca = std::fs::read_to_string(data_dir.join(CA_CERT)).is_ok_and(|pem| pem == ca_pem);
    let names_node = || {
        let certs = load_certs(&data_dir.join(NODE_CERT)).ok();
        let named = certs.as_ref().and_then(|c| c.first()).map(cert_node_id);
        node_id.is_none_or(|id| named == Some(Ok(id)))
    };
    if same_ca && data_dir.join(NODE_CERT).is_file() && data_dir.join(NODE_KEY).is_file() && names_node() {
        return Ok(());
    }
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let key = KeyPair::generate().map_err(generate)?;
    let cert = sign_with_ca(ca_dir, node_params(node_id, &[])?, &key, webpki::KeyUsage::server_auth())?;
    let write = |name: &str, pem: String, secrecy: Secrecy| write_atomically(&data_dir.join(name), &pem, secrecy);
    // The node certificate goes first and the CA copy last: a data
    // directory whose CA copy matches is complete.
    let _ = std::fs::remove_file(data_dir.join(CA_CERT));
    write(NODE_KEY, key.serialize_pem(), Secrecy::Private)?;
    write(NODE_CERT, cert.pem(), Secrecy::Public)?;
    write(CA_CERT, ca_pem, Secrecy::Public)?;
    Ok(())
}

/// A node certificate's parameters: DNS names and addresses clients may
/// check it against (`localhost`, the loopback addresses and `names`), the
/// node id when given, and both TLS uses (members are each other's
/// servers and clients).
fn node_params(node_id: Option<u32>, names: &[String]) -> Result<CertificateParams, TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let mut all: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    for name in names {
        if !all.contains(name) {
            all.push(name.clone());
        }
    }
    let mut params = CertificateParams::new(all).map_err(generate)?;
    match node_id {
        Some(id) => {
            let uri = Ia5String::try_from(node_uri(id)).map_err(generate)?;
            params.subject_alt_names.push(SanType::URI(uri));
            params.distinguished_name.push(DnType::CommonName, format!("cachet node {id}"));
        }
        None => params.distinguished_name.push(DnType::CommonName, "cachet node"),
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// Signs `params` for `key` with the CA in `ca_dir`. The CA's parameters
/// are rebuilt, not parsed (the issuer's name and key are all a signature
/// refers to): its name is one of the two cachet gives its CAs, and the
/// result is checked against the CA's certificate for `usage`, so a
/// certificate that does not chain to it (a CA cachet did not make) is
/// refused rather than written.
fn sign_with_ca(
    ca_dir: &Path,
    params: CertificateParams,
    key: &KeyPair,
    usage: webpki::KeyUsage,
) -> Result<rcgen::Certificate, TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let ca_key_path = ca_dir.join(CA_KEY);
    warn_if_exposed(&ca_key_path);
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(generate)?;
    let ca_path = ca_dir.join(CA_CERT);
    let ca_certs = load_certs(&ca_path)?;
    let anchors = ca_certs
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: ca_path.clone(), detail: e.to_string() })?;
    let algorithms = provider().signature_verification_algorithms.all;
    for name in [CLUSTER_CA_NAME, DEV_CA_NAME] {
        let issuer = Issuer::new(ca_params(name)?, &ca_key);
        let cert = params.signed_by(key, &issuer).map_err(generate)?;
        let der = cert.der().clone();
        let chains = webpki::EndEntityCert::try_from(&der).is_ok_and(|end| {
            let now = rustls_pki_types::UnixTime::now();
            end.verify_for_usage(algorithms, &anchors, &[], now, usage, None, None).is_ok()
        });
        if chains {
            return Ok(cert);
        }
    }
    Err(TlsError::Pem {
        path: ca_path,
        detail: "not a CA made by cachet with this key (certificates signed with it would not chain to it)".into(),
    })
}

/// What [`issue_cert`] makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertSubject {
    /// A cluster member: `node-ID.pem`, named `cachet://node/ID`.
    Node(u32),
    /// A client of the nodes (mutual TLS): `client-NAME.pem`, with the DNS
    /// name `NAME`.
    Client(String),
}

/// `cachet cert issue`: creates the CA in `ca_dir` unless it is there, and
/// writes a certificate for `subject` signed by it and its key (owner-only)
/// into `out_dir`. A node's certificate is valid for `localhost`, the
/// loopback addresses and `names` (DNS names or IP addresses clients check
/// the node against). Returns the certificate's and the key's paths.
pub fn issue_cert(
    ca_dir: &Path,
    out_dir: &Path,
    subject: &CertSubject,
    names: &[String],
) -> Result<(PathBuf, PathBuf), TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    ensure_ca(ca_dir, CLUSTER_CA_NAME)?;
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let (params, stem, usage) = match subject {
        CertSubject::Node(id) => {
            (node_params(Some(*id), names)?, format!("node-{id}"), webpki::KeyUsage::server_auth())
        }
        CertSubject::Client(name) => {
            let mut all = vec![name.clone()];
            all.extend(names.iter().filter(|n| *n != name).cloned());
            let mut params = CertificateParams::new(all).map_err(generate)?;
            params.distinguished_name.push(DnType::CommonName, name.as_str());
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            (params, format!("client-{name}"), webpki::KeyUsage::client_auth())
        }
    };
    let key = KeyPair::generate().map_err(generate)?;
    let cert = sign_with_ca(ca_dir, params, &key, usage)?;
    let cert_path = out_dir.join(format!("{stem}.pem"));
    let key_path = out_dir.join(format!("{stem}-key.pem"));
    write_atomically(&key_path, &key.serialize_pem(), Secrecy::Private)?;
    write_atomically(&cert_path, &cert.pem(), Secrecy::Public)?;
    Ok((cert_path, key_path))
}

/// Who may read a file written by [`write_atomically`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Secrecy {
    /// A certificate: anyone on the machine may read it (0644).
    Public,
    /// A private key: the owner only (0600), from its first byte on.
    Private,
}

impl Secrecy {
    #[cfg(unix)]
    fn mode(self) -> u32 {
        match self {
            Self::Public => 0o644,
            Self::Private => 0o600,
        }
    }
}

/// Writes `contents` to `path` so that no reader ever sees a partial file
/// and a private key is never readable by others, not even for the moment
/// between creating and `chmod`-ing it: a temporary file beside `path` is
/// created with its final mode (`create_new`, so an existing file or link
/// planted there is refused, not followed), filled, synced and renamed over
/// `path`. A crash leaves the old file or the new one, never half of one.
fn write_atomically(path: &Path, contents: &str, secrecy: Secrecy) -> Result<(), TlsError> {
    use std::io::Write as _;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Unique among this process's threads by the counter, among processes
    // by the pid, and against a stale file of an earlier process by the time.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}-{nanos}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(secrecy.mode());
    }
    #[cfg(not(unix))]
    let _ = secrecy;
    let written = options.open(&tmp).and_then(|mut file| {
        file.write_all(contents.as_bytes())?;
        file.sync_all()
    });
    if let Err(source) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(TlsError::Io { path: path.to_path_buf(), source });
    }
    // The rename itself is durable only once the directory is synced; a
    // failure here loses nothing already written, so it is not fatal.
    #[cfg(unix)]
    if let Err(err) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), %err, "cannot sync the directory after writing a key or certificate");
    }
    Ok(())
}

/// The permission bits of `path` when they let its group or others in (a
/// private key should let no one but its owner in); `None` when they do not
/// or the file cannot be examined.
#[cfg(unix)]
fn exposed_bits(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

#[cfg(not(unix))]
fn exposed_bits(_path: &Path) -> Option<u32> {
    None
}

/// Warns, naming the file, when a private key found at start can be read by
/// others than its owner (made by an older version, or copied in by hand).
/// Not refused: an operator's deployment may rely on a shared group, and a
/// node that will not start over it would be a worse surprise.
fn warn_if_exposed(key: &Path) {
    if let Some(bits) = exposed_bits(key) {
        tracing::warn!(
            file = %key.display(),
            mode = format!("{bits:o}"),
            "private key readable by group or others; `chmod 600` it"
        );
    }
}

/// The development CA's parameters. Rebuilt, not parsed, when the CA signs
/// again: the issuer name and the key are all a signature refers to.
fn dev_ca_params() -> Result<CertificateParams, TlsError> {
    ca_params(DEV_CA_NAME)
}

/// A CA's parameters, named `common_name`.
fn ca_params(common_name: &str) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| TlsError::Generate(e.to_string()))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, common_name);
    Ok(params)
}

/// Issues a client certificate for `name`, signed by the development CA in
/// `data_dir`, and writes `client-NAME.pem` and `client-NAME-key.pem` there.
/// For trying mutual TLS locally; production client certificates come from
/// the operator's own CA.
pub fn issue_client_cert(data_dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    let generate = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let ca_key_path = data_dir.join(CA_KEY);
    warn_if_exposed(&ca_key_path);
    let ca_key = std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
    let issuer = Issuer::new(dev_ca_params()?, KeyPair::from_pem(&ca_key).map_err(generate)?);
    let mut params = CertificateParams::new(vec![name.to_string()]).map_err(generate)?;
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().map_err(generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;
    let cert_path = data_dir.join(format!("client-{name}.pem"));
    let key_path = data_dir.join(format!("client-{name}-key.pem"));
    write_atomically(&key_path, &key.serialize_pem(), Secrecy::Private)?;
    write_atomically(&cert_path, &cert.pem(), Secrecy::Public)?;
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
    let tls = rustls_server_config(source, Some(alpn))?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// The TLS configuration of a TCP port (the RESP port's `--resp-tls`):
/// the node's certificate as [`server_config`] takes it, TLS 1.3, no ALPN
/// (Redis clients send none), client certificates required when the
/// source names a client CA.
pub fn tcp_server_config(source: &TlsSource) -> Result<rustls::ServerConfig, TlsError> {
    rustls_server_config(source, None)
}

fn rustls_server_config(source: &TlsSource, alpn: Option<&[u8]>) -> Result<rustls::ServerConfig, TlsError> {
    let (cert, key, client_ca) = match source {
        TlsSource::DevCa { data_dir } => {
            ensure_dev_ca(data_dir)?;
            (data_dir.join(NODE_CERT), data_dir.join(NODE_KEY), None)
        }
        TlsSource::SharedDevCa { ca_dir, data_dir, node_id } => {
            ensure_node_cert(ca_dir, data_dir, *node_id)?;
            (data_dir.join(NODE_CERT), data_dir.join(NODE_KEY), None)
        }
        TlsSource::Files { cert, key, client_ca } => (cert.clone(), key.clone(), client_ca.clone()),
    };
    let certs = load_certs(&cert)?;
    warn_if_exposed(&key);
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
    tls.alpn_protocols = alpn.map(|alpn| vec![alpn.to_vec()]).unwrap_or_default();
    // No early data: a replayed 0-RTT write could apply twice.
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// The domain of the server names a node dials its peers by (see
/// [`peer_server_name`]); `.invalid` is reserved, so no real host has it.
const PEER_DOMAIN: &str = ".cachet-peer.invalid";

/// The server name a node dials a peer by: `node-ID.cachet-peer.invalid`
/// when it expects member `ID` there (the peer's certificate must name that
/// node), `any.cachet-peer.invalid` when it does not know yet (a seed
/// known only by its address: any member of the cluster's CA will do).
pub fn peer_server_name(expected: Option<u32>) -> String {
    match expected {
        Some(id) => format!("node-{id}{PEER_DOMAIN}"),
        None => format!("any{PEER_DOMAIN}"),
    }
}

/// The node a server name from [`peer_server_name`] asks for.
fn expected_node(server_name: &rustls_pki_types::ServerName<'_>) -> Option<u32> {
    let rustls_pki_types::ServerName::DnsName(name) = server_name else { return None };
    name.as_ref().strip_suffix(PEER_DOMAIN)?.strip_prefix("node-")?.parse().ok()
}

/// Lets a peer's certificate through when the cluster's CA signed it and it
/// names a node (the one asked for, if any). Host names are not checked: a
/// member is who its certificate names, wherever it is reached.
#[derive(Debug)]
struct PeerServerVerifier {
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// Peer certificates refused for the node they name, logged at most once a
/// second.
static PEER_REFUSED_LOG: crate::clients::LogLimiter = crate::clients::LogLimiter::new(1_000);

impl rustls::client::danger::ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        let algorithms = self.provider.signature_verification_algorithms.all;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            algorithms,
        )?;
        let refused = match (cert_node_id(end_entity), expected_node(server_name)) {
            (Ok(id), Some(expected)) if id != expected => {
                format!("the peer's certificate names node {id}, not node {expected}")
            }
            (Ok(_), _) => return Ok(rustls::client::danger::ServerCertVerified::assertion()),
            (Err(err), _) => format!("the peer's certificate: {err}"),
        };
        let now_ms = now.as_secs().saturating_mul(1_000);
        if let Some(suppressed) = PEER_REFUSED_LOG.check(now_ms) {
            tracing::warn!(server = ?server_name, suppressed, "refused a peer: {refused}");
        }
        let refused = Arc::new(std::io::Error::other(refused));
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(refused))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The quinn client configuration a node uses toward its peers: it trusts
/// only `ca`, presents its own certificate (peers require one), and takes
/// a peer only when its certificate names a node, the one the server name
/// asks for ([`peer_server_name`]) if it asks for one; speaking `alpn`.
pub fn peer_client_config(ca: &Path, cert: &Path, key: &Path, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let config = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| config(&e))?;
    }
    let chain = load_certs(cert)?;
    warn_if_exposed(key);
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Pem { path: key.to_path_buf(), detail: e.to_string() })?;
    let verifier = Arc::new(PeerServerVerifier { roots: Arc::new(roots), provider: provider() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config(&e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| config(&e))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| config(&e))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// The certificate and key files of a node's data directory (as made by
/// [`ensure_dev_ca`] or [`ensure_node_cert`]).
pub fn node_cert_files(data_dir: &Path) -> (PathBuf, PathBuf) {
    (data_dir.join(NODE_CERT), data_dir.join(NODE_KEY))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eight processes' worth of threads racing to create one CA all end up
    /// with the same one, and node certificates signed by it.
    #[test]
    fn concurrent_starts_share_one_development_ca() {
        let root = std::env::temp_dir().join(format!("cachet-shared-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("root");
        let ca_dir = root.join("ca");
        std::fs::create_dir_all(&ca_dir).expect("an empty CA dir, as a user would make it");
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (ca_dir, data_dir) = (ca_dir.clone(), root.join(format!("node{i}")));
                std::thread::spawn(move || ensure_node_cert(&ca_dir, &data_dir, Some(i)))
            })
            .collect();
        for handle in handles {
            handle.join().expect("thread").expect("node certificate");
        }
        let ca = std::fs::read_to_string(ca_dir.join(CA_CERT)).expect("ca");
        for i in 0..8 {
            let copy = std::fs::read_to_string(root.join(format!("node{i}")).join(CA_CERT)).expect("copy");
            assert_eq!(copy, ca, "node {i} trusts another CA");
        }
        let leftovers = std::fs::read_dir(&root).expect("list").filter_map(Result::ok);
        let staging: Vec<_> = leftovers.filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
        assert!(staging.is_empty(), "staging directories left behind");
        // A directory that holds something else is refused, not overwritten.
        let busy = root.join("busy");
        std::fs::create_dir_all(&busy).expect("dir");
        std::fs::write(busy.join("other"), "x").expect("file");
        assert!(ensure_shared_ca(&busy).is_err());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    /// Every private key made here (the development CA's, a shared CA's, a
    /// node's, a client's) is the owner's alone, whatever the umask; no
    /// temporary file is left beside it; an existing key others can read
    /// is noticed.
    #[cfg(unix)]
    #[test]
    fn private_keys_are_written_owner_only() {
        let root = std::env::temp_dir().join(format!("cachet-key-modes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (single, shared, node) = (root.join("single"), root.join("ca"), root.join("node"));
        ensure_dev_ca(&single).expect("development CA");
        ensure_node_cert(&shared, &node, Some(3)).expect("node certificate from a shared CA");
        let (client_cert, client_key) = issue_client_cert(&single, "app-1").expect("client certificate");
        for key in [single.join(CA_KEY), single.join(NODE_KEY), shared.join(CA_KEY), node.join(NODE_KEY), client_key] {
            assert_eq!(mode(&key), 0o600, "{} is readable by others", key.display());
            assert_eq!(exposed_bits(&key), None);
        }
        for cert in [single.join(CA_CERT), single.join(NODE_CERT), node.join(NODE_CERT), client_cert] {
            assert_eq!(mode(&cert) & 0o600, 0o600, "{} is the owner's to read and write", cert.display());
        }
        for dir in [&single, &shared, &node] {
            let names: Vec<_> =
                std::fs::read_dir(dir).expect("list").filter_map(Result::ok).map(|e| e.file_name()).collect();
            assert!(names.iter().all(|n| !n.to_string_lossy().contains(".tmp-")), "temporary files left: {names:?}");
        }
        // A key made looser by hand (or by an older version) is found.
        use std::os::unix::fs::PermissionsExt as _;
        let loose = node.join(NODE_KEY);
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(exposed_bits(&loose), Some(0o644));
        let _ = std::fs::remove_dir_all(&root);
    }

    fn first_cert(path: &Path) -> CertificateDer<'static> {
        load_certs(path).expect("certificate").swap_remove(0)
    }

    /// A certificate with these URIs among its names, self-signed.
    fn with_uris(uris: &[&str]) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        for uri in uris {
            params.subject_alt_names.push(SanType::URI(Ia5String::try_from(*uri).expect("ia5")));
        }
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("certificate").der().clone()
    }

    /// The node id travels in a `cachet://node/N` URI: read back from what
    /// `cachet cert issue` and the development CA make; a client's
    /// certificate names none, and neither do malformed or conflicting
    /// URIs.
    #[test]
    fn certificates_name_their_node() {
        let root = std::env::temp_dir().join(format!("cachet-node-ids-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (ca, out) = (root.join("ca"), root.join("out"));
        let names = ["db1.example".to_string(), "10.0.0.9".to_string()];
        let (cert, key) = issue_cert(&ca, &out, &CertSubject::Node(9), &names).expect("node certificate");
        assert_eq!(cert, out.join("node-9.pem"));
        let der = first_cert(&cert);
        assert_eq!(cert_node_id(&der), Ok(9));
        let parsed = webpki::EndEntityCert::try_from(&der).expect("parse");
        let dns: Vec<&str> = parsed.valid_dns_names().collect();
        assert_eq!(dns, ["localhost", "db1.example"]);
        for name in ["10.0.0.9", "127.0.0.1", "db1.example"] {
            let name = rustls_pki_types::ServerName::try_from(name).expect("name");
            assert!(parsed.verify_is_valid_for_subject_name(&name).is_ok(), "not valid for {name:?}");
        }
        #[cfg(unix)]
        {
            assert_eq!(mode(&key), 0o600, "the key is the owner's alone");
            assert_eq!(mode(&ca.join(CA_KEY)), 0o600, "the CA's key is the owner's alone");
        }
        #[cfg(not(unix))]
        let _ = key;
        let (client, _) = issue_cert(&ca, &out, &CertSubject::Client("app".into()), &[]).expect("client certificate");
        assert_eq!(cert_node_id(&first_cert(&client)), Err(NodeIdError::Missing));

        // A local cluster's certificates name their node too, and follow
        // the node id the data directory is started with.
        let (dev, data) = (root.join("dev"), root.join("data"));
        ensure_node_cert(&dev, &data, Some(3)).expect("development certificate");
        assert_eq!(cert_node_id(&first_cert(&data.join(NODE_CERT))), Ok(3));
        ensure_node_cert(&dev, &data, Some(4)).expect("re-issued");
        assert_eq!(cert_node_id(&first_cert(&data.join(NODE_CERT))), Ok(4));
        let before = std::fs::read(data.join(NODE_CERT)).expect("read");
        ensure_node_cert(&dev, &data, None).expect("kept");
        assert_eq!(std::fs::read(data.join(NODE_CERT)).expect("read"), before, "re-issued with nothing asked");
        // `cert issue` signs with a development CA as well (the issuer's
        // name is found), and refuses a CA whose key is not its own.
        let (from_dev, _) = issue_cert(&dev, &out, &CertSubject::Node(1), &[]).expect("issued by the dev CA");
        assert_eq!(cert_node_id(&first_cert(&from_dev)), Ok(1));
        let foreign = root.join("foreign");
        ensure_shared_ca(&foreign).expect("CA");
        let other_key = KeyPair::generate().expect("key").serialize_pem();
        write_atomically(&foreign.join(CA_KEY), &other_key, Secrecy::Private).expect("swap the key");
        let refused = issue_cert(&foreign, &root.join("none"), &CertSubject::Node(1), &[]);
        assert!(refused.is_err(), "signed with a key that is not the CA's");
        assert!(!root.join("none").join("node-1.pem").exists(), "a certificate that does not chain was written");

        assert_eq!(cert_node_id(&with_uris(&["cachet://node/2", "cachet://node/2", "https://x.example/"])), Ok(2));
        assert_eq!(
            cert_node_id(&with_uris(&["cachet://node/2", "cachet://node/1"])),
            Err(NodeIdError::Ambiguous(1, 2))
        );
        for bad in
            ["cachet://node/", "cachet://node/x", "cachet://node/-1", "cachet://node/1/", "cachet://node/4294967296"]
        {
            assert_eq!(cert_node_id(&with_uris(&[bad])), Err(NodeIdError::Malformed(bad.into())), "{bad}");
        }
        assert_eq!(cert_node_id(&with_uris(&["https://node/1"])), Err(NodeIdError::Missing));
        assert_eq!(cert_node_id(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])), Err(NodeIdError::Unreadable));
        let _ = std::fs::remove_dir_all(&root);
    }

    /// Dialers name the member they expect; other names ask for none.
    #[test]
    fn peer_server_names_carry_the_expected_node() {
        let parse = |name: String| expected_node(&rustls_pki_types::ServerName::try_from(name).expect("name"));
        assert_eq!(parse(peer_server_name(Some(12))), Some(12));
        assert_eq!(parse(peer_server_name(None)), None);
        assert_eq!(parse("localhost".into()), None);
        assert_eq!(parse("node-1.example".into()), None);
    }
}
