//! `cargo xtask redis-py`: redis-py's own test suite against a Cachet
//! node, as a Redis user's everyday client sees it.
//!
//! The tests come from redis-py 6.4.0's source distribution on PyPI (the
//! wheel has none), checksummed and unpacked in `target/redis-py/`:
//! `tests/test_commands.py`, `test_pipeline.py` and `test_connection.py`,
//! unmodified, run with pytest against a node's RESP port (on 6379 when it
//! is free: a few tests connect there whatever `--redis-url` says). The
//! results are compared with `tests/redis-py/expected-failures.txt`, the
//! committed list of the tests that fail on Cachet and why; a test that
//! fails and is not listed, or is listed and passes, fails the run. With
//! `--redis-server`, the same tests also run against the machine's
//! redis-server, for the figures in docs/benchmarks.md.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The redis-py release whose tests run.
const VERSION: &str = "6.4.0";
const SDIST: &str = "redis-6.4.0.tar.gz";
const SDIST_SHA256: &str = "b01bc7282b8444e28ec36b261df5375183bb47a07eb9c603f284e89cbc5ef010";
/// The suite's files.
const FILES: [&str; 3] = ["tests/test_commands.py", "tests/test_pipeline.py", "tests/test_connection.py"];

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(path).output().context("sha256sum")?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string())
}

/// The unpacked sdist, fetched from PyPI the first time.
fn suite(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join(format!("redis-{VERSION}"));
    let sdist = cache.join(SDIST);
    if !sdist.exists() || sha256(&sdist)? != SDIST_SHA256 {
        std::fs::create_dir_all(cache)?;
        eprintln!("xtask: fetching redis-py {VERSION}'s source distribution from PyPI");
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--no-binary", ":all:"])
            .arg(format!("redis=={VERSION}"))
            .arg("-d")
            .arg(cache)
            .status()
            .context("python3 -m pip download")?;
        if !status.success() {
            bail!("pip download redis=={VERSION} failed");
        }
        let got = sha256(&sdist)?;
        if got != SDIST_SHA256 {
            bail!("{} has SHA-256 {got}, not the pinned {SDIST_SHA256}", sdist.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    if !dir.join(FILES[0]).exists() {
        let status = Command::new("tar").arg("xzf").arg(&sdist).arg("-C").arg(cache).status()?;
        if !status.success() {
            bail!("cannot unpack {}", sdist.display());
        }
    }
    Ok(dir)
}

/// pytest and the plugins the run uses, installed for the user when
/// missing (PyPI is reachable from these machines).
fn pytest() -> Result<()> {
    let have = Command::new("python3").args(["-c", "import pytest, pytest_timeout, redis"]).status()?;
    if have.success() {
        return Ok(());
    }
    let packages = ["pytest==9.2.0", "pytest-timeout==2.4.0", &format!("redis=={VERSION}")];
    let install = |extra: &[&str]| {
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--user"])
            .args(extra)
            .args(packages)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !install(&[]) && !install(&["--break-system-packages"]) {
        bail!("cannot install pytest (python3 -m pip install --user pytest pytest-timeout)");
    }
    Ok(())
}

/// A port for a server: 6379 when it is free.
fn free_port() -> Result<u16> {
    if std::net::TcpListener::bind("127.0.0.1:6379").is_ok() {
        return Ok(6379);
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A server under test, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_ready(port: u16) -> Result<()> {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("nothing answers on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Runs the suite against the server on `port`; the JUnit report's path.
fn run_suite(dir: &Path, port: u16, report: &Path) -> Result<()> {
    let started = Instant::now();
    let status = Command::new("python3")
        .current_dir(dir)
        .args(["-m", "pytest"])
        .args(FILES)
        .arg(format!("--redis-url=redis://127.0.0.1:{port}/0"))
        .args(["-q", "-p", "no:cacheprovider", "--timeout", "30", "--tb=line", "--junitxml"])
        .arg(report)
        .stdout(Stdio::null())
        .status()
        .context("python3 -m pytest")?;
    // pytest exits 1 when tests fail: the comparison below judges.
    if !matches!(status.code(), Some(0 | 1)) {
        bail!("pytest did not run the suite ({status})");
    }
    eprintln!("xtask: the suite ran in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Runs the suite against the node built at `cachet` (and, with
/// `redis_server`, against the machine's redis-server), and checks the
/// results against the committed list.
pub(crate) fn run(cachet: &Path, cache: &Path, expected: &Path, check: &Path, redis_server: bool) -> Result<()> {
    pytest()?;
    let dir = suite(cache)?;
    let data = cache.join("node");
    let _ = std::fs::remove_dir_all(&data);
    let port = free_port()?;
    let quic = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    // Values up to 8 MiB: one test stores 5 MB in a key (Redis takes up to
    // 512 MB; Cachet's limit is a flag).
    let node = Command::new(cachet)
        .args(["serve", "--listen", &format!("127.0.0.1:{quic}"), "--resp-listen", &format!("127.0.0.1:{port}")])
        .args(["--max-value-size", "8MiB", "--max-memory", "512MiB", "--data-dir"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(cache.join("node.log"))?)
        .spawn()
        .context("cachet serve")?;
    let node = Server(node);
    wait_ready(port).with_context(|| format!("the node did not start: see {}", cache.join("node.log").display()))?;
    let report = cache.join("cachet.xml");
    eprintln!("xtask: redis-py {VERSION}'s tests against Cachet on 127.0.0.1:{port}");
    run_suite(&dir, port, &report)?;
    drop(node);
    let compared = Command::new("python3").arg(check).arg(&report).arg(expected).status()?;
    if redis_server {
        let port = free_port()?;
        // Its files (the suite runs SAVE) go to the cache, not the
        // working directory.
        let server = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--dir"])
            .arg(cache)
            .stdout(Stdio::null())
            .spawn()
            .context("redis-server (apt-get install redis-server)")?;
        let server = Server(server);
        wait_ready(port)?;
        let report = cache.join("redis-server.xml");
        eprintln!("xtask: the same tests against redis-server on 127.0.0.1:{port}");
        run_suite(&dir, port, &report)?;
        drop(server);
        Command::new("python3").arg(check).arg(&report).arg("--summary").status()?;
    }
    if !compared.success() {
        bail!("redis-py's suite differs from {} (see above)", expected.display());
    }
    Ok(())
}
