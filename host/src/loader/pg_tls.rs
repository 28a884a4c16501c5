//! TLS to PostgreSQL origins and change feeds, as the connection string
//! asks: libpq's `sslmode` and `sslrootcert`, served by rustls with the ring
//! provider (the rest of the node's TLS uses it; no second crypto library).
//!
//! tokio-postgres knows only `disable`, `prefer` and `require`, and no
//! `sslrootcert`, so both are taken out of the connection string here and
//! the verification each mode stands for is done by our own verifiers:
//!
//! | `sslmode` | encrypted | certificate checked |
//! | --- | --- | --- |
//! | absent, `disable`, `allow` | no | - |
//! | `prefer` | if the server offers TLS | no |
//! | `require` | yes | chain against `sslrootcert` if given (as libpq), else not at all |
//! | `verify-ca` | yes | chain against `sslrootcert` (required) |
//! | `verify-full` | yes | chain against `sslrootcert` (required) and the host name |
//!
//! `allow` and an absent `sslmode` stay plaintext (libpq would try TLS
//! after, or before, plaintext): that is what the node did before TLS.

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// Why a PostgreSQL connection string's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PgTlsError {
    /// `sslmode` has a value libpq does not define.
    #[error("sslmode `{0}` is not one of disable, allow, prefer, require, verify-ca, verify-full")]
    UnknownMode(String),
    /// A verifying mode with nothing to verify against.
    #[error("sslmode={0} needs sslrootcert=FILE, the PEM of the CA that signed the server's certificate")]
    NoRootCert(&'static str),
    /// The `sslrootcert` file cannot be read or holds no usable certificate.
    #[error("sslrootcert {path}: {detail}")]
    RootCert {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The rest of the connection string is not one tokio-postgres accepts.
    #[error("bad connection string: {0}")]
    ConnectionString(String),
}

/// libpq's `sslmode` values this node acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(text: &str) -> Result<Self, PgTlsError> {
        Ok(match text {
            "disable" | "allow" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(PgTlsError::UnknownMode(other.to_string())),
        })
    }
}

/// Parses a connection string (`key=value ...` or a `postgres://` URL),
/// `sslmode` and `sslrootcert` included, into the settings and the TLS
/// connector to connect with.
pub(crate) fn parse(url: &str) -> Result<(tokio_postgres::Config, PgTls), PgTlsError> {
    let (rest, mode, root) = split_tls_options(url)?;
    let mut config =
        tokio_postgres::Config::from_str(&rest).map_err(|e| PgTlsError::ConnectionString(e.to_string()))?;
    config.ssl_mode(match mode {
        Mode::Disable => PgSslMode::Disable,
        Mode::Prefer => PgSslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => PgSslMode::Require,
    });
    Ok((config, PgTls::new(mode, root)?))
}

/// Takes `sslmode` and `sslrootcert` out of `url`: the rest, the mode
/// (disable when absent) and the root certificate file.
fn split_tls_options(url: &str) -> Result<(String, Mode, Option<PathBuf>), PgTlsError> {
    let mut mode = None;
    let mut root = None;
    let mut take = |key: &str, value: &str| match key {
        "sslmode" => {
            mode = Some(Mode::parse(value)?);
            Ok(true)
        }
        "sslrootcert" => {
            root = Some(PathBuf::from(value));
            Ok(true)
        }
        _ => Ok(false),
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(key, &percent_decode(value)?)? {
                kept.push(pair);
            }
        }
        if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) }
    } else {
        let mut kept = Vec::new();
        for (key, value) in key_values(url)? {
            if !take(&key, &value)? {
                // Quoted again, with libpq's escapes, for tokio-postgres.
                kept.push(format!("{key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'")));
            }
        }
        kept.join(" ")
    };
    Ok((rest, mode.unwrap_or(Mode::Disable), root))
}

/// The pairs of a `key=value` connection string, values unquoted (libpq's
/// rules: single quotes, backslash escapes, spaces around `=`).
fn key_values(text: &str) -> Result<Vec<(String, String)>, PgTlsError> {
    let bad = |why: &str| PgTlsError::ConnectionString(why.to_string());
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(bad(&format!("`{key}` has no `=`")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.push(chars.next().ok_or_else(|| bad("a trailing backslash"))?),
                    Some(c) => value.push(c),
                    None => return Err(bad("an unterminated quoted value")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next().ok_or_else(|| bad("a trailing backslash"))?);
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn percent_decode(text: &str) -> Result<String, PgTlsError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or_else(|| PgTlsError::ConnectionString(format!("bad escape in `{text}`")))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PgTlsError::ConnectionString(format!("`{text}` is not UTF-8")))
}

/// The TLS connector of one origin: none for plaintext modes, else a rustls
/// configuration whose verifier is the mode's. Cheap to clone (pools and
/// the change feed each hold one).
#[derive(Clone)]
pub(crate) struct PgTls {
    config: Option<Arc<ClientConfig>>,
}

impl PgTls {
    fn new(mode: Mode, root: Option<PathBuf>) -> Result<Self, PgTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, root) {
            (Mode::Disable, _) => return Ok(Self { config: None }),
            (Mode::Prefer | Mode::Require, None) => Arc::new(NoVerification(provider.clone())),
            (Mode::VerifyCa, None) => return Err(PgTlsError::NoRootCert("verify-ca")),
            (Mode::VerifyFull, None) => return Err(PgTlsError::NoRootCert("verify-full")),
            (mode, Some(path)) => {
                let roots = Arc::new(read_roots(path)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| PgTlsError::ConnectionString(e.to_string()))?;
                if mode == Mode::VerifyFull { webpki } else { Arc::new(ChainOnly(webpki)) }
            }
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PgTlsError::ConnectionString(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Self { config: Some(Arc::new(config)) })
    }
}

