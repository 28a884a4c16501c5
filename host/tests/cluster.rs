//! Real multi-process clusters: `cachet serve --cluster` processes on
//! 127.0.0.1, .2 and .3, driven through the cluster SDK, with members
//! killed by SIGKILL. Every load loop is bounded in operations and time.

use cachet_client::{ClientConfig, ClientError, ClusterClient, Consistency, ErrorCode, RetryPolicy};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One `cachet serve` member.
struct Member {
    child: Option<Child>,
    args: Vec<String>,
    client_addr: String,
    log: PathBuf,
}

impl Member {
    /// Starts the process; its log goes to `log` (kept when a test fails).
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_cachet"))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cachet serve starts");
        self.child = Some(child);
    }

    /// SIGKILL: no goodbye, memory gone.
    /// Sends `signal` (`STOP`, `CONT`) to the process.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args([&format!("-{signal}"), &pid]).status().expect("kill(1)");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Waits (at most `limit`) for the process to exit by itself.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(start.elapsed() < limit, "the member did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            let _ = child.wait();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

struct TestCluster {
    members: Vec<Member>,
    ca: PathBuf,
    root: PathBuf,
    port: u16,
    rf: usize,
    /// The clients' certificate and key, for members that require one
    /// (started on certificates from `cachet cert issue`).
    identity: Option<(PathBuf, PathBuf)>,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
        if std::thread::panicking() {
            eprintln!("member logs kept in {}", self.root.display());
        } else {
            if std::env::var_os("CACHET_KEEP_LOGS").is_none() {
                let _ = std::fs::remove_dir_all(&self.root);
            }
        }
    }
}

/// A port free on 127.0.0.1 to .`n`, for both the client and the peer
/// socket (port and port + 1).
fn free_port(n: usize) -> u16 {
    for _ in 0..200 {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("probe");
        let port = probe.local_addr().expect("addr").port();
        drop(probe);
        if port >= u16::MAX - 1 {
            continue;
        }
        let free = (1..=n)
            .all(|i| [port, port + 1].iter().all(|p| std::net::UdpSocket::bind(format!("127.0.0.{i}:{p}")).is_ok()));
        if free {
            return port;
        }
    }
    panic!("no free port pair on 127.0.0.1-{n}");
}

impl TestCluster {
    fn start(n: usize, rf: usize, tag: &str) -> Self {
        Self::start_with(n, rf, tag, &[])
    }

    fn start_with(n: usize, rf: usize, tag: &str, extra: &[&str]) -> Self {
        Self::start_members(n, rf, tag, extra, None)
    }

    /// Members on production-style certificates: a CA and certificates
    /// made with `cachet cert issue`, started with `--tls-cert/--tls-key/
    /// --tls-ca` (no development CA). Member `i` runs as `--node-id i` on
    /// the certificate of node `certified[i]`.
    fn start_on_certificates(rf: usize, tag: &str, certified: &[usize]) -> Self {
        Self::start_members(certified.len(), rf, tag, &[], Some(certified))
    }

