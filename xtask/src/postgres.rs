//! A throw-away PostgreSQL for the loader tests and the loader demo: a
//! fresh cluster (initdb) in the target directory, on a free loopback port,
//! with `pg_stat_statements` loaded so tests can count origin queries in
//! PostgreSQL's own statistics. Stopped when dropped.
//!
//! It also listens with TLS (`ssl = on`), on a certificate for `localhost`
//! and `127.0.0.1` signed by a throw-away CA whose PEM is `root.crt` beside
//! the data directory (passed to tests as `CACHET_PG_CA`), so the loader
//! tests can connect both in plaintext and with `sslmode=verify-full`.
//!
//! `CACHET_PG` set to a connection string skips all this and uses that
//! server instead (and `CACHET_PG_CA`, if set, as its CA).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running server.
pub(crate) struct Postgres {
    /// `host=127.0.0.1 port=... user=postgres dbname=postgres`.
    pub(crate) url: String,
    /// The PEM of the CA that signed the server's certificate.
    pub(crate) ca: Option<PathBuf>,
    stop: Option<(PathBuf, PathBuf)>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some((bin, data)) = self.stop.take() {
            let _ = as_postgres(&bin.join("pg_ctl"), &["-D", &data.to_string_lossy(), "-m", "immediate", "-w", "stop"])
                .output();
            if let Some(dir) = data.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// The newest `/usr/lib/postgresql/N/bin` (Debian's layout).
fn bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")?
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context("no /usr/lib/postgresql/*/bin/initdb")
}

/// initdb and the server refuse to run as root: drop to `postgres` then.
fn as_postgres(program: &Path, args: &[&str]) -> Command {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
    if root {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program).args(args);
        cmd
    } else {
        let mut cmd = Command::new(program);
        cmd.args(args);
        cmd
    }
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Starts a fresh server under `dir` (wiped first, removed when stopped),
/// or uses `CACHET_PG`. When running as root, `dir` must be reachable by
/// the `postgres` user (a directory in /tmp is).
pub(crate) fn start(dir: &Path) -> Result<Postgres> {
    if let Ok(url) = std::env::var("CACHET_PG") {
        eprintln!("xtask: using PostgreSQL at CACHET_PG ({url})");
        let ca = std::env::var_os("CACHET_PG_CA").map(PathBuf::from);
        return Ok(Postgres { url, ca, stop: None });
    }
    let bin = bin_dir()?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let data = dir.join("data");
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
    if root {
        let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir).status()?;
        if !status.success() {
            bail!("cannot hand {} to the postgres user", dir.display());
        }
    }
    let data_arg = data.to_string_lossy().to_string();
    let out = as_postgres(&bin.join("initdb"), &["-D", &data_arg, "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        .output()
        .context("cannot run initdb")?;
    if !out.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let ca = write_certificates(dir, &data, root)?;
    let port = free_port()?;
    let options = format!(
        "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={dir} \
         -c shared_preload_libraries=pg_stat_statements -c max_connections=200 -c fsync=off -c ssl=on",
        dir = dir.display()
    );
    let log = dir.join("server.log").to_string_lossy().to_string();
    let out =
        as_postgres(&bin.join("pg_ctl"), &["-D", &data_arg, "-l", &log, "-o", &options, "-w", "-t", "60", "start"])
            .output()
            .context("cannot run pg_ctl")?;
    if !out.status.success() {
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        bail!("PostgreSQL did not start: {}\n{log}", String::from_utf8_lossy(&out.stderr));
    }
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    eprintln!("xtask: PostgreSQL started ({url})");
    Ok(Postgres { url, ca: Some(ca), stop: Some((bin, data)) })
}

/// A CA (`dir/root.crt`) and the server's certificate and key signed by it
/// (`data/server.crt`, `data/server.key`, the names `ssl = on` looks for;
/// the key 0600 and, under root, owned by `postgres`, or the server refuses
/// it). Returns the CA's path.
fn write_certificates(dir: &Path, data: &Path, root: bool) -> Result<PathBuf> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "cachet test PostgreSQL CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let mut server_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    server_params.distinguished_name.push(DnType::CommonName, "localhost");
    let server_key = KeyPair::generate()?;
    let server_cert = server_params.signed_by(&server_key, &Issuer::new(ca_params, ca_key))?;
    let ca_path = dir.join("root.crt");
    std::fs::write(&ca_path, ca_cert.pem())?;
    std::fs::write(data.join("server.crt"), server_cert.pem())?;
    let key_path = data.join("server.key");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .and_then(|mut file| file.write_all(server_key.serialize_pem().as_bytes()))
        .with_context(|| format!("cannot write {}", key_path.display()))?;
    if root {
        let status =
            Command::new("chown").arg("postgres:postgres").arg(data.join("server.crt")).arg(&key_path).status()?;
        if !status.success() {
            bail!("cannot hand the server's certificate to the postgres user");
        }
    }
    Ok(ca_path)
}