fn read_roots(path: PathBuf) -> Result<RootCertStore, PgTlsError> {
    let bad = |detail: String| PgTlsError::RootCert { path: path.clone(), detail };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&path).map_err(|e| bad(e.to_string()))? {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(roots)
}

/// `sslmode=prefer` or `require` without `sslrootcert`: encrypted, the
/// server unauthenticated (libpq's behaviour). The handshake's signatures
/// are still checked, so the session is the certificate holder's.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`, or `require` with `sslrootcert`: the chain must lead to the
/// given CA, whatever host name the certificate names.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is checked after the chain: a name error means the chain
        // was good.
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
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
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<PgTlsConnect, io::Error> {
        // A host that is no DNS name or address (a Unix socket's directory)
        // is an error only if TLS is then attempted on it.
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("`{host}` cannot be checked against a certificate: {e}"));
        Ok(PgTlsConnect { config: self.config.clone(), name })
    }
}

/// One connection's TLS handshake.
pub(crate) struct PgTlsConnect {
    config: Option<Arc<ClientConfig>>,
    name: Result<ServerName<'static>, String>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            // tokio-postgres asks for TLS only in prefer/require, which a
            // plaintext mode never sets.
            let config = self.config.ok_or_else(|| io::Error::other("TLS is off for this origin"))?;
            let name = self.name.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            tokio_rustls::TlsConnector::from(config).connect(name, stream).await.map(PgTlsStream)
        })
    }
}

/// An encrypted connection to PostgreSQL.
pub(crate) struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    /// No SCRAM channel binding (`tls-server-end-point` needs the hash of
    /// the certificate's signature algorithm); SCRAM still authenticates,
    /// and the certificate check is what binds the session to the server.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The TLS failure behind a connection error, if TLS is what failed (a
/// certificate refused, or a server that does not speak TLS): rustls's
/// reason when there is one.
pub(crate) fn tls_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let chain = || std::iter::successors(Some(err), |e| e.source());
    let rustls_error = chain().find_map(|e| {
        e.downcast_ref::<rustls::Error>()
            .or_else(|| e.downcast_ref::<io::Error>()?.get_ref()?.downcast_ref::<rustls::Error>())
    });
    if let Some(tls) = rustls_error {
        return Some(tls.to_string());
    }
    chain().find_map(|e| {
        let pg = e.downcast_ref::<tokio_postgres::Error>()?;
        let text = pg.to_string();
        text.starts_with("error performing TLS handshake")
            .then(|| std::error::Error::source(pg).map_or(text.clone(), |cause| format!("{text}: {cause}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_are_taken_out_of_both_forms() {
        let (rest, mode, root) =
            split_tls_options("host=db port=5432 sslmode = verify-full sslrootcert='/etc/my ca.pem' user=a\\'b")
                .expect("parses");
        assert_eq!((mode, root), (Mode::VerifyFull, Some(PathBuf::from("/etc/my ca.pem"))));
        assert_eq!(rest, "host='db' port='5432' user='a\\'b'");
        let config = tokio_postgres::Config::from_str(&rest).expect("tokio-postgres accepts the rest");
        assert_eq!(config.get_user(), Some("a'b"));

        let (rest, mode, root) =
            split_tls_options("postgres://u@db/app?sslmode=require&application_name=x&sslrootcert=%2Ftmp%2Fca.pem")
                .expect("parses");
        assert_eq!((mode, root), (Mode::Require, Some(PathBuf::from("/tmp/ca.pem"))));
        assert_eq!(rest, "postgres://u@db/app?application_name=x");

        let (_, mode, _) = split_tls_options("host=db").expect("parses");
        assert_eq!(mode, Mode::Disable);
        parse("host=127.0.0.1 port=5432 user=postgres dbname=postgres dbname=x sslmode=require").expect("usable");
    }

    #[test]
    fn unusable_tls_settings_are_named() {
        assert!(matches!(parse("host=db sslmode=verify-full"), Err(PgTlsError::NoRootCert("verify-full"))));
        assert!(matches!(parse("host=db sslmode=strict"), Err(PgTlsError::UnknownMode(_))));
        assert!(matches!(
            parse("host=db sslmode=require sslrootcert=/nonexistent/ca.pem"),
            Err(PgTlsError::RootCert { .. })
        ));
        assert!(matches!(parse("host=db sslmode='require"), Err(PgTlsError::ConnectionString(_))));
    }
}