    fn start_members(n: usize, rf: usize, tag: &str, extra: &[&str], certified: Option<&[usize]>) -> Self {
        let root = std::env::temp_dir().join(format!("cachet-cluster-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("temp dir");
        let ca = root.join("ca");
        let certs = root.join("certs");
        let issue = |subject: &[&str]| {
            let dirs = ["--ca", ca.to_str().expect("utf-8"), "--out", certs.to_str().expect("utf-8")];
            let out = Command::new(env!("CARGO_BIN_EXE_cachet"))
                .args([&["cert", "issue"][..], subject, &dirs].concat())
                .output()
                .expect("cachet cert issue runs");
            assert!(out.status.success(), "cert issue {subject:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        // Each member's TLS flags: the shared development CA, or its
        // certificate, its key and the CA.
        let tls: Vec<Vec<String>> = match certified {
            None => (0..n).map(|_| vec!["--dev-ca".into(), ca.to_str().expect("utf-8").into()]).collect(),
            Some(certified) => certified
                .iter()
                .map(|&id| {
                    let (cert, key) = (certs.join(format!("node-{id}.pem")), certs.join(format!("node-{id}-key.pem")));
                    if !cert.exists() {
                        issue(&["--node-id", &id.to_string()]);
                    }
                    [("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca.join("ca.pem"))]
                        .into_iter()
                        .flat_map(|(flag, path)| [flag.to_string(), path.to_str().expect("utf-8").to_string()])
                        .collect()
                })
                .collect(),
        };
        let identity = certified.map(|_| {
            issue(&["--client", "tests"]);
            (certs.join("client-tests.pem"), certs.join("client-tests-key.pem"))
        });
        // One spare address, for a member that joins later.
        let port = free_port(n + 1);
        let peers: Vec<String> = (1..=n).map(|i| format!("127.0.0.{i}:{}", port + 1)).collect();
        let members = (0..n)
            .map(|i| {
                let client_addr = format!("127.0.0.{}:{port}", i + 1);
                let args: Vec<String> = [
                    "serve",
                    "--listen",
                    &client_addr,
                    "--data-dir",
                    root.join(format!("node{i}")).to_str().expect("utf-8"),
                    "--cluster",
                    &peers.join(","),
                    "--node-id",
                    &i.to_string(),
                    "--replication-factor",
                    &rf.to_string(),
                    "--shards",
                    "1",
                    "--threads",
                    "1",
                ]
                .iter()
                .copied()
                .chain(tls[i].iter().map(String::as_str))
                .chain(extra.iter().copied())
                // `{ip}` in an extra flag is the member's own address.
                .map(|s| s.replace("{ip}", &format!("127.0.0.{}", i + 1)))
                .collect();
                let log = root.join(format!("node{i}.log"));
                let mut member = Member { child: None, args, client_addr, log };
                member.spawn();
                member
            })
            .collect();
        Self { members, ca, root, port, rf, identity }
    }

    /// Starts one more member that joins the running ones through their
    /// peer addresses (`--seeds`).
    fn join(&mut self) {
        self.join_as(self.members.len());
    }

    /// Starts a process on the next spare address that joins as member
    /// `node_id`: a new member, or the replacement of a dead one.
    fn join_as(&mut self, node_id: usize) {
        let i = self.members.len();
        let client_addr = format!("127.0.0.{}:{}", i + 1, self.port);
        let seeds: Vec<String> = (1..=i).map(|k| format!("127.0.0.{k}:{}", self.port + 1)).collect();
        let args: Vec<String> = [
            "serve",
            "--listen",
            &client_addr,
            "--data-dir",
            self.root.join(format!("node{i}")).to_str().expect("utf-8"),
            "--dev-ca",
            self.ca.to_str().expect("utf-8"),
            "--seeds",
            &seeds.join(","),
            "--peer-listen",
            &format!("127.0.0.{}:{}", i + 1, self.port + 1),
            "--node-id",
            &node_id.to_string(),
            "--replication-factor",
            &self.rf.to_string(),
            "--shards",
            "1",
            "--threads",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = self.root.join(format!("node{i}.log"));
        let mut member = Member { child: None, args, client_addr, log };
        member.spawn();
        self.members.push(member);
    }

    fn client_config(&self, i: usize) -> ClientConfig {
        let mut config = ClientConfig::new(self.members[i].client_addr.parse().expect("addr"));
        config.timeout = Duration::from_millis(1_500);
        config.ca_file = Some(self.ca.join("ca.pem"));
        config.identity = self.identity.clone();
        config
    }

    /// A cluster client of `members` only.
    fn client_of(&self, members: &[usize]) -> ClusterClient {
        let configs = members.iter().map(|&i| self.client_config(i)).collect();
        ClusterClient::new(configs, RetryPolicy::default()).expect("cluster client")
    }

    /// Reads `k0` to `k{keys - 1}` at ONE through member `i` alone (its own
    /// copy answers first for the keys it owns) and checks each holds
    /// `{prefix}{k}`: a stale or missing copy shows here.
    async fn assert_holds(&self, i: usize, keys: usize, prefix: &str) {
        let alone = self.client_of(&[i]);
        for k in 0..keys {
            let read = alone.at(Consistency::One).get(format!("k{k}")).await.expect("ONE read");
            assert_eq!(read.as_deref(), Some(format!("{prefix}{k}").as_bytes()), "member {i}'s copy of k{k}");
        }
        alone.close().await;
    }

    fn client(&self) -> ClusterClient {
        self.client_of(&(0..self.members.len()).collect::<Vec<_>>())
    }

    /// Waits (bounded) until every running member sees every member up
    /// and is re-synced.
    async fn wait_healthy(&self, client: &ClusterClient, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let mut healthy = true;
            let mut views = Vec::new();
            let mut epochs = std::collections::BTreeSet::new();
            for i in 0..self.members.len() {
                match client.stats_of(i).await {
                    Ok(stats) => {
                        let cluster = stats.cluster.expect("a clustered node reports its cluster");
                        // Every member owns slots on the log's table.
                        let owners: std::collections::BTreeSet<u32> =
                            cluster.slots.iter().flat_map(|r| r.owners.iter().copied()).collect();
                        healthy &= cluster.synced
                            && cluster.alive.iter().all(|&up| up)
                            && cluster.alive.len() == self.members.len()
                            && owners.len() == self.members.len()
                            && cluster.ring_epoch > 0;
                        epochs.insert(cluster.ring_epoch);
                        views.push(format!("{cluster:?}"));
                    }
                    Err(err) => {
                        healthy = false;
                        views.push(format!("member {i}: {err}"));
                    }
                }
            }
            if healthy && epochs.len() == 1 {
                return start.elapsed();
            }
            assert!(start.elapsed() < limit, "the cluster was not healthy within {limit:?}: {views:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Waits (at most 10 s) until the client's member `observer` no longer
/// shows member `dead` as serving; returns how long that took.
async fn wait_down(client: &ClusterClient, observer: usize, dead: usize) -> Duration {
    let start = Instant::now();
    loop {
        let stats = client.stats_of(observer).await.expect("the observer answers");
        if !stats.cluster.expect("cluster").alive[dead] {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "member {dead} was never declared down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a writer knows of its keys: the last acknowledged value, and a
/// value whose write failed after it (it may or may not have been applied).
#[derive(Clone, Debug, Default)]
struct KeyState {
    acked: Option<String>,
    maybe: Option<String>,
}

impl KeyState {
    fn allows(&self, read: Option<&str>) -> bool {
        read == self.acked.as_deref() || (read.is_some() && read == self.maybe.as_deref())
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// One writer: write a key at QUORUM, read it back at QUORUM, on its own
/// keys, until `stop` or `max_ops`.
async fn writer(
    client: ClusterClient,
    id: usize,
    keys: usize,
    max_ops: u64,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> HashMap<String, KeyState> {
    let client = client.at(Consistency::Quorum);
    let mut state: HashMap<String, KeyState> = HashMap::new();
    for seq in 0..max_ops {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let key = format!("w{id}:k{}", seq as usize % keys);
        let value = format!("w{id}:v{seq}");
        let entry = state.entry(key.clone()).or_default();
        match client.set(&key, value.clone()).await {
            Ok(()) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                entry.acked = Some(value);
                entry.maybe = None;
            }
            Err(err) => {
                tally.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("write of {key} failed: {err}");
                entry.maybe = Some(value);
                continue;
            }
        }
        match client.get(&key).await {
            Ok(read) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                let read = read.map(|v| String::from_utf8_lossy(&v).into_owned());
                assert!(entry.allows(read.as_deref()), "QUORUM read of {key} gave {read:?}, expected {entry:?}");
            }
            Err(err) => {
                tally.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("read of {key} failed: {err}");
            }
        }
    }
    state
}

/// Stops the writers and checks the operations' success rate (the issue's
/// 99.9%, with the SDK's retries); returns what they know of their keys.
async fn finish(
    stop: Arc<AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<HashMap<String, KeyState>>>,
    tally: &Tally,
) -> HashMap<String, KeyState> {
    stop.store(true, Ordering::Relaxed);
    let mut state = HashMap::new();
    for w in writers {
        state.extend(w.await.expect("writer"));
    }
    let (ok, failed) = (tally.ok.load(Ordering::Relaxed), tally.failed.load(Ordering::Relaxed));
    let rate = ok as f64 / (ok + failed) as f64;
    eprintln!("{ok} operations succeeded, {failed} failed ({:.4}%)", rate * 100.0);
    assert!(ok >= 200, "too little load to judge: {ok} operations");
    assert!(rate >= 0.999, "only {:.4}% of operations succeeded", rate * 100.0);
    state
}

/// The issue's failover test: 3 members, RF=3, QUORUM writes and reads
/// under load, one member killed with SIGKILL and restarted empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_killed_under_quorum_load_loses_no_acknowledged_write() {
    let mut cluster = TestCluster::start(3, 3, "kill");
    let client = cluster.client();
    let formed = cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    eprintln!("cluster formed in {formed:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let writers: Vec<_> =
        (0..8).map(|id| tokio::spawn(writer(client.clone(), id, 40, 4_000, stop.clone(), tally.clone()))).collect();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_kill = tally.ok.load(Ordering::Relaxed);
    assert!(before_kill > 0, "no operation succeeded before the kill");
    cluster.members[2].kill();
    // Failover: a survivor declares the dead member down.
    let failover = wait_down(&client, 0, 2).await;
    eprintln!("member 2 declared down {failover:?} after SIGKILL");
    assert!(failover <= Duration::from_millis(2_500), "failover took {failover:?}");

    tokio::time::sleep(Duration::from_secs(2)).await;
    let during_outage = tally.ok.load(Ordering::Relaxed);
    assert!(during_outage > before_kill, "nothing succeeded while member 2 was down");

    // Back, empty: it must re-sync before it counts, and then serve.
    cluster.members[2].spawn();
    let resynced = cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    eprintln!("member 2 back and re-synced {resynced:?} after restart");
    assert!(resynced < Duration::from_secs(10), "re-sync took {resynced:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let state = finish(stop, writers, &tally).await;

    // Zero acknowledged writes lost: every key reads back its latest
    // acknowledged value (or the newer one whose write failed) at QUORUM.
    let quorum = client.at(Consistency::Quorum);
    let mut acked = 0;
    for (key, expected) in &state {
        if expected.acked.is_none() {
            continue;
        }
        acked += 1;
        let read = quorum.get(key).await.expect("QUORUM read after the run");
        let read = read.map(|v| String::from_utf8_lossy(&v).into_owned());
        assert!(expected.allows(read.as_deref()), "{key}: read {read:?}, acknowledged {expected:?}");
    }
    assert_eq!(acked, 8 * 40, "every key was written at least once");

    // The restarted member serves again, alone (ONE) from its own copy.
    let alone = cluster.client_of(&[2]);
    let alone = alone.at(Consistency::One);
    let mut found = 0;
    for (key, expected) in &state {
        let read = alone.get(key).await.expect("member 2 answers at ONE");
        let read = read.map(|v| String::from_utf8_lossy(&v).into_owned());
        found += usize::from(expected.acked.is_some() && expected.allows(read.as_deref()));
    }
    eprintln!("member 2 holds the latest value of {found} of {} keys", state.len());
    assert_eq!(found, state.len(), "member 2 did not get every key back");
    let stats = client.stats_of(2).await.expect("stats");
    let view = stats.cluster.expect("cluster");
    assert!(view.synced && view.resync_waiting.is_empty(), "{view:?}");
    alone.close().await;
    client.close().await;
}

/// The issue's join test: a 4th member joins 3 (RF=3) under a QUORUM load;
/// it takes its share of the ring, re-syncs what it owns, and nothing
/// acknowledged is lost or fails beyond retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_under_load_and_takes_its_share() {
    let mut cluster = TestCluster::start(3, 3, "join");
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let before = client.stats_of(0).await.expect("stats").cluster.expect("cluster");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let writers: Vec<_> =
        (0..8).map(|id| tokio::spawn(writer(client.clone(), id, 40, 4_000, stop.clone(), tally.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.join();
    let joined = Instant::now();
    let everyone = cluster.client_of(&[0, 1, 2, 3]);
    let took = cluster.wait_healthy(&everyone, Duration::from_secs(30)).await;
    eprintln!("member 3 joined and re-synced {:?} after starting", joined.elapsed().max(took));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let state = finish(stop, writers, &tally).await;

    // Every member routes by the same table, newer than the founding one.
    let mut views = Vec::new();
    for i in 0..4 {
        let view = everyone.stats_of(i).await.expect("stats").cluster.expect("cluster");
        assert!(view.ring_epoch > before.ring_epoch, "member {i}: {view:?}");
        views.push(view);
    }
    assert!(views.windows(2).all(|w| w[0].members == w[1].members), "members disagree: {views:?}");
    assert!(views.windows(2).all(|w| w[0].slots == w[1].slots), "tables disagree: {views:?}");
    let (old, new) = (ring_from(&before), ring_from(&views[0]));
    // The log's plan gives member 3 its share of the copies (3 of 4
    // members hold each key) and moves nothing else: a key's new owners
    // are its old ones, one of them perhaps replaced by member 3.
    let owners = |r: &cachet_proto::Ring, key: &str| -> Vec<String> {
        r.owners(key.as_bytes(), 3).iter().map(|m| m.id.clone()).collect()
    };
    let mut gained = 0;
    for key in state.keys() {
        let (was, is) = (owners(&old, key), owners(&new, key));
        assert!(is.iter().all(|o| o == "3" || was.contains(o)), "{key}: owners {was:?} became {is:?}");
        gained += usize::from(is.iter().any(|o| o == "3"));
    }
    let share = gained as f64 / state.len() as f64;
    eprintln!("member 3 owns {gained} of {} keys ({:.1}%)", state.len(), share * 100.0);
    assert!((0.6..=0.9).contains(&share), "member 3 owns {share} of the keys; 0.75 expected");

    // Nothing acknowledged was lost, read through the new ring.
    let quorum = everyone.at(Consistency::Quorum);
    for (key, expected) in &state {
        let read = quorum.get(key).await.expect("QUORUM read after the join");
        let read = read.map(|v| String::from_utf8_lossy(&v).into_owned());
        assert!(expected.allows(read.as_deref()), "{key}: read {read:?}, acknowledged {expected:?}");
    }
    // The new member holds the latest value of every key it owns.
    let alone = cluster.client_of(&[3]);
    let alone = alone.at(Consistency::One);
    let mut owned = 0;
    for (key, expected) in &state {
        if !new.owners(key.as_bytes(), 3).iter().any(|m| m.id == "3") {
            continue;
        }
        owned += 1;
        let read = alone.get(key).await.expect("member 3 answers at ONE");
        let read = read.map(|v| String::from_utf8_lossy(&v).into_owned());
        assert!(expected.allows(read.as_deref()), "member 3 on {key}: {read:?}, acknowledged {expected:?}");
    }
    eprintln!("member 3 owns {owned} of the {} keys and holds each one's latest value", state.len());
    alone.close().await;
    everyone.close().await;
    client.close().await;
}

/// A dead member replaced by a new process (a new address, the same node
/// id): the ring keeps its placement, the others take the new address, and
/// the replacement re-syncs every key back before it counts, restoring the
/// replication factor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_is_replaced_and_the_copies_are_restored() {
    let mut cluster = TestCluster::start(3, 3, "replace");
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let quorum = client.at(Consistency::Quorum);
    for i in 0..200 {
        quorum.set(format!("k{i}"), format!("before{i}")).await.expect("write");
    }
    cluster.members[2].kill();
    wait_down(&client, 0, 2).await;
    for i in 100..300 {
        quorum.set(format!("k{i}"), format!("after{i}")).await.expect("write with a member down");
    }
    cluster.join_as(2);
    let peer = format!("127.0.0.4:{}", cluster.port + 1);
    let survivors = cluster.client_of(&[0, 1, 3]);
    let start = Instant::now();
    loop {
        let mut views = Vec::new();
        for i in 0..3 {
            views.push(survivors.stats_of(i).await.ok().and_then(|s| s.cluster));
        }
        let replaced = views.iter().all(|v| {
            v.as_ref().is_some_and(|v| v.synced && v.alive.iter().all(|&up| up) && v.members.get(2) == Some(&peer))
        });
        if replaced {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "not replaced within 30 s: {views:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("member 2 replaced and re-synced {:?} after the replacement started", start.elapsed());
    let alone = cluster.client_of(&[3]);
    for i in 0..300 {
        let expected = if i < 100 { format!("before{i}") } else { format!("after{i}") };
        let read = alone.at(Consistency::One).get(format!("k{i}")).await.expect("the replacement answers");
        assert_eq!(read.as_deref(), Some(expected.as_bytes()), "the replacement's copy of k{i}");
        let read = survivors.at(Consistency::Quorum).get(format!("k{i}")).await.expect("QUORUM read");
        assert_eq!(read.as_deref(), Some(expected.as_bytes()));
    }
    alone.close().await;
    survivors.close().await;
    client.close().await;
}

/// A member down for `--replace-after-ms` has its slots moved by the
/// log's leader: they pass to the survivors, which re-replicate them from
/// each other, so at RF=2 every key is held twice again and served at
/// QUORUM while it stays down (on a table that kept it, a QUORUM of two
/// owners with one dead fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_members_ranges_are_re_replicated_to_the_survivors() {
    let mut cluster = TestCluster::start_with(3, 2, "rereplicate", &["--replace-after-ms", "1000"]);
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let quorum = client.at(Consistency::Quorum);
    for i in 0..300 {
        quorum.set(format!("k{i}"), format!("v{i}")).await.expect("write");
    }
    // The stats count records at most every 100 ms.
    let start = Instant::now();
    loop {
        let mut held = 0;
        for i in 0..3 {
            held += client.stats_of(i).await.expect("stats").cluster.expect("cluster").records;
        }
        if held == 600 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{held} records; two copies of each key expected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.members[2].kill();
    let killed = Instant::now();
    let survivors = cluster.client_of(&[0, 1]);
    let restored = loop {
        let mut views = Vec::new();
        for i in 0..2 {
            views.push(survivors.stats_of(i).await.ok().and_then(|s| s.cluster));
        }
        let moved = |v: &cachet_proto::ClusterStats| v.slots.iter().all(|r| !r.owners.contains(&2));
        let done =
            views.iter().all(|v| v.as_ref().is_some_and(|v| !v.alive[2] && v.synced && v.records >= 300 && moved(v)));
        if done {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(15), "copies not restored within 15 s: {views:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("member 2 declared down and its ranges re-replicated {restored:?} after SIGKILL");
    for i in 0..2 {
        cluster.assert_holds(i, 300, "v").await;
    }
    let quorum = survivors.at(Consistency::Quorum);
    for k in 0..300 {
        quorum.set(format!("k{k}"), format!("w{k}")).await.expect("QUORUM write with member 2 gone");
        let read = quorum.get(format!("k{k}")).await.expect("QUORUM read with member 2 gone");
        assert_eq!(read.as_deref(), Some(format!("w{k}").as_bytes()));
    }
    survivors.close().await;
    client.close().await;
}

/// A member stopped with SIGTERM leaves the cluster: the others see it
/// down at once (it keeps its slots: a restart moves nothing, and its two
/// co-owners serve QUORUM meanwhile). Their failure detector is set to 30 s here,
/// so seeing it down within `wait_down`'s 10 s is the departure's doing,
/// not detection's. Reads and writes go on through the two left, and the
/// member, restarted, re-syncs the writes it missed before it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stopped_with_sigterm_leaves_at_once() {
    let mut cluster = TestCluster::start_with(3, 3, "leave", &["--detect-ms", "30000"]);
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let quorum = client.at(Consistency::Quorum);
    for i in 0..100 {
        quorum.set(format!("k{i}"), format!("v{i}")).await.expect("write");
    }
    cluster.members[2].signal("TERM");
    let status = cluster.members[2].wait_exit(Duration::from_secs(10));
    assert!(status.success(), "a clean stop: {status:?}");
    let survivors = cluster.client_of(&[0, 1]);
    for observer in [0, 1] {
        let took = wait_down(&survivors, observer, 2).await;
        eprintln!("member {observer} saw member 2 leave {took:?} after it exited");
    }
    let quorum = survivors.at(Consistency::Quorum);
    for i in 0..100 {
        let read = quorum.get(format!("k{i}")).await.expect("QUORUM read after the departure");
        assert_eq!(read.as_deref(), Some(format!("v{i}").as_bytes()));
        quorum.set(format!("k{i}"), format!("w{i}")).await.expect("QUORUM write after the departure");
    }
    // A rolling restart: it comes back, re-syncs what it missed, and serves
    // again (its own copy answers first at ONE for the keys it owns).
    cluster.members[2].spawn();
    let back = cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    eprintln!("member 2 back and re-synced {back:?} after its restart");
    cluster.assert_holds(2, 100, "w").await;
    survivors.close().await;
    client.close().await;
}

/// A member restarted empty pulls its records from the other owners as
/// streams paced by their `--stream-mib-per-sec`: with 2 MB to fetch from
/// each of two sources at 1 MiB/s it cannot be back in under about two
/// seconds (a whole-store snapshot would take milliseconds on loopback),
/// QUORUM requests go on through the two others meanwhile, and once it
/// counts its own copies hold every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_streams_its_records_at_the_stream_rate() {
    let mut cluster = TestCluster::start_with(3, 3, "stream", &["--stream-mib-per-sec", "1"]);
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let quorum = client.at(Consistency::Quorum);
    let value = |i: usize| format!("{i:04}{}", "v".repeat(1_020));
    for chunk in (0..2_000).collect::<Vec<_>>().chunks(50) {
        let writes = chunk.iter().map(|&i| quorum.set(format!("k{i}"), value(i)));
        for result in futures_util::future::join_all(writes).await {
            result.expect("write");
        }
    }
    cluster.members[2].kill();
    cluster.members[2].spawn();
    let restarted = Instant::now();
    let survivors = cluster.client_of(&[0, 1]);
    let mut served = 0;
    loop {
        let view = survivors.stats_of(2).await.ok().and_then(|s| s.cluster);
        if view.as_ref().is_some_and(|v| v.synced) {
            break;
        }
        assert!(restarted.elapsed() < Duration::from_secs(60), "member 2 never re-synced: {view:?}");
        // Requests go on through the others while it streams.
        let key = served % 2_000;
        let read = survivors.at(Consistency::Quorum).get(format!("k{key}")).await.expect("QUORUM read meanwhile");
        assert_eq!(read.as_deref(), Some(value(key).as_bytes()));
        served += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = restarted.elapsed();
    let mut streamed = 0;
    for i in 0..2 {
        streamed += survivors.stats_of(i).await.expect("stats").cluster.map_or(0, |c| c.streamed_bytes);
    }
    eprintln!(
        "member 2 re-synced {took:?} after its restart: {streamed} bytes streamed, {served} QUORUM reads meanwhile"
    );
    assert!(streamed >= 2 * 2_000 * 1_024, "{streamed} bytes streamed");
    assert!(took >= Duration::from_millis(1_500), "re-synced in {took:?}: not paced at 1 MiB/s");
    let alone = cluster.client_of(&[2]);
    for i in 0..2_000 {
        let read = alone.at(Consistency::One).get(format!("k{i}")).await.expect("ONE read");
        assert_eq!(read.as_deref(), Some(value(i).as_bytes()), "member 2's copy of k{i}");
    }
    alone.close().await;
    survivors.close().await;
    client.close().await;
}

/// A member paused (SIGSTOP) long enough to be declared down misses the
/// writes made meanwhile (its two co-owners take them at QUORUM). When it
/// resumes it learns it was declared down and must not answer from its
/// stale copy: it re-syncs everything before it counts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_member_re_syncs_before_it_serves_again() {
    let cluster = TestCluster::start(3, 3, "pause");
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let quorum = client.at(Consistency::Quorum);
    for i in 0..200 {
        quorum.set(format!("k{i}"), format!("a{i}")).await.expect("write");
    }
    cluster.members[2].signal("STOP");
    let survivors = cluster.client_of(&[0, 1]);
    wait_down(&survivors, 0, 2).await;
    for i in 0..200 {
        survivors.at(Consistency::Quorum).set(format!("k{i}"), format!("b{i}")).await.expect("write while paused");
    }
    cluster.members[2].signal("CONT");
    let back = cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    eprintln!("member 2 resumed and re-synced {back:?} after SIGCONT");
    // Its own copy answers first at ONE when it owns the key: stale "a"
    // values would show here.
    cluster.assert_holds(2, 200, "b").await;
    survivors.close().await;
    client.close().await;
}

/// A member restarted empty while another stays dead cannot count until
/// it has heard from every other owner of its slots: a write acknowledged
/// by it and the dead member alone would be missing otherwise. It waits
/// until the log's leader moves the dead member's slots away
/// (`--replace-after-ms`), then re-syncs from the members that are up, and
/// every key is read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_waits_for_a_dead_one_until_its_slots_move() {
    let mut cluster = TestCluster::start_with(3, 3, "restart-alone", &["--replace-after-ms", "3000"]);
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let quorum = client.at(Consistency::Quorum);
    for i in 0..100 {
        quorum.set(format!("k{i}"), format!("v{i}")).await.expect("write");
    }
    let first = cluster.client_of(&[0]);
    for dead in [2, 1] {
        cluster.members[dead].kill();
        wait_down(&first, 0, dead).await;
    }
    // Alone, member 0 cannot make a QUORUM of any slot's owners.
    let no_retry = RetryPolicy { attempts: 1, backoff: Duration::from_millis(10) };
    let lone = ClusterClient::new(vec![cluster.client_config(0)], no_retry).expect("client");
    match lone.at(Consistency::Quorum).get("k1").await {
        Err(ClientError::Server(reply)) => assert_eq!(reply.code, ErrorCode::Unavailable, "{reply:?}"),
        other => panic!("a QUORUM read on a lone member: {other:?}"),
    }
    lone.close().await;
    cluster.members[1].spawn();
    let restarted = Instant::now();
    let pair = cluster.client_of(&[0, 1]);
    loop {
        let view = pair.stats_of(1).await.ok().and_then(|s| s.cluster);
        let moved =
            |v: &cachet_proto::ClusterStats| !v.slots.is_empty() && v.slots.iter().all(|r| !r.owners.contains(&2));
        if let Some(v) = &view
            && !moved(v)
        {
            assert!(!v.synced, "member 1 counted while a co-owner it never heard from is down: {v:?}");
        }
        if view.as_ref().is_some_and(|v| v.synced && v.alive[0] && !v.alive[2] && moved(v)) {
            break;
        }
        assert!(restarted.elapsed() < Duration::from_secs(30), "member 1 never re-synced: {view:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("member 2's slots moved and member 1 re-synced {:?} after restarting", restarted.elapsed());
    let alone = cluster.client_of(&[1]);
    for i in 0..100 {
        let read = alone.at(Consistency::One).get(format!("k{i}")).await.expect("ONE read");
        assert_eq!(read.as_deref(), Some(format!("v{i}").as_bytes()), "member 1's copy of k{i}");
        let read = pair.at(Consistency::Quorum).get(format!("k{i}")).await.expect("QUORUM read");
        assert_eq!(read.as_deref(), Some(format!("v{i}").as_bytes()));
    }
    alone.close().await;
    pair.close().await;
    first.close().await;
    client.close().await;
}

/// Consistency levels against a dead member: ALL fails with a typed
/// `unavailable` (the dead member keeps its slots until the log moves
/// them), QUORUM and ONE succeed; commands the replicated store
/// cannot do yet are refused, never served from one node's local data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_and_refusals_with_a_member_down() {
    let mut cluster = TestCluster::start(3, 3, "levels");
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    client.at(Consistency::All).set("k", "v1").await.expect("ALL with every member up");
    cluster.members[1].kill();
    let no_retry = RetryPolicy { attempts: 1, backoff: Duration::from_millis(10) };
    let direct = ClusterClient::new(vec![cluster.client_config(0)], no_retry).expect("client");
    // An ALL write cannot complete with an owner dead: a typed
    // `unavailable` (at once once it is declared down, at the deadline
    // before), and nothing lost.
    for survivor in [0, 2] {
        wait_down(&client, survivor, 1).await;
    }
    for op in ["write", "read"] {
        let result = match op {
            "write" => direct.at(Consistency::All).set("k", "v2").await.map(|_| ()),
            _ => direct.at(Consistency::All).get("k").await.map(|_| ()),
        };
        match result {
            Err(ClientError::Server(reply)) if reply.code == ErrorCode::Unavailable => {}
            other => panic!("ALL {op} with member 1 down: {other:?}"),
        }
    }
    assert_eq!(direct.at(Consistency::Quorum).get("k").await.expect("QUORUM read").as_deref(), Some(&b"v1"[..]));
    direct.at(Consistency::Quorum).set("k", "v3").await.expect("QUORUM with one member down");
    let read = direct.at(Consistency::One).get("k").await.expect("ONE read");
    assert_eq!(read.as_deref(), Some(&b"v3"[..]));
    assert!(direct.delete("k").await.expect("DEL at QUORUM"), "k existed");
    assert_eq!(direct.get("k").await.expect("read after DEL"), None);

    let single = cachet_client::Client::connect(cluster.client_config(0)).await.expect("client");
    // Read-modify-writes run at the key's primary owner, through any
    // member, with a member down.
    assert_eq!(single.incr("n", 1).await.expect("INCR"), 1);
    assert_eq!(single.incr("n", 41).await.expect("INCRBY"), 42);
    let nx = cachet_client::SetOptions { condition: cachet_client::Condition::IfAbsent, ..Default::default() };
    assert!(single.set_with("t", "v", nx).await.expect("SET NX"), "absent: applied");
    assert!(!single.set_with("t", "w", nx).await.expect("SET NX again"), "present: not applied");
    assert_eq!(single.get("t").await.expect("GET").as_deref(), Some(&b"v"[..]));
    // TTLs replicate: every replica expires the value at the same moment,
    // and an expired value reads as absent at every level.
    let ttl = cachet_client::SetOptions { ttl: Some(Duration::from_millis(1_500)), ..Default::default() };
    single.set_with("short", "lived", ttl).await.expect("SET with a TTL");
    match single.ttl("short").await.expect("TTL") {
        cachet_client::TtlState::Remaining(ms) => assert!((1..=1_500).contains(&ms), "{ms} ms left"),
        other => panic!("TTL of a key set with one: {other:?}"),
    }
    assert_eq!(single.ttl("k").await.expect("TTL"), cachet_client::TtlState::Missing);
    direct.set("forever", "v").await.expect("write");
    assert_eq!(single.ttl("forever").await.expect("TTL"), cachet_client::TtlState::Persistent);
    assert_eq!(direct.at(Consistency::One).get("short").await.expect("read").as_deref(), Some(&b"lived"[..]));
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    for level in [Consistency::One, Consistency::Quorum] {
        assert_eq!(direct.at(level).get("short").await.expect("read"), None, "{level:?} after expiry");
    }
    assert_eq!(single.ttl("short").await.expect("TTL"), cachet_client::TtlState::Missing);
    // A value over the limit is refused before it is replicated.
    // Over --max-value-size; and within it, but not with the record's
    // header, which every replica would refuse.
    for size in [(1 << 20) + 1, (1 << 20) - 5] {
        match single.set("big", vec![b'x'; size]).await {
            Err(ClientError::Server(reply)) => assert_eq!(reply.code, ErrorCode::TooLarge, "{size}: {reply:?}"),
            other => panic!("expected TooLarge for {size} bytes, got {other:?}"),
        }
    }
    assert_eq!(direct.get("big").await.expect("read"), None);
    single.close().await;
    direct.close().await;
    client.close().await;
}

/// A cluster on certificates from `cachet cert issue` (its own CA, no
/// development CA): members find each other and serve reads and writes;
/// the client port wants a client certificate of that CA too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_on_certificates_from_cert_issue() {
    let cluster = TestCluster::start_on_certificates(3, "certs", &[0, 1, 2]);
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    for k in 0..50 {
        client.set(format!("k{k}"), format!("v{k}")).await.expect("write");
    }
    for i in 0..3 {
        cluster.assert_holds(i, 50, "v").await;
        let stats = client.stats_of(i).await.expect("stats").cluster.expect("cluster");
        assert_eq!(stats.peer_identity_refused, 0, "member {i} refused an honest member's frames");
    }
    let mut bare = cluster.client_config(0);
    bare.identity = None;
    let without_certificate = async { cachet_client::Client::connect(bare).await?.get("k0").await }.await;
    assert!(without_certificate.is_err(), "a client without a certificate was served");
    client.close().await;
}

/// Member 2 runs as `--node-id 2` on member 1's certificate, valid and of
/// the cluster's CA: the others drop its frames (counted, and logged naming
/// both ids), refuse it when they dial it, and serve on without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_claiming_another_members_id_is_refused() {
    let cluster = TestCluster::start_on_certificates(3, "impostor", &[0, 1, 1]);
    let honest = cluster.client_of(&[0, 1]);
    let start = Instant::now();
    loop {
        let mut settled = true;
        let mut views = Vec::new();
        for i in 0..2 {
            match honest.stats_of(i).await {
                Ok(stats) => {
                    let c = stats.cluster.expect("cluster");
                    settled &= c.synced && c.alive == [true, true, false] && c.peer_identity_refused > 0;
                    views.push(format!("{c:?}"));
                }
                Err(err) => {
                    settled = false;
                    views.push(format!("member {i}: {err}"));
                }
            }
        }
        if settled {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "members 0 and 1 never settled without 2: {views:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let quorum = honest.at(Consistency::Quorum);
    for k in 0..30 {
        quorum.set(format!("k{k}"), format!("v{k}")).await.expect("QUORUM write with the impostor refused");
    }
    for k in 0..30 {
        let read = quorum.get(format!("k{k}")).await.expect("QUORUM read");
        assert_eq!(read.as_deref(), Some(format!("v{k}").as_bytes()));
    }
    let log = |i: usize| std::fs::read_to_string(cluster.root.join(format!("node{i}.log"))).unwrap_or_default();
    let dropped = "the sender's certificate names node 1 but it claims to be node 2";
    assert!((0..2).any(|i| log(i).contains(dropped)), "no member logged the impostor: {}\n{}", log(0), log(1));
    let warned = "this node's certificate names node 1, but it runs as --node-id 2";
    assert!(log(2).contains(warned), "the impostor was not told: {}", log(2));
    honest.close().await;
}

/// Replicated records live in the node's shards: the entry bound holds
/// and the policy evicts, as for any cached data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_records_obey_the_node_bounds() {
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").expect("probe").local_addr().expect("addr").port();
    let metrics = format!("{{ip}}:{metrics_port}");
    let cluster = TestCluster::start_with(3, 3, "bounds", &["--max-entries", "200", "--metrics-listen", &metrics]);
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    for i in 0..1_000 {
        client.set(format!("key{i}"), format!("value{i}")).await.expect("write");
    }
    // Record counts in the stats are refreshed every 100 ms.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        let stats = client.stats_of(i).await.expect("stats");
        assert!(stats.entries <= 200, "member {i} holds {} entries", stats.entries);
        assert!(stats.evictions >= 800, "member {i} evicted only {}", stats.evictions);
        assert_eq!(stats.cluster.expect("cluster").records, stats.entries);
    }
    let last = client.get("key999").await.expect("read");
    assert_eq!(last.as_deref(), Some(&b"value999"[..]), "the newest write is resident");
    // The same view in Prometheus metrics.
    let records = client.stats_of(1).await.expect("stats").cluster.expect("cluster").records;
    let url = format!("http://127.0.0.2:{metrics_port}/metrics");
    let text = tokio::task::spawn_blocking(move || {
        ureq::get(&url).call().expect("metrics").into_body().read_to_string().expect("body")
    })
    .await
    .expect("fetch");
    for line in [
        "cachet_cluster_member_up{node=\"0\"} 1".to_string(),
        "cachet_cluster_ring_epoch 1".to_string(),
        "cachet_cluster_synced 1".to_string(),
        format!("cachet_cluster_records {records}"),
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in the metrics:\n{text}");
    }
    // Every request goes through the node's one request path, which times
    // it: the SETs this member coordinated are counted (they were not when
    // each port routed clustered requests around the metrics).
    let sets = text
        .lines()
        .find_map(|l| l.strip_prefix("cachet_request_duration_seconds_count{command=\"set\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .expect("a SET count");
    assert!(sets >= 100, "member 1 counted {sets} SETs of the 1,000 routed to owners");
    // And the writes it stored as a replica for the other coordinators.
    let as_replica = text
        .lines()
        .find_map(|l| l.strip_prefix("cachet_cluster_replica_writes_total "))
        .and_then(|n| n.parse::<u64>().ok())
        .expect("a replica write count");
    assert!(as_replica >= 100, "member 1 stored {as_replica} writes for the others (RF=3)");
    client.close().await;
}

/// The ring member 0 reports, built the way the SDK builds it, to find
/// keys' owners independently of the SDK.
async fn ring_of(client: &ClusterClient) -> cachet_proto::Ring {
    ring_from(&client.stats_of(0).await.expect("stats").cluster.expect("cluster"))
}

/// The ring a member's stats describe: the log's slot table and its
/// members.
fn ring_from(view: &cachet_proto::ClusterStats) -> cachet_proto::Ring {
    let members = (0..view.members.len())
        .filter(|&id| !view.members[id].is_empty())
        .map(|id| cachet_proto::Member { id: id.to_string(), addr: view.members[id].clone(), weight: 1 })
        .collect();
    let table = cachet_proto::SlotTable::new(view.ring_epoch, view.slots.clone()).expect("a valid slot table");
    cachet_proto::Ring::new(members, table).expect("ring")
}

/// The SDK learns the ring and each member's client address from any
/// member, and sends each key to its primary owner: that member alone
/// coordinates the key's operations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_sends_each_key_to_its_primary_owner() {
    let cluster = TestCluster::start(3, 2, "routing");
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    client.refresh_ring().await.expect("ring");
    let view = client.stats_of(0).await.expect("stats").cluster.expect("cluster");
    assert_eq!(view.clients.len(), 3);
    for (i, addr) in view.clients.iter().enumerate() {
        assert_eq!(addr, &cluster.members[i].client_addr, "member {i}'s client address");
    }
    let ring = ring_of(&client).await;
    let coordinated = |stats: &[cachet_client::NodeStats]| -> Vec<u64> {
        stats.iter().map(|s| s.cluster.as_ref().expect("cluster").ops_ok).collect()
    };
    for key in ["alpha", "beta", "gamma", "delta"] {
        let primary: usize = ring.owners(key.as_bytes(), 2)[0].id.parse().expect("id");
        let mut before = Vec::new();
        for i in 0..3 {
            before.push(client.stats_of(i).await.expect("stats"));
        }
        client.set(key, "v").await.expect("write");
        for _ in 0..20 {
            assert_eq!(client.get(key).await.expect("read").as_deref(), Some(&b"v"[..]));
        }
        let mut after = Vec::new();
        for i in 0..3 {
            after.push(client.stats_of(i).await.expect("stats"));
        }
        let (before, after) = (coordinated(&before), coordinated(&after));
        for i in 0..3 {
            let expected = if i == primary { 21 } else { 0 };
            assert_eq!(after[i] - before[i], expected, "{key}: member {i} (primary {primary}) coordinated");
        }
    }
    client.close().await;
}

/// When a member dies, requests in flight to it fail once it has been
/// silent for the client's `dead_after`, and later requests for its keys go
/// to the other owners while the SDK reconnects to it in the background. A
/// request must never make that connection attempt itself: QUIC gives up
/// on a handshake with a dead address only after seconds. With one attempt
/// per operation, a request that did would fail here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_members_keys_go_elsewhere_while_the_sdk_reconnects_in_the_background() {
    let mut cluster = TestCluster::start(3, 3, "probe");
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let ring = ring_of(&client).await;
    let keys: Vec<String> =
        (0..).map(|i| format!("k{i}")).filter(|k| ring.owners(k.as_bytes(), 3)[0].id == "2").take(20).collect();
    for key in &keys {
        client.at(Consistency::All).set(key, "v").await.expect("write to every replica");
    }
    let configs = (0..3)
        .map(|i| {
            let mut config = cluster.client_config(i);
            config.timeout = Duration::from_secs(10);
            config.dead_after = Duration::from_millis(500);
            config
        })
        .collect();
    let single = RetryPolicy { attempts: 1, backoff: Duration::from_millis(10) };
    let once = ClusterClient::new(configs, single).expect("cluster client").at(Consistency::One);
    // A second client with nothing in flight when member 2 dies.
    let idle = ClusterClient::new((0..3).map(|i| cluster.client_config(i)).collect(), single)
        .expect("cluster client")
        .at(Consistency::One);
    for key in &keys {
        assert_eq!(once.get(key).await.expect("read from the primary").as_deref(), Some(&b"v"[..]));
        assert_eq!(idle.get(key).await.expect("read from the primary").as_deref(), Some(&b"v"[..]));
    }
    cluster.members[2].kill();
    let err = once.get(&keys[0]).await.expect_err("member 2 is gone and there is one attempt");
    assert!(matches!(err, ClientError::Connection(_)), "a silent member fails after dead_after: {err}");
    // Past its pause (0.5 s after the failure) member 2 is reconnected in
    // the background; its keys are served by the other owners meanwhile.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for key in &keys {
        let read = once.get(key).await.expect("served by another owner, not stuck reconnecting");
        assert_eq!(read.as_deref(), Some(&b"v"[..]), "{key}");
    }
    // The idle client's connection to member 2 was closed by its own
    // silence check meanwhile (2 s). Its next request for member 2's keys
    // must fail at once and leave the reconnection to the background, not
    // make the connection attempt itself (a `Connect` error, seconds later).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let err = idle.get(&keys[0]).await.expect_err("one attempt, on the dead member's closed connection");
    assert!(matches!(err, ClientError::Connection(_)), "no inline reconnection: {err}");
    once.close().await;
    idle.close().await;
    client.close().await;
}

/// Three members serving the Redis protocol on one free port, each on its
/// own 127.0.0.N, with replication factor `rf` and `extra` flags; the
/// port.
fn resp_cluster(tag: &str, rf: usize, extra: &[&str]) -> (TestCluster, u16) {
    let resp_port = std::net::TcpListener::bind("127.0.0.1:0").expect("probe").local_addr().expect("addr").port();
    let resp = format!("{{ip}}:{resp_port}");
    let flags: Vec<&str> = ["--resp-listen", resp.as_str()].into_iter().chain(extra.iter().copied()).collect();
    (TestCluster::start_with(3, rf, tag, &flags), resp_port)
}

/// `redis-cli -h 127.0.0.{member + 1} -p port ARGS`: its output, trimmed
/// (a reply that is an error is output too, as redis-cli prints it).
fn redis_cli_at(member: usize, port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", &format!("127.0.0.{}", member + 1), "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs (apt-get install redis-tools)");
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

/// The RESP port of a clustered node forwards to the key's owners, so
/// redis-cli (and any plain Redis client) can use any member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_reads_and_writes_through_any_member() {
    let (cluster, resp_port) = resp_cluster("resp", 3, &[]);
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let cli = |member: usize, args: &[&str]| redis_cli_at(member, resp_port, args);
    assert_eq!(cli(0, &["PING"]), "PONG");
    assert_eq!(cli(0, &["SET", "user:1", "Ada"]), "OK");
    assert_eq!(cli(1, &["GET", "user:1"]), "Ada");
    assert_eq!(client.get("user:1").await.expect("QUIC read").as_deref(), Some(&b"Ada"[..]), "same data over QUIC");
    assert_eq!(cli(2, &["SET", "session", "s", "EX", "100"]), "OK");
    let ttl: i64 = cli(0, &["TTL", "session"]).parse().expect("an integer");
    assert!((1..=100).contains(&ttl), "TTL {ttl}");
    assert_eq!(cli(1, &["TTL", "user:1"]), "-1");
    assert_eq!(cli(1, &["TTL", "nothing"]), "-2");
    // MSET implies atomicity: keys of one owner ({hash tag}) are taken,
    // keys spread over members refused by name (nothing written).
    assert_eq!(cli(1, &["MSET", "{t}a", "1", "{t}b", "2"]), "OK");
    let spread: Vec<String> = (0..10).flat_map(|i| [format!("spread{i}"), "v".to_string()]).collect();
    let mut args = vec!["MSET"];
    args.extend(spread.iter().map(String::as_str));
    let refused = cli(0, &args);
    assert!(refused.contains("CROSSSLOT"), "{refused}");
    assert_eq!(cli(2, &["EXISTS", "spread0", "spread9"]), "0", "nothing of a refused MSET is written");
    assert_eq!(cli(2, &["MGET", "{t}a", "nothing", "{t}b"]), "1\n\n2", "nil in the middle");
    assert_eq!(cli(0, &["EXISTS", "{t}a", "{t}b", "nothing"]), "2");
    assert_eq!(cli(0, &["DEL", "{t}a", "{t}b", "nothing", "{t}a"]), "2", "a key named twice counts once");
    assert_eq!(cli(1, &["GET", "{t}a"]), "");
    // Every single-node command, through any member (read-modify-writes
    // serialized at the key's primary owner).
    assert_eq!(cli(2, &["INCR", "counter"]), "1");
    assert_eq!(cli(0, &["INCRBY", "counter", "10"]), "11");
    assert_eq!(cli(1, &["DECR", "counter"]), "10");
    assert_eq!(cli(1, &["APPEND", "log", "a"]), "1");
    assert_eq!(cli(2, &["APPEND", "log", "bc"]), "3");
    assert_eq!(cli(0, &["STRLEN", "log"]), "3");
    // The older string commands ride the same requests (one path).
    assert_eq!(cli(0, &["SETNX", "nx", "1"]), "1");
    assert_eq!(cli(1, &["SETNX", "nx", "2"]), "0");
    assert_eq!(cli(2, &["GETSET", "nx", "3"]), "1");
    assert_eq!(cli(0, &["SETEX", "ex", "100", "abcdef"]), "OK");
    assert_eq!(cli(1, &["GETRANGE", "ex", "-3", "-1"]), "def");
    let at: i64 = cli(2, &["EXPIRETIME", "ex"]).parse().expect("an integer");
    assert!(at > 1_700_000_000, "EXPIRETIME {at}");
    assert_eq!(cli(2, &["TYPE", "ex"]), "string");
    // EXPIRE's options, checked at the key's primary.
    assert_eq!(cli(1, &["EXPIRE", "ex", "50", "NX"]), "0");
    assert_eq!(cli(2, &["EXPIRE", "ex", "500", "GT"]), "1");
    assert_eq!(cli(0, &["EXPIRE", "ex", "600", "LT"]), "0");
    let ttl: i64 = cli(1, &["TTL", "ex"]).parse().expect("an integer");
    assert!((490..=500).contains(&ttl), "TTL {ttl} after GT");
    assert_eq!(cli(0, &["EXPIRE", "nx", "100", "XX"]), "0", "no TTL yet");
    assert_eq!(cli(1, &["EXPIRE", "nx", "100", "LT"]), "1", "no TTL counts as never");
    // In-place edits run at the key's primary; bit reads anywhere.
    assert_eq!(cli(0, &["SET", "edit", "10.50", "EX", "300"]), "OK");
    assert_eq!(cli(1, &["INCRBYFLOAT", "edit", "0.1"]), "10.6");
    assert_eq!(cli(2, &["SETRANGE", "edit", "4", "xy"]), "6");
    assert_eq!(cli(0, &["GET", "edit"]), "10.6xy");
    assert_eq!(cli(1, &["SETBIT", "edit", "0", "1"]), "0");
    assert_eq!(cli(2, &["GETBIT", "edit", "0"]), "1");
    assert_eq!(cli(0, &["BITCOUNT", "edit"]), "23");
    let ttl: i64 = cli(1, &["TTL", "edit"]).parse().expect("an integer");
    assert!((290..=300).contains(&ttl), "edits keep the TTL: {ttl}");
    assert_eq!(cli(0, &["MULTI"]), "OK", "a transaction on its own connection is opened and dropped");
    assert_eq!(cli(0, &["SET", "once", "1", "NX"]), "OK");
    assert_eq!(cli(1, &["SET", "once", "2", "NX"]), "");
    assert_eq!(cli(2, &["SET", "once", "3", "XX", "GET"]), "1");
    assert_eq!(cli(0, &["GETDEL", "once"]), "3");
    assert_eq!(cli(1, &["EXISTS", "once"]), "0");
    assert_eq!(cli(2, &["EXPIRE", "log", "100"]), "1");
    let ttl: i64 = cli(0, &["TTL", "log"]).parse().expect("an integer");
    assert!((1..=100).contains(&ttl), "TTL {ttl}");
    assert_eq!(cli(1, &["PERSIST", "log"]), "1");
    assert_eq!(cli(2, &["TTL", "log"]), "-1");
    assert_eq!(cli(0, &["GETEX", "log", "PX", "50000"]), "abc");
    let pttl: i64 = cli(1, &["PTTL", "log"]).parse().expect("an integer");
    assert!((1..=50_000).contains(&pttl), "PTTL {pttl}");
    assert_eq!(cli(0, &["SET", "word", "x"]), "OK");
    assert!(cli(2, &["INCR", "word"]).contains("not an integer"), "WRONGTYPE-like error");
    // FLUSHALL drops every record on every member (all up here).
    assert_eq!(cli(1, &["FLUSHALL"]), "OK");
    assert_eq!(cli(2, &["GET", "user:1"]), "");
    assert_eq!(cli(0, &["EXISTS", "counter", "log", "session"]), "0");
    // The Redis Cluster view: the log's slot table with each owner's RESP
    // address, the same through every member.
    let slots = cli(1, &["CLUSTER", "SLOTS"]);
    assert_eq!(slots, cli(2, &["CLUSTER", "SLOTS"]), "one table");
    for member in 0..3 {
        assert!(slots.contains(&format!("127.0.0.{}\n{resp_port}", member + 1)), "member {member} in {slots}");
    }
    let first: u32 = slots.lines().next().and_then(|l| l.parse().ok()).expect("a first slot");
    assert_eq!(first, 0, "{slots}");
    let nodes = cli(0, &["CLUSTER", "NODES"]);
    assert_eq!(nodes.lines().count(), 3, "{nodes}");
    assert_eq!(nodes.lines().filter(|l| l.contains("myself,master")).count(), 1, "{nodes}");
    let myid = cli(0, &["CLUSTER", "MYID"]);
    assert!(nodes.lines().any(|l| l.starts_with(&myid) && l.contains("myself")), "{myid} in {nodes}");
    let info = cli(2, &["CLUSTER", "INFO"]);
    assert!(info.contains("cluster_state:ok") && info.contains("cluster_slots_assigned:16384"), "{info}");
    assert!(cli(0, &["INFO", "cluster"]).contains("cluster_enabled:1"));
    assert_eq!(cli(0, &["CLUSTER", "KEYSLOT", "user:{42}:name"]), cli(0, &["CLUSTER", "KEYSLOT", "42"]));
    assert_eq!(cli(1, &["READONLY"]), "OK");
    assert!(cli(1, &["CLUSTER", "FOO"]).contains("unknown subcommand"));
    // redis-cli in cluster mode follows the table (and never meets a
    // redirect: any member serves any key).
    let cluster_cli = |member: usize, args: &[&str]| -> String {
        let out = Command::new("redis-cli")
            .args(["-c", "-h", &format!("127.0.0.{}", member + 1), "-p", &resp_port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "redis-cli -c {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    };
    for i in 0..20 {
        assert_eq!(cluster_cli(i % 3, &["SET", &format!("c{i}"), &i.to_string()]), "OK");
    }
    for i in 0..20 {
        assert_eq!(cluster_cli((i + 1) % 3, &["GET", &format!("c{i}")]), i.to_string());
    }
    // redis-py's RedisCluster: it reads COMMAND (each command's keys) and
    // CLUSTER SLOTS, then sends each key to an owner.
    let script = r#"
import sys
from redis.cluster import RedisCluster, ClusterNode
rc = RedisCluster(startup_nodes=[ClusterNode("127.0.0.2", int(sys.argv[1]))], decode_responses=True)
assert len(rc.get_nodes()) == 3, rc.get_nodes()
for i in range(100):
    assert rc.set(f"py{i}", str(i)), i
assert [rc.get(f"py{i}") for i in range(100)] == [str(i) for i in range(100)]
assert rc.mget(["{tag}a", "{tag}b"]) == [None, None]
assert rc.incr("py:counter") == 1 and rc.incrby("py:counter", 4) == 5
pipe = rc.pipeline()
for i in range(10):
    pipe.incr(f"py:n{i}")
assert pipe.execute() == [1] * 10
assert rc.delete("py0", "py1") == 2
print("ok", len(rc.get_nodes()))
"#;
    let out = Command::new("python3").args(["-c", script, &resp_port.to_string()]).output().expect("python3 runs");
    assert!(
        out.status.success(),
        "redis-py RedisCluster (.ci/run installs redis==6.4.0): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok 3");
    client.close().await;
}

/// With `--resp-cluster-redirects`, members speak Redis Cluster's redirects:
/// a key whose slot another member is primary of is answered with `MOVED
/// slot host:port` (its primary's RESP address), keys across slots with
/// `CROSSSLOT`; `redis-cli -c` and redis-py's `RedisCluster` follow them;
/// a `READONLY` connection reads a key it holds a copy of without being
/// redirected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_clients_follow_moved_redirects() {
    let (cluster, resp_port) = resp_cluster("moved", 2, &["--resp-cluster-redirects"]);
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let cli = |member: usize, args: &[&str]| redis_cli_at(member, resp_port, args);
    // The slot table is in the log; wait until every member serves it.
    let ring = ring_of(&client).await;
    let primary = |key: &str| -> usize { ring.owners(key.as_bytes(), 2)[0].id.parse().expect("id") };
    let key = "user:1";
    let owner = primary(key);
    let other = (owner + 1) % 3;
    let slot = cachet_proto::slot::key_slot(key.as_bytes());
    // Each member's RESP address reaches the others through the log.
    let expected = format!("MOVED {slot} 127.0.0.{}:{resp_port}", owner + 1);
    let start = Instant::now();
    loop {
        let moved = cli(other, &["GET", key]);
        if moved == expected {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "member {other} answered {moved:?}, not {expected:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(cli(other, &["SET", key, "Ada"]), expected, "writes too");
    assert_eq!(cli(owner, &["SET", key, "Ada"]), "OK");
    assert_eq!(cli(other, &["-c", "GET", key]), "Ada", "redis-cli -c follows MOVED");
    assert!(cli(owner, &["MGET", "a", "b", "c", "d"]).starts_with("CROSSSLOT"));
    assert_eq!(cli(primary("{t}a"), &["MSET", "{t}a", "1", "{t}b", "2"]), "OK");
    assert_eq!(cli(primary("{t}a"), &["MGET", "{t}a", "{t}b"]), "1\n2", "one slot: served");
    // A READONLY connection reads its own copy (RF 2: one member besides
    // the primary holds one); a write is still redirected.
    let replica = ring.owners(key.as_bytes(), 2)[1].id.parse::<usize>().expect("id");
    let script = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"*1\r\n$8\r\nREADONLY\r\n*2\r\n$3\r\nGET\r\n$6\r\nuser:1\r\n*3\r\n$3\r\nSET\r\n$6\r\nuser:1\r\n$1\r\nx\r\n")
data = b""
while data.count(b"\r\n") < 4:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.decode())
"#;
    let out = Command::new("python3")
        .args(["-c", script, &format!("127.0.0.{}", replica + 1), &resp_port.to_string()])
        .output()
        .expect("python3 runs");
    let replies = String::from_utf8_lossy(&out.stdout);
    assert!(replies.starts_with("+OK\r\n$3\r\nAda\r\n-MOVED"), "READONLY on the replica: {replies:?}");
    // redis-benchmark's cluster mode: each request to its slot's primary.
    let out = Command::new("redis-benchmark")
        .args(["--cluster", "-h", "127.0.0.1", "-p", &resp_port.to_string(), "-n", "2000", "-c", "4", "-q"])
        .args(["-t", "set,get"])
        .output()
        .expect("redis-benchmark runs (apt-get install redis-tools)");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "redis-benchmark --cluster: {report}");
    assert!(report.contains("SET: ") && report.contains("GET: ") && !report.contains("ERR"), "{report}");
    // redis-py's RedisCluster, its requests redirected where its table is
    // wrong.
    let script = r#"
import sys
from redis.cluster import RedisCluster
rc = RedisCluster(host="127.0.0.1", port=int(sys.argv[1]))
for i in range(200):
    assert rc.set(f"rc{i}", str(i)), i
assert [rc.get(f"rc{i}") for i in range(200)] == [str(i).encode() for i in range(200)]
print("ok")
"#;
    let out = Command::new("python3").args(["-c", script, &resp_port.to_string()]).output().expect("python3 runs");
    assert!(
        out.status.success(),
        "redis-py RedisCluster: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    client.close().await;
}

/// A PostgreSQL database of the example loader's `users` (a view that
/// sleeps `delay` seconds per query), with pg_stat_statements; its
/// connection URL.
async fn users_database(tag: &str, delay: &str) -> (String, tokio_postgres::Client) {
    let pg = std::env::var("CACHET_PG").expect(
        "CACHET_PG is not set: the loader tests need PostgreSQL; run them through `cargo xtask test` (which \
         starts one) or set CACHET_PG",
    );
    let connect = |url: String| async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("PostgreSQL");
        tokio::spawn(connection);
        client
    };
    let name = format!("cachet_cluster_{tag}_{}", std::process::id());
    let admin = connect(pg.clone()).await;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await.expect("drop");
    admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
    let url = format!("{pg} dbname={name}");
    let db = connect(url.clone()).await;
    db.batch_execute(&format!(
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
         CREATE TABLE users_data (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL);
         INSERT INTO users_data VALUES (1, 'Ada', 'ada@example.org'), (2, 'Grace', 'grace@example.org');
         CREATE VIEW users AS SELECT u.id, u.name, u.email FROM users_data u, pg_sleep({delay}) s;"
    ))
    .await
    .expect("users");
    (url, db)
}

/// The example loader's queries PostgreSQL ran in this database.
async fn loader_queries(db: &tokio_postgres::Client) -> i64 {
    let sql = "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
               WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                 AND query LIKE '%FROM users WHERE id%'";
    db.query_one(sql, &[]).await.expect("pg_stat_statements").get(0)
}

/// A cluster of 3 members, RF=3, running the example users loader on the
/// `user:` namespace of `url`, with `namespace` (TOML lines) added to the
/// namespace and `origin` to the origin; the loader's files live in a
/// directory removed on drop.
struct LoaderCluster {
    cluster: TestCluster,
    dir: PathBuf,
}

impl LoaderCluster {
    fn start(tag: &str, url: &str, origin: &str, namespace: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("cachet-loader-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let module = dir.join("users.wasm");
        std::fs::write(&module, cachet_tests::users_loader_component()).expect("loader");
        let config = dir.join("loaders.toml");
        std::fs::write(
            &config,
            format!(
                "[origins.users-db]\npostgres = \"{url}\"\n{origin}\n[[namespace]]\nprefix = \"user:\"\n\
                 module = \"{}\"\norigins = [\"users-db\"]\n{namespace}\n",
                module.display()
            ),
        )
        .expect("config");
        let cluster = TestCluster::start_with(3, 3, tag, &["--loaders", config.to_str().expect("utf-8")]);
        Self { cluster, dir }
    }

    /// Waits until the cluster is healthy; a client per member (30 s
    /// timeout).
    async fn members(&self) -> Vec<Arc<cachet_client::Client>> {
        let client = self.cluster.client();
        self.cluster.wait_healthy(&client, Duration::from_secs(30)).await;
        let mut members = Vec::new();
        for i in 0..3 {
            let mut config = self.cluster.client_config(i);
            config.timeout = Duration::from_secs(30);
            members.push(Arc::new(cachet_client::Client::connect(config).await.expect("client")));
        }
        members
    }
}

impl Drop for LoaderCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Read-through loaders on a cluster (issue 19, part 3): 10,000 concurrent
/// GETs of one cold key, spread over every member, make one query, run at
/// the key's primary owner, and the value reaches the replicas. Then the
/// primary is killed in the middle of a load: every waiter gets the value
/// or a clear error, and the next GET loads again at the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_key_is_loaded_once_for_the_whole_cluster() {
    let (url, db) = users_database("flight", "2").await;
    let mut loaders = LoaderCluster::start("loaders", &url, "statement-timeout-ms = 10000", "load-timeout-ms = 10000");
    let members = loaders.members().await;
    let client = loaders.cluster.client();
    let mut gets = tokio::task::JoinSet::new();
    for i in 0..10_000 {
        let member = members[i % 3].clone();
        gets.spawn(async move { member.get("user:1").await });
    }
    let ada = br#"{"id":1,"name":"Ada","email":"ada@example.org"}"#;
    while let Some(got) = gets.join_next().await {
        let value = got.expect("task").expect("GET succeeds").expect("the row");
        assert_eq!(&value[..], &ada[..]);
    }
    assert_eq!(loader_queries(&db).await, 1, "one load for 10,000 GETs over 3 members");
    // Written to the replicas: each member reads it without loading.
    for member in &members {
        assert_eq!(member.get("user:1").await.expect("GET").as_deref(), Some(&ada[..]));
    }
    assert_eq!(loader_queries(&db).await, 1);

    // The primary of `user:2` dies in the middle of its load.
    let ring = ring_of(&client).await;
    let primary: usize = ring.owners(b"user:2", 3)[0].id.parse().expect("id");
    let mut waiters = tokio::task::JoinSet::new();
    for i in 0..300 {
        let member = members[i % 3].clone();
        waiters.spawn(async move { member.get("user:2").await });
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    loaders.cluster.members[primary].kill();
    let grace = br#"{"id":2,"name":"Grace","email":"grace@example.org"}"#;
    let (mut values, mut errors) = (0, 0);
    while let Some(got) = waiters.join_next().await {
        match got.expect("task") {
            Ok(Some(value)) => {
                assert_eq!(&value[..], &grace[..]);
                values += 1;
            }
            Ok(None) => panic!("a waiter was told the row does not exist"),
            Err(err) => {
                // A clear error: the member is gone, or the load did not
                // finish in time.
                let text = err.to_string();
                assert!(
                    matches!(err, ClientError::Connection(_))
                        || text.contains("in time")
                        || text.contains("replicas")
                        || text.contains("load"),
                    "{text}"
                );
                errors += 1;
            }
        }
    }
    assert_eq!(values + errors, 300);
    // The next GET through a survivor loads again, at the new primary.
    let survivor = (primary + 1) % 3;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match members[survivor].get("user:2").await {
            Ok(Some(value)) => {
                assert_eq!(&value[..], &grace[..]);
                break;
            }
            other => assert!(Instant::now() < deadline, "no load after the primary died: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let queries = loader_queries(&db).await;
    assert!((2..=3).contains(&queries), "{queries} loads of user:2 and user:1 in all");
}

/// Stale-while-revalidate on a cluster: past its soft expiry a loaded value
/// is served at once through every member while the key's primary
/// refreshes it once in the background (the origin takes 3 s); then the
/// new value is served everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_value_is_served_through_every_member_while_one_refresh_runs() {
    let (url, db) = users_database("swr", "3").await;
    let namespace = "load-timeout-ms = 10000\nttl-ms = 1000\ngrace-ms = 60000\njitter = 0.0\nxfetch-beta = 0.0";
    let loaders = LoaderCluster::start("swr", &url, "statement-timeout-ms = 10000", namespace);
    let members = loaders.members().await;
    let ada = br#"{"id":1,"name":"Ada","email":"ada@example.org"}"#;
    assert_eq!(members[0].get("user:1").await.expect("GET").as_deref(), Some(&ada[..]));
    assert_eq!(loader_queries(&db).await, 1);
    db.batch_execute("UPDATE users_data SET name = 'Ada L' WHERE id = 1").await.expect("update");
    tokio::time::sleep(Duration::from_millis(1_500)).await; // past the soft expiry
    let started = Instant::now();
    let mut gets = tokio::task::JoinSet::new();
    for i in 0..300 {
        let member = members[i % 3].clone();
        gets.spawn(async move { member.get("user:1").await });
    }
    while let Some(got) = gets.join_next().await {
        let value = got.expect("task").expect("GET").expect("the stale value");
        assert_eq!(&value[..], &ada[..], "the stale value, served at once");
    }
    let served_in = started.elapsed();
    assert!(served_in < Duration::from_millis(2_500), "300 GETs waited for the 3 s refresh: {served_in:?}");
    let renamed = br#"{"id":1,"name":"Ada L","email":"ada@example.org"}"#;
    let deadline = Instant::now() + Duration::from_secs(20);
    while members[1].get("user:1").await.expect("GET").as_deref() != Some(&renamed[..]) {
        assert!(Instant::now() < deadline, "the refreshed value never arrived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for member in &members {
        assert_eq!(member.get("user:1").await.expect("GET").as_deref(), Some(&renamed[..]), "on every member");
    }
    assert_eq!(loader_queries(&db).await, 2, "one load and one refresh for the whole cluster");
}

/// Change data capture on a cluster: a notification deletes the key on
/// every replica, through its primary, so every member serves the row's
/// new value (loaded again) at once, long before the TTL. Then warming
/// through one member fills them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_notification_invalidates_a_key_on_every_member() {
    let (url, db) = users_database("cdc", "0").await;
    let namespace = "ttl-ms = 3600000\ninvalidate = { origin = \"users-db\", channel = \"users_changed\" }";
    let loaders = LoaderCluster::start("cdc", &url, "", namespace);
    let mut members = loaders.members().await;
    let ada = br#"{"id":1,"name":"Ada","email":"ada@example.org"}"#;
    for member in &members {
        assert_eq!(member.get("user:1").await.expect("GET").as_deref(), Some(&ada[..]));
    }
    // Every member's feed listens before the change is made.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    db.batch_execute("UPDATE users_data SET name = 'Ada L' WHERE id = 1; NOTIFY users_changed, '1'")
        .await
        .expect("update and notify");
    let renamed = br#"{"id":1,"name":"Ada L","email":"ada@example.org"}"#;
    for (i, member) in members.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while member.get("user:1").await.expect("GET").as_deref() != Some(&renamed[..]) {
            assert!(Instant::now() < deadline, "member {i} still serves the old row (TTL 1 h)");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Warming through one member fills every member: one query per key.
    let before = loader_queries(&db).await;
    let keys = vec![bytes::Bytes::from_static(b"user:2"), bytes::Bytes::from_static(b"user:404")];
    let report = cachet::warm::warm(members.remove(2), keys, 100, 4, || {}).await;
    assert_eq!((report.present, report.missing, report.failed), (1, 1, 0), "{report:?}");
    let grace = br#"{"id":2,"name":"Grace","email":"grace@example.org"}"#;
    for member in &members {
        assert_eq!(member.get("user:2").await.expect("GET").as_deref(), Some(&grace[..]), "warmed everywhere");
    }
    assert_eq!(loader_queries(&db).await - before, 2, "one load per warmed key, none per member");
}

/// Write-through and write-behind on a cluster: a SET or DEL through any
/// member is written to PostgreSQL by the key's primary (at once, or
/// queued), then to every replica; other writes of those keys are refused
/// as on a single node; a write the origin refuses is an error and leaves
/// no cached value behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_the_origin_through_the_keys_primary() {
    for mode in ["through", "behind"] {
        let (url, db) = users_database(&format!("write_{mode}"), "0").await;
        db.batch_execute(
            "DROP VIEW users; CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL);
             INSERT INTO users SELECT * FROM users_data;",
        )
        .await
        .expect("a writable users table");
        let namespace = format!("ttl-ms = 3600000\nwrite = \"{mode}\"");
        let loaders = LoaderCluster::start(&format!("write-{mode}"), &url, "", &namespace);
        let members = loaders.members().await;
        let name_of = |id: i64| {
            let db = &db;
            async move {
                db.query_opt("SELECT name FROM users WHERE id = $1", &[&id])
                    .await
                    .expect("query")
                    .map(|row| row.get::<_, String>(0))
            }
        };
        let until = |what: &'static str| {
            let deadline = Instant::now() + Duration::from_secs(10);
            move || assert!(Instant::now() < deadline, "{mode}: {what}")
        };
        // A new row, through member 1.
        let alan = r#"{"id":3,"name":"Alan","email":"alan@example.org"}"#;
        members[1].set("user:3", alan).await.expect("SET");
        let waited = until("the new row never reached PostgreSQL");
        while name_of(3).await.as_deref() != Some("Alan") {
            assert!(mode == "behind", "write-through: the row is there once SET answers");
            waited();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for member in &members {
            assert_eq!(member.get("user:3").await.expect("GET").as_deref(), Some(alan.as_bytes()), "{mode}");
        }
        // A cached row rewritten through another member.
        assert!(members[0].get("user:1").await.expect("GET").is_some());
        let ada = r#"{"id":1,"name":"Ada L","email":"ada@example.org"}"#;
        members[2].set("user:1", ada).await.expect("SET");
        for member in &members {
            assert_eq!(member.get("user:1").await.expect("GET").as_deref(), Some(ada.as_bytes()), "{mode}");
        }
        let waited = until("the rewrite never reached PostgreSQL");
        while name_of(1).await.as_deref() != Some("Ada L") {
            waited();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A delete.
        assert!(members[0].get("user:2").await.expect("GET").is_some());
        assert_eq!(members[0].delete(&["user:2"]).await.expect("DEL"), 1, "{mode}: it was cached");
        for member in &members {
            assert_eq!(member.get("user:2").await.expect("GET"), None, "{mode}: gone everywhere");
        }
        let waited = until("the delete never reached PostgreSQL");
        while name_of(2).await.is_some() {
            waited();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Other writes of these keys are refused, as on a single node.
        let refused = members[1].incr("user:1", 1).await.expect_err("INCR of an origin-written key");
        assert!(matches!(&refused, ClientError::Server(r) if r.code == ErrorCode::NotAllowed), "{refused}");
        let nx = cachet_client::SetOptions { condition: cachet_client::Condition::IfAbsent, ..Default::default() };
        let refused = members[1].set_with("user:9", "x", nx).await.expect_err("SET NX");
        assert!(matches!(&refused, ClientError::Server(r) if r.code == ErrorCode::NotAllowed), "{refused}");
        if mode == "through" {
            // The origin refuses it: an error, and no cached value left.
            let err = members[0].set("user:1", "not a user").await.expect_err("a value the loader refuses");
            assert!(err.to_string().contains("not a user object"), "{err}");
            for member in &members {
                assert_eq!(member.get("user:1").await.expect("GET").as_deref(), Some(ada.as_bytes()), "reloaded");
            }
        }
        drop(loaders);
    }
}

/// The loader configuration is the cluster's (issue 20): members started
/// without `--loaders` get loaders from one `cachet cluster loaders FILE`
/// through any member, a changed configuration replaces them live on
/// every member, a member whose data directory is wiped fetches the
/// module from a peer and builds the log's loaders before it serves, and
/// `--none` drops them everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loader_configuration_is_the_clusters_and_changes_live() {
    let (url, _db) = users_database("cfg", "0").await;
    let token = "loaders-token";
    let mut cluster = policy_cluster("loader-cfg", token).await;
    let dir = cluster.root.join("loader-files");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("users.wasm"), cachet_tests::users_loader_component()).expect("loader");
    let write_config = |ttl_ms: u64| {
        let text = format!(
            "[origins.users-db]\npostgres = \"{url}\"\n[[namespace]]\nprefix = \"user:\"\n\
             module = \"users.wasm\"\norigins = [\"users-db\"]\nttl-ms = {ttl_ms}\n"
        );
        let path = dir.join(format!("loaders-{ttl_ms}.toml"));
        std::fs::write(&path, text).expect("config");
        path
    };
    let addrs: Vec<String> = cluster.members.iter().map(|m| m.client_addr.clone()).collect();
    let ca = cluster.ca.to_str().expect("utf-8").to_string();
    let set = |through: usize, what: &[&str]| {
        let token_file = std::env::temp_dir().join(format!("cachet-cluster-loader-cfg-token-{}", std::process::id()));
        let server = &addrs[through];
        let args = [&["cluster", "loaders"][..], what].concat();
        let out = Command::new(env!("CARGO_BIN_EXE_cachet"))
            .args(args)
            .args(["--admin-token-file", token_file.to_str().expect("utf-8"), "--server", server, "--dev-ca", &ca])
            .args(["--timeout-ms", "40000"])
            .output()
            .expect("cachet cluster loaders runs");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "cluster loaders {what:?}: {stdout}{stderr}");
        stdout.to_string()
    };
    let mut members = Vec::new();
    for i in 0..3 {
        let mut config = cluster.client_config(i);
        config.timeout = Duration::from_secs(10);
        members.push(cachet_client::Client::connect(config).await.expect("client"));
    }
    assert_eq!(members[0].get("user:1").await.expect("GET"), None, "no loaders yet: a plain miss");

    let said = set(1, &[write_config(3_600_000).to_str().expect("utf-8")]);
    assert!(said.contains("loaders for user:"), "{said}");
    let ada = br#"{"id":1,"name":"Ada","email":"ada@example.org"}"#;
    let running = |v: &cachet_proto::MetaStats| v.loaders.as_deref().is_some_and(|l| l.ends_with("running here"));
    let (took, _) = wait_meta(&cluster, &[0, 1, 2], Duration::from_secs(20), "loaders everywhere", running).await;
    eprintln!("one `cluster loaders` through member 1: every member runs them in {took:?}");
    for (i, member) in members.iter().enumerate() {
        assert_eq!(member.get("user:1").await.expect("GET").as_deref(), Some(&ada[..]), "member {i}");
    }
    let ttl = members[2].ttl("user:1").await.expect("TTL");
    assert!(matches!(ttl, cachet_client::TtlState::Remaining(ms) if ms > 3_000_000), "{ttl:?}");

    // A new configuration (a 60 s TTL) replaces the loaders live.
    let before = meta_views(&cluster, &[0]).await[0].clone().and_then(|v| v.loaders).expect("loaders");
    set(2, &[write_config(60_000).to_str().expect("utf-8")]);
    let changed = |v: &cachet_proto::MetaStats| running(v) && v.loaders.as_deref() != Some(before.as_str());
    wait_meta(&cluster, &[0, 1, 2], Duration::from_secs(20), "the new loaders", changed).await;
    for (i, member) in members.iter().enumerate() {
        let key = format!("user:{}", i % 2 + 1);
        member.delete(&[key.as_str()]).await.expect("DEL");
        assert!(member.get(&key).await.expect("GET").is_some(), "member {i} loads {key}");
        let ttl = member.ttl(&key).await.expect("TTL");
        assert!(matches!(ttl, cachet_client::TtlState::Remaining(ms) if ms <= 60_000), "member {i}: {ttl:?}");
    }

    // Member 0 loses its data directory: it fetches the module from a peer
    // and runs the log's loaders before it serves.
    members.remove(0).close().await;
    cluster.members[0].kill();
    std::fs::remove_dir_all(cluster.root.join("node0")).expect("wipe the data directory");
    cluster.members[0].spawn();
    let (took, _) = wait_meta(&cluster, &[0, 1, 2], Duration::from_secs(40), "the wiped member's loaders", |v| {
        running(v) && v.members.iter().all(|m| m.state == "serving")
    })
    .await;
    eprintln!("member 0 wiped: back with the cluster's loaders in {took:?}");
    let held = std::fs::read_dir(cluster.root.join("node0").join("loader-modules")).expect("modules kept").count();
    assert_eq!(held, 1, "the module, fetched from a peer, is kept in the data directory");
    let mut config = cluster.client_config(0);
    config.timeout = Duration::from_secs(10);
    let member0 = cachet_client::Client::connect(config).await.expect("client");
    member0.delete(&["user:2"]).await.expect("DEL");
    let grace = br#"{"id":2,"name":"Grace","email":"grace@example.org"}"#;
    assert_eq!(member0.get("user:2").await.expect("GET").as_deref(), Some(&grace[..]));

    // Dropped everywhere: a miss stays a miss.
    let said = set(0, &["--none"]);
    assert!(said.contains("no loaders"), "{said}");
    wait_meta(&cluster, &[0, 1, 2], Duration::from_secs(20), "no loaders", |v| v.loaders.is_none()).await;
    for member in members.iter().chain([&member0]) {
        member.delete(&["user:1"]).await.expect("DEL");
        assert_eq!(member.get("user:1").await.expect("GET"), None);
    }
}

/// Shadow evaluation on a cluster member sees the traffic it coordinates:
/// every request goes through the node's dispatcher, which samples it, as
/// on a single node (clustered requests used to bypass it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_evaluation_sees_the_traffic_a_member_coordinates() {
    use cachet_client::AdminCommand;
    let token_file = std::env::temp_dir().join(format!("cachet-cluster-shadow-token-{}", std::process::id()));
    std::fs::write(&token_file, "shadow-token\n").expect("token file");
    let cluster = TestCluster::start_with(3, 3, "shadow", &["--admin-token-file", token_file.to_str().expect("utf-8")]);
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let member = cachet_client::Client::connect(cluster.client_config(0)).await.expect("client");
    let version = env!("CARGO_PKG_VERSION");
    let started = member
        .admin("shadow-token", AdminCommand::Shadow { name: "lru".into(), version: version.into() })
        .await
        .expect("shadow starts");
    let rate = started.shadow.expect("shadow running").sample_rate;
    assert!(rate > 0.0, "{rate}");
    // Every request through member 0: it coordinates all of them.
    for i in 0..400 {
        member.set(format!("key{i}"), "v").await.expect("SET");
        member.get(format!("key{i}")).await.expect("GET");
    }
    let listing = member.admin("shadow-token", AdminCommand::List).await.expect("list");
    let shadow = listing.shadow.expect("still running");
    assert!(shadow.sampled_reads > 0, "the shadow saw none of 400 clustered GETs (sample rate {rate})");
    assert!(shadow.active_hit_ratio > 0.5, "the sampled SETs reached the ghosts too: {shadow:?}");
    let _ = std::fs::remove_file(&token_file);
}

fn serve_fails(args: &[&str], root: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cachet"))
        .args(["serve", "--data-dir", root.to_str().expect("utf-8")])
        .args(args)
        .output()
        .expect("cachet runs");
    assert!(!out.status.success(), "serve {args:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_cluster_options_are_refused_by_name() {
    let root = std::env::temp_dir().join(format!("cachet-cluster-bad-{}", std::process::id()));
    let ca = root.join("ca");
    let ca = ca.to_str().expect("utf-8");
    let peers = "127.0.0.1:1,127.0.0.2:1";
    let listen = ["--listen", "127.0.0.1:9"];
    let no_ca = serve_fails(&["--cluster", peers, "--node-id", "0"], &root);
    assert!(no_ca.contains("--dev-ca"), "{no_ca}");
    let any_port =
        serve_fails(&["--cluster", peers, "--node-id", "0", "--dev-ca", ca, "--listen", "127.0.0.1:0"], &root);
    assert!(any_port.contains("--listen address"), "{any_port}");
    let out_of_range =
        serve_fails(&[&listen[..], &["--cluster", peers, "--node-id", "2", "--dev-ca", ca]].concat(), &root);
    assert!(out_of_range.contains("--node-id 2"), "{out_of_range}");
    let rf = serve_fails(
        &[&listen[..], &["--cluster", peers, "--node-id", "0", "--replication-factor", "3", "--dev-ca", ca]].concat(),
        &root,
    );
    assert!(rf.contains("--replication-factor 3"), "{rf}");
    let twice = serve_fails(
        &[&listen[..], &["--cluster", "127.0.0.1:9,127.0.0.1:9", "--node-id", "0", "--dev-ca", ca]].concat(),
        &root,
    );
    assert!(twice.contains("listed twice"), "{twice}");
    let huge = serve_fails(
        &[&listen[..], &["--seeds", "127.0.0.1:1", "--peer-listen", "127.0.0.1:2", "--node-id", "5000"]].concat(),
        &root,
    );
    assert!(huge.contains("--node-id") && huge.contains("5000"), "{huge}");
    let _ = std::fs::remove_dir_all(&root);
}

/// The first `n` keys `{prefix}{i}` whose primary owner (RF `rf`) is
/// member `owner`.
fn sdk_keys_owned_by(ring: &cachet_proto::Ring, rf: usize, owner: usize, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|k| ring.owners(k.as_bytes(), rf)[0].id == owner.to_string())
        .take(n)
        .collect()
}

/// The operations each of the first 3 members coordinated so far.
async fn sdk_coordinated(client: &ClusterClient) -> Vec<u64> {
    let mut ops = Vec::new();
    for i in 0..3 {
        ops.push(client.stats_of(i).await.expect("stats").cluster.expect("cluster").ops_ok);
    }
    ops
}

/// A cluster client given member 0 alone learns every member's client
/// address from the ring, connects to the others with the same TLS
/// settings, and sends each key to its primary owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_client_given_one_member_reaches_every_member() {
    let cluster = TestCluster::start(3, 2, "sdk-learn");
    let observer = cluster.client();
    cluster.wait_healthy(&observer, Duration::from_secs(30)).await;
    let ring = ring_of(&observer).await;
    let one = cluster.client_of(&[0]);
    assert_eq!(one.members().len(), 1);
    one.refresh_ring().await.expect("the ring from member 0");
    let learned: Vec<String> = one.members().iter().map(|a| a.to_string()).collect();
    let expected: Vec<String> = cluster.members.iter().map(|m| m.client_addr.clone()).collect();
    assert_eq!(learned, expected, "member 0 as given, then the others learned in node order");
    // Learned members are connected to in the background (requests go to
    // other owners meanwhile); a per-member command waits for that.
    for i in 0..3 {
        one.ping_of(i).await.unwrap_or_else(|e| panic!("member {i}: {e}"));
    }
    for owner in 0..3 {
        let keys = sdk_keys_owned_by(&ring, 2, owner, "learn", 5);
        let before = sdk_coordinated(&observer).await;
        for key in &keys {
            one.set(key, format!("{key}!")).await.expect("write");
        }
        for key in &keys {
            let read = one.get(key).await.expect("read");
            assert_eq!(read.as_deref(), Some(format!("{key}!").as_bytes()), "{key}");
        }
        let after = sdk_coordinated(&observer).await;
        for i in 0..3 {
            let expected = if i == owner { 10 } else { 0 };
            assert_eq!(after[i] - before[i], expected, "member {i} coordinated for the keys of member {owner}");
        }
    }
    one.close().await;
    observer.close().await;
}

/// MSET, MGET, EXISTS and DEL of several keys through the cluster client
/// go to each key's primary owner (one part per owner; for MSET, per set
/// of owners, each written as one batch) and come back in the caller's
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_key_commands_are_split_by_owner_and_merged_in_order() {
    let cluster = TestCluster::start(3, 2, "sdk-multi");
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let ring = ring_of(&client).await;
    let primary = |key: &str| -> usize { ring.owners(key.as_bytes(), 2)[0].id.parse().expect("id") };
    // Keys of the three owners, interleaved.
    let owned: Vec<Vec<String>> = (0..3).map(|o| sdk_keys_owned_by(&ring, 2, o, "multi", 4)).collect();
    let mut keys = Vec::new();
    for k in 0..4 {
        for keys_of in &owned {
            keys.push(keys_of[k].clone());
        }
    }
    let value = |key: &str| format!("value of {key}");
    let pairs = keys.iter().map(|k| (bytes::Bytes::from(k.clone()), bytes::Bytes::from(value(k)))).collect();
    let before = sdk_coordinated(&client).await;
    client.mset(pairs).await.expect("MSET across owners");
    let after = sdk_coordinated(&client).await;
    // One batch per set of owners (RF=2 of 3: a primary's keys have one of
    // two other members beside it).
    let mut batches = [std::collections::BTreeSet::new(), Default::default(), Default::default()];
    for key in &keys {
        let mut owners: Vec<String> = ring.owners(key.as_bytes(), 2).iter().map(|m| m.id.clone()).collect();
        owners.sort();
        batches[primary(key)].insert(owners);
    }
    for i in 0..3 {
        assert_eq!(after[i] - before[i], batches[i].len() as u64, "member {i} wrote one batch per set of owners");
    }
    for key in &keys {
        assert_eq!(client.get(key).await.expect("GET").as_deref(), Some(value(key).as_bytes()), "{key}");
    }
    // Misses and a key named twice, among keys of every owner.
    let mut asked = keys.clone();
    asked.insert(5, "missing-1".into());
    asked.insert(1, keys[7].clone());
    asked.push("missing-2".into());
    let mut expected_ops = [0u64; 3];
    for key in &asked {
        expected_ops[primary(key)] += 1;
    }
    let before = sdk_coordinated(&client).await;
    let values = client.mget(&asked).await.expect("MGET across owners");
    let after = sdk_coordinated(&client).await;
    assert_eq!(values.len(), asked.len());
    for (key, read) in asked.iter().zip(&values) {
        let expected = (!key.starts_with("missing")).then(|| value(key));
        assert_eq!(read.as_deref(), expected.as_deref().map(str::as_bytes), "{key} in the caller's order");
    }
    for i in 0..3 {
        assert_eq!(after[i] - before[i], expected_ops[i], "member {i} read its own keys");
    }
    assert_eq!(client.exists(&asked).await.expect("EXISTS"), keys.len() as u64 + 1, "a key named twice counts twice");
    let doomed = [&keys[0], &keys[1], &keys[2], "missing-1", &keys[0]];
    assert_eq!(client.delete_keys(&doomed).await.expect("DEL"), 3, "a key named twice counts once");
    assert_eq!(client.exists(&keys).await.expect("EXISTS"), keys.len() as u64 - 3);
    assert!(client.mget::<&str>(&[]).await.expect("nothing asked").is_empty());
    client.close().await;
}

/// An MGET whose values would pass the reply limit is refused before any
/// value travels: the coordinator asks the owners for sizes first (one
/// operation), not for the values (one read per key). One under the limit
/// is probed, then read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_mget_too_large_is_refused_before_any_value_is_read() {
    let cluster = TestCluster::start(3, 3, "mget-size");
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let value = bytes::Bytes::from(vec![b'v'; 900 << 10]);
    client.set("big", value.clone()).await.expect("a 900 KiB value");
    let primary: usize = ring_of(&client).await.owners(b"big", 3)[0].id.parse().expect("id");
    let coordinated = |all: Vec<u64>| all[primary];
    let before = coordinated(sdk_coordinated(&client).await);
    match client.mget(&vec!["big"; 80]).await {
        Err(ClientError::Server(reply)) => {
            assert_eq!(reply.code, ErrorCode::TooLarge, "{reply:?}");
            assert!(reply.message.contains("ask for fewer keys"), "{reply:?}");
        }
        other => panic!("80 x 900 KiB is over the 64 MiB reply limit: {other:?}"),
    }
    let after = coordinated(sdk_coordinated(&client).await);
    assert_eq!(after - before, 1, "one size probe, no read of any value");
    // Enough keys that 1 MiB values could pass the limit, small values:
    // probed, then read.
    client.set("{big}small", "s").await.expect("set");
    let after = coordinated(sdk_coordinated(&client).await);
    let values = client.mget(&vec!["{big}small"; 70]).await.expect("70 small values fit");
    assert!(values.iter().all(|v| v.as_deref() == Some(&b"s"[..])));
    assert_eq!(coordinated(sdk_coordinated(&client).await) - after, 71, "the probe, then a read per key");
    // An MSET longer than one batch message may carry is refused by name.
    let pairs: Vec<(bytes::Bytes, bytes::Bytes)> = (0..=cachet::cluster::replica::MAX_BATCH_KEYS)
        .map(|i| (bytes::Bytes::from(format!("{{m}}{i}")), bytes::Bytes::from_static(b"v")))
        .collect();
    match client.mset(pairs).await {
        Err(ClientError::Server(reply)) => {
            assert_eq!(reply.code, ErrorCode::TooLarge, "{reply:?}");
            assert!(reply.message.contains("at most 65536 keys"), "{reply:?}");
        }
        other => panic!("an MSET of 65,537 keys: {other:?}"),
    }
    client.close().await;
}

/// Every data command, per-member command and admin command of the SDK
/// through a cluster client given one member (the others learned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sdk_command_works_through_a_cluster_client() {
    use cachet_client::{AdminCommand, Condition, SetOptions, TtlChange, TtlState};
    let token_file = std::env::temp_dir().join(format!("cachet-cluster-sdk-token-{}", std::process::id()));
    std::fs::write(&token_file, "open-sesame\n").expect("token file");
    let token_flag = ["--admin-token-file", token_file.to_str().expect("utf-8")];
    let cluster = TestCluster::start_with(3, 3, "sdk-all", &token_flag);
    let observer = cluster.client();
    cluster.wait_healthy(&observer, Duration::from_secs(30)).await;
    let client = cluster.client_of(&[0]);
    let b = |s: &str| Some(bytes::Bytes::copy_from_slice(s.as_bytes()));
    let remaining = |state: TtlState| match state {
        TtlState::Remaining(ms) => ms,
        other => panic!("expected a TTL, got {other:?}"),
    };

    assert_eq!(client.incr("counter", 5).await.expect("INCR"), 5);
    assert_eq!(client.incr("counter", -2).await.expect("DECR"), 3);
    assert_eq!(observer.get("counter").await.expect("read"), b("3"));
    client.set("word", "x").await.expect("SET");
    let err = client.incr("word", 1).await.expect_err("not an integer");
    assert!(matches!(&err, ClientError::Server(r) if r.code == ErrorCode::WrongType), "{err}");
    assert_eq!(client.append("log", "a").await.expect("APPEND"), 1);
    assert_eq!(client.append("log", "bc").await.expect("APPEND"), 3);
    assert_eq!(client.strlen("log").await.expect("STRLEN"), 3);
    assert_eq!(client.strlen("nothing").await.expect("STRLEN"), 0);

    let nx = SetOptions { condition: Condition::IfAbsent, ..SetOptions::default() };
    let xx = SetOptions { condition: Condition::IfPresent, ..SetOptions::default() };
    assert!(client.set_with("once", "1", nx).await.expect("SET NX"));
    assert!(!client.set_with("once", "2", nx).await.expect("SET NX"));
    assert!(client.set_with("once", "3", xx).await.expect("SET XX"));
    assert!(!client.set_with("never", "1", xx).await.expect("SET XX"));
    assert_eq!(client.set_get("once", "4", SetOptions::default()).await.expect("SET GET"), b("3"));
    assert_eq!(client.set_get("fresh", "1", nx).await.expect("SET NX GET"), None);
    assert_eq!(client.get("fresh").await.expect("GET"), b("1"));

    let ex = SetOptions { ttl: Some(Duration::from_secs(100)), ..SetOptions::default() };
    assert!(client.set_with("session", "s", ex).await.expect("SET EX"));
    assert!((90_000..=100_000).contains(&remaining(client.ttl("session").await.expect("TTL"))));
    assert!(client.set_keep_ttl("session", "t", SetOptions::default()).await.expect("SET KEEPTTL"));
    assert!(remaining(client.ttl("session").await.expect("TTL")) > 80_000, "KEEPTTL kept it");
    assert_eq!(client.get("session").await.expect("GET"), b("t"));
    let kept = client.set_get_keep_ttl("session", "u", SetOptions::default()).await.expect("SET KEEPTTL GET");
    assert_eq!(kept, b("t"));
    assert!(remaining(client.ttl("session").await.expect("TTL")) > 80_000, "KEEPTTL GET kept it");
    assert_eq!(client.get("session").await.expect("GET"), b("u"));
    assert!(client.persist("session").await.expect("PERSIST"));
    assert_eq!(client.ttl("session").await.expect("TTL"), TtlState::Persistent);
    assert!(!client.persist("session").await.expect("PERSIST"), "no TTL left to remove");
    assert!(client.expire("session", Duration::from_secs(50)).await.expect("EXPIRE"));
    assert!(!client.expire("nothing", Duration::from_secs(50)).await.expect("EXPIRE"));
    assert!(remaining(client.ttl("session").await.expect("TTL")) <= 50_000);
    assert_eq!(client.getex("session", TtlChange::Persist).await.expect("GETEX PERSIST"), b("u"));
    assert_eq!(client.ttl("session").await.expect("TTL"), TtlState::Persistent);
    assert_eq!(client.getex("session", TtlChange::Set(20_000)).await.expect("GETEX PX"), b("u"));
    assert!(remaining(client.ttl("session").await.expect("TTL")) <= 20_000);
    assert_eq!(client.getex("nothing", TtlChange::Keep).await.expect("GETEX"), None);
    assert_eq!(client.getdel("once").await.expect("GETDEL"), b("4"));
    assert_eq!(client.getdel("once").await.expect("GETDEL"), None);
    assert_eq!(client.exists(&["once", "log", "counter"]).await.expect("EXISTS"), 2);
    assert!(client.delete("log").await.expect("DEL"));

    let loads = AtomicU64::new(0);
    let load = || async {
        loads.fetch_add(1, Ordering::Relaxed);
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"loaded"))
    };
    let ttl = Some(Duration::from_secs(60));
    assert_eq!(client.get_or_load("lazy", ttl, load).await.expect("loaded").as_ref(), b"loaded");
    assert_eq!(client.get_or_load("lazy", ttl, load).await.expect("cached").as_ref(), b"loaded");
    assert_eq!(loads.load(Ordering::Relaxed), 1, "loaded once");
    assert!(remaining(observer.ttl("lazy").await.expect("TTL")) <= 60_000);

    // Per member: the two learned members are 1 and 2 (node order).
    let stats = client.stats().await;
    assert_eq!(stats.len(), 3, "member 0 and the two learned");
    for (i, stats) in stats.into_iter().enumerate() {
        assert_eq!(stats.expect("stats").cluster.expect("cluster").node_id as usize, i);
        client.ping_of(i).await.expect("PING");
        // RF=3: every member holds every record (deletions included).
        assert!(client.dbsize_of(i).await.expect("DBSIZE") >= 7, "member {i}");
    }
    // The plain client's new commands on a clustered member.
    let plain = cachet_client::Client::connect(cluster.client_config(1)).await.expect("connect");
    assert_eq!(plain.append("plain", "ab").await.expect("APPEND"), 2);
    assert_eq!(plain.strlen("plain").await.expect("STRLEN"), 2);
    assert_eq!(plain.set_get("plain", "cd", SetOptions::default()).await.expect("SET GET"), b("ab"));
    assert!(plain.set_keep_ttl("plain", "e", xx).await.expect("SET XX KEEPTTL"));
    assert_eq!(plain.set_get_keep_ttl("plain", "ef", xx).await.expect("SET XX KEEPTTL GET"), b("e"));
    assert_eq!(plain.getex("plain", TtlChange::Set(30_000)).await.expect("GETEX"), b("ef"));
    assert!(plain.persist("plain").await.expect("PERSIST"));
    assert_eq!(plain.getdel("plain").await.expect("GETDEL"), b("ef"));
    assert!(plain.dbsize().await.expect("DBSIZE") >= 7);
    // FLUSHALL drops every member's records (each key once per copy).
    let dropped = plain.flush_all().await.expect("FLUSHALL");
    assert!(dropped >= 7, "{dropped} records dropped");
    assert_eq!(plain.dbsize().await.expect("DBSIZE"), 0);
    plain.close().await;

    let token = "open-sesame";
    assert!(!client.admin_stats_of(2, token).await.expect("admin stats").hot_keys_hidden);
    let sieve = std::fs::read(concat!(env!("OUT_DIR"), "/guests/sieve.wasm")).expect("sieve.wasm");
    let sieve = bytes::Bytes::from(sieve);
    let loaded = client.load_module_each(token, "sieve", "9", Vec::new(), sieve.clone(), None, None).await;
    assert_eq!(loaded.len(), 3);
    for (i, listing) in loaded.into_iter().enumerate() {
        let listing = listing.unwrap_or_else(|e| panic!("member {i}: {e}"));
        assert!(listing.modules.iter().any(|m| m.name == "sieve" && m.version == "9"), "member {i}");
    }
    let listing = client.load_module_of(1, token, "sieve", "10", Vec::new(), sieve, None, None).await.expect("load");
    assert!(listing.modules.iter().any(|m| m.name == "sieve" && m.version == "10"));
    let activate = AdminCommand::Activate { name: "sieve".into(), version: "9".into(), config: None };
    for (i, listing) in client.admin_each(token, activate).await.into_iter().enumerate() {
        assert_eq!(listing.unwrap_or_else(|e| panic!("member {i}: {e}")).active, "sieve@9", "member {i}");
    }
    assert_eq!(client.admin_of(2, token, AdminCommand::List).await.expect("list").active, "sieve@9");
    let listing = client.admin_of(0, token, AdminCommand::List).await.expect("list");
    assert!(!listing.modules.iter().any(|m| m.version == "10"), "sieve@10 went to member 1 only");
    // Last: a wrong token starts the member's back-off on guesses.
    let wrong = client.admin_of(2, "guess", AdminCommand::List).await.expect_err("wrong token");
    assert!(matches!(&wrong, ClientError::Server(r) if r.code == ErrorCode::Unauthorized), "{wrong}");
    client.close().await;
    observer.close().await;
    let _ = std::fs::remove_file(&token_file);
}

/// A read-modify-write is sent to one member only once it may have
/// reached it (a second INCR could apply twice); a plain write is retried
/// on another owner; and a read-modify-write that surely never left (the
/// member's connection was already gone) goes to the next owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_modify_write_is_retried_only_when_it_surely_never_left() {
    let mut cluster = TestCluster::start(3, 3, "sdk-once");
    let observer = cluster.client();
    cluster.wait_healthy(&observer, Duration::from_secs(30)).await;
    let ring = ring_of(&observer).await;
    let keys = sdk_keys_owned_by(&ring, 3, 2, "once", 3);
    let (stopped_key, retried_key, dead_key) = (&keys[0], &keys[1], &keys[2]);
    let (client, second) = (cluster.client(), cluster.client());
    // Rings fetched and connections to member 2 open before it stops.
    for c in [&client, &second] {
        assert_eq!(c.get(stopped_key).await.expect("read from member 2"), None);
    }
    cluster.members[2].signal("STOP");
    let started = Instant::now();
    let err = client.incr(stopped_key, 1).await.expect_err("member 2 is stopped");
    let took = started.elapsed();
    assert!(matches!(err, ClientError::Timeout(_) | ClientError::Connection(_)), "{err}");
    assert!(took < Duration::from_millis(2_500), "one attempt, not retried elsewhere: {err} after {took:?}");
    second.set(retried_key, "v").await.expect("a plain SET is retried on another owner");
    cluster.members[2].signal("CONT");
    cluster.wait_healthy(&observer, Duration::from_secs(30)).await;
    let counter = observer.at(Consistency::Quorum).get(stopped_key).await.expect("read");
    assert_ne!(counter.as_deref(), Some(&b"2"[..]), "the INCR applied at most once");
    assert_eq!(observer.get(retried_key).await.expect("read").as_deref(), Some(&b"v"[..]));

    let configs = (0..3)
        .map(|i| {
            let mut config = cluster.client_config(i);
            config.dead_after = Duration::from_millis(500);
            config
        })
        .collect();
    let retry = RetryPolicy { attempts: 2, backoff: Duration::from_millis(10) };
    let quick = ClusterClient::new(configs, retry).expect("cluster client");
    assert_eq!(quick.get(dead_key).await.expect("read from member 2"), None);
    let routed = Instant::now();
    cluster.members[2].kill();
    wait_down(&observer, 0, 2).await;
    wait_down(&observer, 1, 2).await;
    // Past dead_after: quick's connection to member 2 is closed.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(routed.elapsed() < Duration::from_secs(9), "quick's ring (10 s) must still send to member 2 first");
    assert_eq!(quick.incr(dead_key, 1).await.expect("never sent to member 2, so sent to the next owner"), 1);
    quick.close().await;
    client.close().await;
    second.close().await;
    observer.close().await;
}

/// On certificates from `cachet cert issue` the members require a client
/// certificate: a cluster client given member 0 alone presents its own to
/// the members it learns, and reaches them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_client_given_one_member_reaches_the_others_on_certificates() {
    let cluster = TestCluster::start_on_certificates(3, "sdk-learn-certs", &[0, 1, 2]);
    let observer = cluster.client();
    cluster.wait_healthy(&observer, Duration::from_secs(30)).await;
    let ring = ring_of(&observer).await;
    let one = cluster.client_of(&[0]);
    let stats = one.stats().await;
    assert_eq!(stats.len(), 3, "member 0 and the two learned");
    for (i, stats) in stats.into_iter().enumerate() {
        let stats = stats.unwrap_or_else(|e| panic!("member {i} over TLS with the client certificate: {e}"));
        assert_eq!(stats.cluster.expect("cluster").node_id as usize, i);
    }
    for owner in 0..3 {
        let key = &sdk_keys_owned_by(&ring, 3, owner, "certs", 1)[0];
        let before = sdk_coordinated(&observer).await;
        one.set(key, "v").await.expect("write");
        let after = sdk_coordinated(&observer).await;
        assert_eq!(after[owner] - before[owner], 1, "member {owner} coordinated its own key");
    }
    one.close().await;
    observer.close().await;
}

/// Every reachable member's view of the metadata log, by member index
/// (`None` for one that does not answer).
async fn meta_views(cluster: &TestCluster, members: &[usize]) -> Vec<Option<cachet_proto::MetaStats>> {
    let mut views = Vec::new();
    for &i in members {
        let alone = cluster.client_of(&[i]);
        let view = match tokio::time::timeout(Duration::from_secs(2), alone.stats_of(0)).await {
            Ok(Ok(stats)) => stats.cluster.and_then(|c| c.meta),
            _ => None,
        };
        alone.close().await;
        views.push(view);
    }
    views
}

/// Waits (at most `limit`) until `members` agree on one leader, all run
/// the log at the same applied index, and `check` holds for that view.
async fn wait_meta(
    cluster: &TestCluster,
    members: &[usize],
    limit: Duration,
    what: &str,
    check: impl Fn(&cachet_proto::MetaStats) -> bool,
) -> (Duration, cachet_proto::MetaStats) {
    let start = Instant::now();
    loop {
        let views = meta_views(cluster, members).await;
        let all: Option<Vec<_>> = views.iter().cloned().collect();
        if let Some(all) = all {
            let agreed = all.iter().all(|v| {
                v.phase == "running" && v.leader.is_some() && v.leader == all[0].leader && v.applied == all[0].applied
            });
            if agreed && all.iter().all(&check) {
                return (start.elapsed(), all[0].clone());
            }
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}: {views:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn member_state(view: &cachet_proto::MetaStats, node: u32) -> Option<(&str, u64)> {
    view.members.iter().find(|m| m.node == node).map(|m| (m.state.as_str(), m.raft_id))
}

/// The metadata log on real processes (issue 20, in shadow: it records
/// membership beside the failure detector's ring, not steering it yet):
/// founded once by the founders, one leader, a SIGKILLed leader replaced
/// and recorded down, a member restarted with its data directory keeping
/// its identity, one restarted without rejoining as a new incarnation, and
/// a member joining through `--seeds`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_log_runs_on_real_members() {
    let mut cluster = TestCluster::start(3, 3, "meta");
    let serving_all = |n: u32| {
        move |v: &cachet_proto::MetaStats| {
            v.members.len() == n as usize && v.members.iter().all(|m| m.state == "serving" && !m.client.is_empty())
        }
    };
    let (took, view) = wait_meta(&cluster, &[0, 1, 2], Duration::from_secs(20), "founding", serving_all(3)).await;
    eprintln!("founded and every client address announced in {took:?}: {view:?}");
    assert!(view.members.iter().all(|m| m.raft_id >> 32 == 0 && m.voter), "founders at generation 0, voters");
    let first_term = view.term;

    // The leader is killed: the others elect another and record it down.
    let leader = view.leader.expect("a leader") as usize;
    let ids: Vec<u64> = view.members.iter().map(|m| m.raft_id).collect();
    cluster.members[leader].kill();
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (took, view) = wait_meta(&cluster, &others, Duration::from_secs(15), "a new leader", |v| {
        v.leader != Some(leader as u32) && member_state(v, leader as u32).is_some_and(|(s, _)| s == "down")
    })
    .await;
    eprintln!("leader {leader} killed: new leader {:?} and {leader} recorded down in {took:?}", view.leader);
    assert!(view.term > first_term);

    // Restarted with its data directory: the same identity, serving again.
    cluster.members[leader].spawn();
    let (took, view) =
        wait_meta(&cluster, &[0, 1, 2], Duration::from_secs(20), "the restarted member", serving_all(3)).await;
    eprintln!("member {leader} restarted with its log: serving again in {took:?}");
    assert_eq!(view.members.iter().map(|m| m.raft_id).collect::<Vec<_>>(), ids, "identities kept");

    // Restarted without its data directory: a new incarnation replaces the
    // old one (it never votes under the identity whose vote it forgot).
    let wiped = (leader + 1) % 3;
    cluster.members[wiped].kill();
    std::fs::remove_dir_all(cluster.root.join(format!("node{wiped}"))).expect("wipe the data directory");
    cluster.members[wiped].spawn();
    let (took, view) = wait_meta(&cluster, &[0, 1, 2], Duration::from_secs(30), "the wiped member", |v| {
        serving_all(3)(v) && member_state(v, wiped as u32).is_some_and(|(_, id)| id >> 32 != 0)
    })
    .await;
    eprintln!("member {wiped} wiped: back as raft id {:?} in {took:?}", member_state(&view, wiped as u32));

    // A fourth member joins through the seeds.
    cluster.join();
    let (took, view) = wait_meta(&cluster, &[0, 1, 2, 3], Duration::from_secs(30), "the joiner", serving_all(4)).await;
    eprintln!("member 3 joined in {took:?}");
    assert!(view.members.iter().all(|m| m.voter), "{view:?}");
    assert_eq!(view.refused, 0, "{view:?}");
}

/// A founded 3-member cluster whose members take admin commands with
/// `token` (written to a file that lives as long as the test's process).
async fn policy_cluster(tag: &str, token: &str) -> TestCluster {
    let token_file = std::env::temp_dir().join(format!("cachet-cluster-{tag}-token-{}", std::process::id()));
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let cluster = TestCluster::start_with(3, 3, tag, &["--admin-token-file", token_file.to_str().expect("utf-8")]);
    wait_meta(&cluster, &[0, 1, 2], Duration::from_secs(20), "founding", |v| {
        v.members.iter().all(|m| m.state == "serving")
    })
    .await;
    cluster
}

/// Polls member `i`'s policy listing (bounded) until its active module is
/// `label`; returns how long that took.
async fn wait_active(cluster: &TestCluster, i: usize, token: &str, label: &str, limit: Duration) -> Duration {
    use cachet_client::AdminCommand;
    let start = Instant::now();
    loop {
        let alone = cluster.client_of(&[i]);
        let active =
            match tokio::time::timeout(Duration::from_secs(2), alone.admin_of(0, token, AdminCommand::List)).await {
                Ok(Ok(listing)) => Some(listing.active),
                _ => None,
            };
        alone.close().await;
        if active.as_deref() == Some(label) {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "member {i} runs {active:?}, not {label}, after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One `activate` through any member changes every member (issue 20): a
/// module loaded through member 1 is stored in the cluster's registry by
/// its hash, activated through member 2 while member 0 is down, runs on
/// every member up, and member 0, restarted, fetches the module from a
/// peer and runs it too; a rollback through member 0 reaches them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_activate_through_any_member_changes_every_member() {
    use cachet_client::AdminCommand;
    let token = "rollout";
    let mut cluster = policy_cluster("meta-policy", token).await;
    let client = cluster.client();
    let sieve = bytes::Bytes::from(std::fs::read(concat!(env!("OUT_DIR"), "/guests/sieve.wasm")).expect("sieve.wasm"));
    let loaded = client.load_module_of(1, token, "sieve", "7", Vec::new(), sieve, None, None).await.expect("load");
    assert!(loaded.message.contains("cluster's registry"), "{}", loaded.message);

    cluster.members[0].kill();
    let activate = AdminCommand::Activate { name: "sieve".into(), version: "7".into(), config: None };
    let started = Instant::now();
    // Member 0 may have led the log: the activate then waits for an
    // election (and a proposal retry) as well, longer than the 1.5 s the
    // other requests get.
    let configs = (0..3)
        .map(|i| {
            let mut config = cluster.client_config(i);
            config.timeout = Duration::from_secs(15);
            config
        })
        .collect();
    let patient = ClusterClient::new(configs, RetryPolicy::default()).expect("cluster client");
    let listing = patient.admin_of(2, token, activate).await.expect("activate through member 2");
    patient.close().await;
    eprintln!("activate through member 2 answered in {:?}: {}", started.elapsed(), listing.message);
    assert_eq!(listing.active, "sieve@7", "member 2 fetched the module from member 1 and runs it");
    let took = wait_active(&cluster, 1, token, "sieve@7", Duration::from_secs(10)).await;
    eprintln!("member 1 runs sieve@7 {took:?} after the answer");

    // Member 0 missed it: back up, it applies the log and fetches the
    // module, and serves only once it runs it: the first stats that show
    // it on a slot table show it on sieve@7.
    cluster.members[0].spawn();
    let restarted = Instant::now();
    loop {
        if let Ok(stats) = client.stats_of(0).await
            && stats.cluster.as_ref().is_some_and(|c| c.ring_epoch > 0)
        {
            let running = format!("{}@{}", stats.policy, stats.policy_version);
            assert_eq!(running, "sieve@7", "member 0 served before it ran the log's policy");
            break;
        }
        assert!(restarted.elapsed() < Duration::from_secs(30), "member 0 never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = wait_active(&cluster, 0, token, "sieve@7", Duration::from_secs(30)).await;
    eprintln!("member 0, restarted, runs sieve@7 after {took:?}");

    // A bundled module through member 0, then a rollback through member 1.
    let version = env!("CARGO_PKG_VERSION");
    let lru = AdminCommand::Activate { name: "lru".into(), version: version.into(), config: None };
    client.admin_of(0, token, lru).await.expect("activate lru");
    let lru_label = format!("lru@{version}");
    for i in 0..3 {
        wait_active(&cluster, i, token, &lru_label, Duration::from_secs(10)).await;
    }
    let rolled = client.admin_of(1, token, AdminCommand::Rollback).await.expect("rollback");
    assert_eq!(rolled.active, "sieve@7", "{}", rolled.message);
    for i in 0..3 {
        wait_active(&cluster, i, token, "sieve@7", Duration::from_secs(10)).await;
    }
    let (_, view) = wait_meta(&cluster, &[0, 1, 2], Duration::from_secs(10), "the log's policy", |v| {
        v.active_policy.as_deref() == Some("sieve@7")
    })
    .await;
    assert_eq!(view.refused, 0, "{view:?}");
    // `cachet policy list` through one member shows what every member runs.
    let out = Command::new(env!("CARGO_BIN_EXE_cachet"))
        .args(["policy", "list", "--server", &cluster.members[2].client_addr, "--dev-ca"])
        .arg(&cluster.ca)
        .env("CACHET_ADMIN_TOKEN", token)
        .output()
        .expect("cachet policy list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    for i in 0..3 {
        assert!(text.contains(&format!("member {i:<3} runs sieve@7")), "member {i} in:\n{text}");
    }
    // Refusals name the problem: an unknown module.
    let unknown = AdminCommand::Activate { name: "nosuch".into(), version: "1".into(), config: None };
    let err = client.admin_of(2, token, unknown).await.expect_err("unknown module");
    assert!(err.to_string().contains("nosuch@1"), "{err}");
    client.close().await;
}

/// A canary (issue 20): `activate --canary` runs a module on some members
/// for a window, then the metadata log's leader rolls it out to every
/// member or back by the canary members' hit ratio against the others',
/// and says why. With no traffic it cannot judge and rolls back; with
/// traffic it decides on the hit ratios, and every member follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_is_rolled_out_or_back_by_the_leader() {
    use cachet_client::AdminCommand;
    let token = "canary";
    let cluster = policy_cluster("meta-canary", token).await;
    let client = cluster.client();
    let before = client.admin_of(0, token, AdminCommand::List).await.expect("list").active;
    let sieve = bytes::Bytes::from(std::fs::read(concat!(env!("OUT_DIR"), "/guests/sieve.wasm")).expect("sieve.wasm"));
    client.load_module_of(0, token, "sieve", "8", Vec::new(), sieve, None, None).await.expect("load");
    let canary = |window_ms| AdminCommand::Canary {
        name: "sieve".into(),
        version: "8".into(),
        config: None,
        members: 1,
        window_ms,
    };

    // No traffic: nothing to judge by, so back it goes.
    let started = client.admin_of(2, token, canary(1_500)).await.expect("canary starts");
    assert!(started.message.contains("canary"), "{}", started.message);
    wait_active(&cluster, 0, token, "sieve@8", Duration::from_secs(10)).await;
    let (took, view) = wait_meta(&cluster, &[0, 1, 2], Duration::from_secs(15), "a decision", |v| {
        v.canary.is_none() && v.last_canary.is_some()
    })
    .await;
    let decision = view.last_canary.clone().expect("decided");
    eprintln!("decided {took:?} after the canary's window: {decision}");
    assert!(decision.contains("rolled back") && decision.contains("too little traffic"), "{decision}");
    for i in 0..3 {
        wait_active(&cluster, i, token, &before, Duration::from_secs(10)).await;
    }

    // With traffic every policy serves alike, it rolls out: the keys are
    // written before the canary starts (a write's read of the old record
    // is a miss), then only read, and every key fits, so every member's
    // hit ratio over the window is 1.
    for k in 0..200 {
        client.set(format!("key{k}"), "v").await.expect("SET");
    }
    // The bundled LRU this time (the test guest `sieve` is not a full
    // policy: its hit ratio trails by a few points even when every key
    // fits, which is the first case's decision to make, not this one's).
    let version = env!("CARGO_PKG_VERSION");
    let lru = AdminCommand::Canary {
        name: "lru".into(),
        version: version.into(),
        config: None,
        members: 1,
        window_ms: 3_000,
    };
    client.admin_of(1, token, lru).await.expect("canary starts again");
    let deadline = Instant::now() + Duration::from_secs(20);
    let decision = loop {
        for k in 0..200 {
            client.get(format!("key{k}")).await.expect("GET");
        }
        let views = meta_views(&cluster, &[0]).await;
        if let Some(Some(view)) = views.first()
            && view.canary.is_none()
            && let Some(last) = &view.last_canary
            && !last.contains("too little traffic")
        {
            break last.clone();
        }
        assert!(Instant::now() < deadline, "no decision on the second canary: {views:?}");
    };
    eprintln!("second canary: {decision}");
    // Judged on figures, and every member follows the decision. (Which way
    // it goes depends on the hit ratios measured: about 0.98 on both sides
    // here, within the 0.005 tolerance most runs; the decision logic itself
    // is pinned by the state machine's unit test.)
    assert!(decision.contains("hit ratio") && decision.contains("lookups"), "{decision}");
    let expected = if decision.contains("rolled out") { format!("lru@{version}") } else { before.clone() };
    for i in 0..3 {
        wait_active(&cluster, i, token, &expected, Duration::from_secs(10)).await;
    }
    client.close().await;
}

/// A module that keeps faulting on one member is quarantined on every
/// member (issue 20): the member whose supervisor gives up records it in
/// the metadata log, every member goes back to the previous cluster-wide
/// policy, and activating it again is refused through any member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_on_one_member_applies_to_every_member() {
    use cachet_client::AdminCommand;
    let token = "quarantine";
    let cluster = policy_cluster("meta-quarantine", token).await;
    let client = cluster.client();
    let sieve = bytes::Bytes::from(std::fs::read(concat!(env!("OUT_DIR"), "/guests/sieve.wasm")).expect("sieve.wasm"));
    client.load_module_of(0, token, "sieve", "5", Vec::new(), sieve, None, None).await.expect("load sieve");
    let activate =
        |name: &str, version: &str| AdminCommand::Activate { name: name.into(), version: version.into(), config: None };
    client.admin_of(1, token, activate("sieve", "5")).await.expect("activate sieve");
    // Passes the load-time check, then panics once it has seen 5,000
    // events (and again on every rebuild, which replays more than that).
    let config = vec![("mode".to_string(), "panic".to_string()), ("after".to_string(), "5000".to_string())];
    let hostile = bytes::Bytes::from(cachet_tests::hostile_component());
    client.load_module_of(2, token, "hostile", "1", config, hostile, None, None).await.expect("load hostile");
    let listing = client.admin_of(0, token, activate("hostile", "1")).await.expect("activate hostile");
    assert_eq!(listing.active, "hostile@1");
    for i in 0..3 {
        wait_active(&cluster, i, token, "hostile@1", Duration::from_secs(10)).await;
    }
    // Every write reaches every member (RF 3): their shards see the events.
    for batch in 0..64 {
        let pairs = (batch * 250..(batch + 1) * 250)
            .map(|i| (bytes::Bytes::from(format!("k{i}")), bytes::Bytes::from_static(b"v")))
            .collect();
        client.mset(pairs).await.expect("every write succeeds");
    }
    let (took, view) = wait_meta(&cluster, &[0, 1, 2], Duration::from_secs(40), "the quarantine", |v| {
        v.active_policy.as_deref() == Some("sieve@5")
    })
    .await;
    eprintln!("quarantined cluster-wide {took:?} after the writes: {view:?}");
    for i in 0..3 {
        wait_active(&cluster, i, token, "sieve@5", Duration::from_secs(10)).await;
    }
    let err = client.admin_of(1, token, activate("hostile", "1")).await.expect_err("quarantined");
    assert!(err.to_string().contains("quarantined"), "{err}");
    for i in (0..16_000).step_by(97) {
        assert!(client.get(format!("k{i}")).await.expect("get").is_some(), "k{i} survived the faults");
    }
    client.close().await;
}

/// Decommission (issue 20): the log's leader itself is told to leave. It
/// hands leadership over, the new leader moves its slots to the other
/// three (each re-syncs what it gains) and removes it from the log; then
/// it is stopped, and every key is still read at QUORUM and written at
/// ALL (every owner of every slot is up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_member_hands_its_slots_off_and_leaves_the_log() {
    use cachet_client::AdminCommand;
    let token = "decommission";
    let token_file = std::env::temp_dir().join(format!("cachet-cluster-decommission-token-{}", std::process::id()));
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let mut cluster =
        TestCluster::start_with(4, 3, "decommission", &["--admin-token-file", token_file.to_str().expect("utf-8")]);
    let client = cluster.client();
    cluster.wait_healthy(&client, Duration::from_secs(30)).await;
    let quorum = client.at(Consistency::Quorum);
    for i in 0..300 {
        quorum.set(format!("k{i}"), format!("v{i}")).await.expect("write");
    }
    let (_, view) = wait_meta(&cluster, &[0, 1, 2, 3], Duration::from_secs(10), "a leader", |_| true).await;
    let leaver = view.leader.expect("a leader") as usize;
    let others: Vec<usize> = (0..4).filter(|&i| i != leaver).collect();
    let started = Instant::now();
    let reply = client
        .admin_of(others[0], token, AdminCommand::Decommission { node: leaver as u32 })
        .await
        .expect("decommission through another member");
    assert!(reply.message.contains("is leaving"), "{}", reply.message);
    let (took, view) = wait_meta(&cluster, &others, Duration::from_secs(60), "the leaver removed", |v| {
        member_state(v, leaver as u32).map(|(state, _)| state) == Some("removed")
    })
    .await;
    assert_ne!(view.leader, Some(leaver as u32), "leadership moved on: {view:?}");
    eprintln!("member {leaver} (the leader) decommissioned: removed from the log {took:?} after the command");
    let survivors = cluster.client_of(&others);
    for &i in &others {
        let c = survivors.stats_of(others.iter().position(|&o| o == i).expect("index")).await.expect("stats");
        let c = c.cluster.expect("cluster");
        assert!(c.slots.iter().all(|r| !r.owners.contains(&(leaver as u32)) && r.owners.len() == 3), "{c:?}");
        assert!(c.synced, "member {i} re-synced what it gained: {c:?}");
    }
    eprintln!("slots handed off and re-synced {:?} after the command", started.elapsed());
    cluster.members[leaver].kill();
    for i in 0..300 {
        let read = survivors.at(Consistency::Quorum).get(format!("k{i}")).await.expect("QUORUM read");
        assert_eq!(read.as_deref(), Some(format!("v{i}").as_bytes()), "k{i}");
    }
    for i in 0..50 {
        survivors.at(Consistency::All).set(format!("k{i}"), "w").await.expect("ALL write: every owner is up");
    }
    // An unknown member is refused by name.
    let err = survivors.admin_of(0, token, AdminCommand::Decommission { node: 42 }).await.expect_err("no member 42");
    assert!(err.to_string().contains("42"), "{err}");
    survivors.close().await;
    client.close().await;
}
