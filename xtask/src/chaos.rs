//! `cargo xtask chaos`: a cluster of real processes under faults, with a
//! history a checker reads.
//!
//! Five members on 127.0.0.1-5, RF=3, QUORUM reads and writes through every
//! member's RESP port. Writers each own their keys and write increasing
//! numbers (single-writer registers); readers read them. Every
//! `--fault-every` seconds one fault: SIGKILL and restart, SIGSTOP and
//! SIGCONT, a member cut off (iptables, both ways, peer traffic), a 2|3
//! split, or one-way packet loss (30%) from one member. Then everything
//! heals and the checker reads the history:
//!
//! - **lost**: a key whose final QUORUM value (read through every member)
//!   is older than a write acknowledged at QUORUM, and is not the value of
//!   a write that failed (indeterminate, as below: a failed write begun
//!   before the last acknowledged one may take the higher version and
//!   end up the key's value; those keys are counted apart);
//! - **stale**: a QUORUM read that returned a value older than a write
//!   acknowledged before the read began. A write that failed (timed out)
//!   is indeterminate, as in any linearizability checker: it may take
//!   effect at any moment after it began, so a read that returns its value
//!   after it began is not stale;
//! - **availability**: the share of requests to members under no fault
//!   that succeeded; and the share of those whose key also had a quorum
//!   of its owners (2 of 3, by the slot table) under no fault: a key with
//!   two of its three owners cut off or stopped cannot be served at
//!   QUORUM without risking a stale read or a lost write, so only this
//!   second figure is held to 99.9%.
//!
//! Partitions need iptables (`.ci/run` installs it); without it, those
//! faults are skipped and the report says so. Rules live in a chain of
//! their own, removed at the end.

use super::cluster::LocalCluster;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MEMBERS: usize = 5;
const WRITERS: usize = 4;
const KEYS_PER_WRITER: usize = 5;
const READERS: usize = 3;
const CHAIN: &str = "CACHET_CHAOS";

/// What a run found.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) writes_acked: u64,
    pub(crate) reads: u64,
    pub(crate) lost: u64,
    /// Keys whose final value is that of a write that failed, begun before
    /// the last acknowledged one (indeterminate: not a loss).
    pub(crate) resurrected: u64,
    pub(crate) stale: u64,
    pub(crate) healthy_ok: u64,
    pub(crate) healthy_failed: u64,
    /// Requests to members under no fault for keys with a quorum of
    /// owners under no fault, that succeeded and that failed.
    pub(crate) servable_ok: u64,
    pub(crate) servable_failed: u64,
    pub(crate) faults: Vec<String>,
    /// Faults (kills, pauses, cut-offs, splits) a healthy member's failure
    /// detector saw: proof they took effect.
    pub(crate) seen: usize,
    /// Faults that should have been seen.
    pub(crate) seeable: usize,
    pub(crate) partitions: bool,
}

impl Report {
    /// The share of requests to members under no fault that succeeded.
    pub(crate) fn availability(&self) -> f64 {
        self.healthy_ok as f64 / (self.healthy_ok + self.healthy_failed).max(1) as f64
    }

    /// The share of requests that succeeded among those to members under no
    /// fault whose key had a quorum of owners under no fault.
    pub(crate) fn servable_availability(&self) -> f64 {
        self.servable_ok as f64 / (self.servable_ok + self.servable_failed).max(1) as f64
    }
}

/// One request's record.
struct Op {
    key: usize,
    start: Instant,
    end: Instant,
    /// A write's value, or a read's answer (`None`: missing).
    value: Option<u64>,
    write: bool,
    ok: bool,
    member: usize,
    /// Which members were under a fault when it began (bit per member).
    faulted: u8,
}

/// A minimal RESP client: one connection, SET and GET of numbers.
struct Resp {
    stream: BufReader<TcpStream>,
}

impl Resp {
    fn connect(addr: &str) -> Result<Self> {
        let addr = addr.parse()?;
        let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_millis(1_500)))?;
        stream.set_write_timeout(Some(Duration::from_millis(500)))?;
        stream.set_nodelay(true)?;
        Ok(Self { stream: BufReader::new(stream) })
    }

    fn command(&mut self, parts: &[&str]) -> Result<Option<String>> {
        let mut out = format!("*{}\r\n", parts.len());
        for p in parts {
            out.push_str(&format!("${}\r\n{p}\r\n", p.len()));
        }
        self.stream.get_mut().write_all(out.as_bytes())?;
        let mut line = String::new();
        self.stream.read_line(&mut line)?;
        let line = line.trim_end();
        match line.as_bytes().first() {
            Some(b'+') => Ok(Some(line[1..].to_string())),
            Some(b'-') => bail!("{}", &line[1..]),
            Some(b'$') if line == "$-1" => Ok(None),
            Some(b'$') => {
                let mut value = String::new();
                self.stream.read_line(&mut value)?;
                Ok(Some(value.trim_end().to_string()))
            }
            _ => bail!("unexpected reply {line:?}"),
        }
    }
}

/// Which members are under a fault now (for the availability figure).
type Faulty = Arc<Mutex<Vec<bool>>>;

fn iptables(args: &[&str]) -> bool {
    Command::new("iptables").args(args).output().is_ok_and(|o| o.status.success())
}

/// Drops peer traffic from `from` to `to` (`probability` < 1: that share).
fn cut(from: usize, to: usize, peer_port: u16, probability: Option<f64>) {
    let (src, dst, port) = (format!("127.0.0.{}", from + 1), format!("127.0.0.{}", to + 1), peer_port.to_string());
    let mut args = vec!["-A", CHAIN, "-p", "udp", "-s", &src, "-d", &dst, "--dport", &port];
    let p;
    if let Some(probability) = probability {
        p = probability.to_string();
        args.extend(["-m", "statistic", "--mode", "random", "--probability", &p]);
    }
    args.extend(["-j", "DROP"]);
    iptables(&args);
}

fn heal_network() {
    iptables(&["-F", CHAIN]);
}

/// Runs the chaos for `minutes` with the `cachet` binary; `fault_every`
/// seconds between faults.
pub(crate) fn run(cachet: &Path, root: &Path, minutes: f64, fault_every: f64) -> Result<Report> {
    let resp_port = free_tcp_port()?;
    let resp_arg = format!("{{host}}:{resp_port}");
    let mut cluster = LocalCluster::start(
        cachet,
        root,
        MEMBERS,
        3,
        &["--threads", "1", "--consistency", "quorum", "--resp-listen", &resp_arg, "--max-entries", "100000"],
    )?;
    let peer_port = cluster.peer_port();
    let partitions = iptables(&["-N", CHAIN]) || iptables(&["-F", CHAIN]);
    let partitions = partitions && iptables(&["-I", "INPUT", "-j", CHAIN]);
    let resp: Vec<String> = (0..MEMBERS).map(|i| format!("127.0.0.{}:{resp_port}", i + 1)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let faulty: Faulty = Arc::new(Mutex::new(vec![false; MEMBERS]));
    let history: Arc<Mutex<Vec<Op>>> = Arc::default();
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WRITERS + READERS {
        let (stop, faulty, history, resp) = (stop.clone(), faulty.clone(), history.clone(), resp.clone());
        workers.push(std::thread::spawn(move || worker(w, &resp, &stop, &faulty, &history)));
    }
    let mut report = Report { partitions, ..Report::default() };
    let until = started + Duration::from_secs_f64(minutes * 60.0);
    let mut rng = (started.elapsed().as_nanos() as u64) | 1;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let offset = next(5);
    let mut round = 0;
    let result = (|| -> Result<()> {
        while Instant::now() + Duration::from_secs_f64(fault_every) < until {
            std::thread::sleep(Duration::from_secs_f64(fault_every / 2.0));
            let victim = next(MEMBERS as u64) as usize;
            // Every kind in turn, from a random start.
            let kinds = if partitions { 5 } else { 2 };
            let kind = (round + offset) % kinds;
            round += 1;
            let mark = |members: &[usize], on: bool| {
                if let Ok(mut f) = faulty.lock() {
                    for &m in members {
                        f[m] = on;
                    }
                }
            };
            let hold = Duration::from_secs_f64(fault_every / 2.0);
            let at = started.elapsed().as_secs_f64();
            match kind {
                0 => {
                    mark(&[victim], true);
                    cluster.kill(victim)?;
                    report.seeable += 1;
                    report.seen += usize::from(hold_watching(&cluster, &[victim], hold));
                    cluster.spawn(victim)?;
                    report.faults.push(format!("{at:.0}s SIGKILL {victim}, restarted"));
                }
                1 => {
                    mark(&[victim], true);
                    cluster.signal(victim, "STOP")?;
                    report.seeable += 1;
                    report.seen += usize::from(hold_watching(&cluster, &[victim], hold));
                    cluster.signal(victim, "CONT")?;
                    report.faults.push(format!("{at:.0}s SIGSTOP {victim} {:.0}s", hold.as_secs_f64()));
                }
                2 => {
                    mark(&[victim], true);
                    for other in (0..MEMBERS).filter(|o| *o != victim) {
                        cut(victim, other, peer_port, None);
                        cut(other, victim, peer_port, None);
                    }
                    report.seeable += 1;
                    report.seen += usize::from(hold_watching(&cluster, &[victim], hold));
                    heal_network();
                    report.faults.push(format!("{at:.0}s member {victim} cut off"));
                }
                3 => {
                    let minority = [victim, (victim + 1) % MEMBERS];
                    mark(&minority, true);
                    for &a in &minority {
                        for b in (0..MEMBERS).filter(|b| !minority.contains(b)) {
                            cut(a, b, peer_port, None);
                            cut(b, a, peer_port, None);
                        }
                    }
                    report.seeable += 1;
                    report.seen += usize::from(hold_watching(&cluster, &minority, hold));
                    heal_network();
                    report.faults.push(format!("{at:.0}s split {minority:?} | rest"));
                }
                _ => {
                    mark(&[victim], true);
                    for other in (0..MEMBERS).filter(|o| *o != victim) {
                        cut(victim, other, peer_port, Some(0.3));
                    }
                    std::thread::sleep(hold);
                    heal_network();
                    report.faults.push(format!("{at:.0}s one-way 30% loss from {victim}"));
                }
            }
            // Until it has healed (re-synced), a faulted member's requests
            // do not count for availability.
            let _ = cluster.wait_healthy(Duration::from_secs_f64(fault_every));
            mark(&(0..MEMBERS).collect::<Vec<_>>(), false);
        }
        Ok(())
    })();
    let remaining = until.saturating_duration_since(Instant::now());
    std::thread::sleep(remaining);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    heal_network();
    if partitions {
        iptables(&["-D", "INPUT", "-j", CHAIN]);
        iptables(&["-X", CHAIN]);
    }
    result?;
    cluster.wait_healthy(Duration::from_secs(60)).context("the cluster did not heal within 60 s after the faults")?;
    let history = std::mem::take(&mut *history.lock().map_err(|_| anyhow::anyhow!("history lock"))?);
    // The slot table the members route by (the chaos moves no slots: a
    // member is down for seconds, far less than --replace-after-ms).
    let table = cluster.stats(0).ok().and_then(|s| {
        let ranges: Vec<cachet_proto::SlotRange> = serde_json::from_value(s["cluster"]["slots"].clone()).ok()?;
        cachet_proto::SlotTable::new(s["cluster"]["ring_epoch"].as_u64()?, ranges).ok()
    });
    check(&history, &resp, table.as_ref(), &mut report)?;
    Ok(report)
}

/// Waits out `hold`, watching (through a member not in `down`) whether
/// the failure detector declares a member of `down` down: the fault took
/// effect.
fn hold_watching(cluster: &LocalCluster, down: &[usize], hold: Duration) -> bool {
    let start = Instant::now();
    let Some(observer) = (0..MEMBERS).find(|m| !down.contains(m)) else {
        std::thread::sleep(hold);
        return false;
    };
    let mut seen = false;
    while start.elapsed() < hold {
        if !seen && let Ok(stats) = cluster.stats(observer) {
            seen = down.iter().any(|&d| stats["cluster"]["alive"][d].as_bool() == Some(false));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    seen
}

impl LocalCluster {
    /// The members' peer (QUIC) port.
    fn peer_port(&self) -> u16 {
        self.addrs.first().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse::<u16>().ok()).map_or(0, |p| p + 1)
    }
}

fn free_tcp_port() -> Result<u16> {
    for _ in 0..100 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if (1..=MEMBERS).all(|i| std::net::TcpListener::bind(format!("127.0.0.{i}:{port}")).is_ok()) {
            return Ok(port);
        }
    }
    bail!("no TCP port free on 127.0.0.1-{MEMBERS}")
}

/// A writer (w < WRITERS: its own keys, increasing values) or a reader.
fn worker(w: usize, resp: &[String], stop: &AtomicBool, faulty: &Faulty, history: &Mutex<Vec<Op>>) {
    let mut conns: BTreeMap<usize, Resp> = BTreeMap::new();
    let mut seq = 0u64;
    let mut rng = (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let total_keys = (WRITERS * KEYS_PER_WRITER) as u64;
    while !stop.load(Ordering::Relaxed) {
        let member = next(MEMBERS as u64) as usize;
        let write = w < WRITERS;
        let key =
            if write { w * KEYS_PER_WRITER + next(KEYS_PER_WRITER as u64) as usize } else { next(total_keys) as usize };
        let faulted = faulty
            .lock()
            .map(|f| f.iter().enumerate().filter(|(_, on)| **on).fold(0u8, |m, (i, _)| m | (1 << i)))
            .unwrap_or(u8::MAX);
        let under_fault = faulted & (1 << member) != 0;
        let start = Instant::now();
        if let std::collections::btree_map::Entry::Vacant(slot) = conns.entry(member) {
            match Resp::connect(&resp[member]) {
                Ok(c) => {
                    slot.insert(c);
                }
                Err(_) => {
                    record(
                        history,
                        Op { key, start, end: Instant::now(), value: None, write, ok: false, member, faulted },
                        under_fault,
                    );
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let Some(conn) = conns.get_mut(&member) else { continue };
        let name = format!("chaos:{key}");
        let (ok, value) = if write {
            seq += 1;
            let value = seq.to_string();
            (conn.command(&["SET", &name, &value]).is_ok(), Some(seq))
        } else {
            match conn.command(&["GET", &name]) {
                Ok(v) => (true, v.and_then(|v| v.parse().ok())),
                Err(_) => (false, None),
            }
        };
        if !ok {
            // A timed-out connection may still carry the old reply.
            conns.remove(&member);
        }
        record(history, Op { key, start, end: Instant::now(), value, write, ok, member, faulted }, under_fault);
    }
}

fn record(history: &Mutex<Vec<Op>>, mut op: Op, under_fault: bool) {
    // Requests to faulted members are kept for the checker but marked by
    // offsetting the member (availability counts the others only).
    if under_fault {
        op.member += MEMBERS;
    }
    if let Ok(mut h) = history.lock() {
        h.push(op);
    }
}

/// Reads the history: lost acknowledged writes, stale reads, availability.
fn check(history: &[Op], resp: &[String], table: Option<&cachet_proto::SlotTable>, report: &mut Report) -> Result<()> {
    for op in history {
        if op.member < MEMBERS {
            if op.ok {
                report.healthy_ok += 1;
            } else {
                report.healthy_failed += 1;
            }
            // A quorum (2 of 3) of the key's owners under no fault.
            let owners = table.map(|t| t.owners(format!("chaos:{}", op.key).as_bytes()).to_vec()).unwrap_or_default();
            let faulted_owners = owners.iter().filter(|&&o| op.faulted & (1 << o) != 0).count();
            if owners.len() - faulted_owners > owners.len() / 2 {
                if op.ok {
                    report.servable_ok += 1;
                } else {
                    report.servable_failed += 1;
                }
            }
        }
    }
    // Per key, acknowledged writes by end time.
    let mut acked: BTreeMap<usize, Vec<(Instant, u64)>> = BTreeMap::new();
    for op in history.iter().filter(|o| o.write && o.ok) {
        report.writes_acked += 1;
        if let Some(v) = op.value {
            acked.entry(op.key).or_default().push((op.end, v));
        }
    }
    // By end time, with the newest value acknowledged so far beside each:
    // a read's bound is one binary search away.
    let mut newest: BTreeMap<usize, (Vec<Instant>, Vec<u64>)> = BTreeMap::new();
    for (key, list) in acked.iter_mut() {
        list.sort();
        let mut max = 0;
        let (ends, maxes) = newest.entry(*key).or_default();
        for (end, v) in list.iter() {
            max = max.max(*v);
            ends.push(*end);
            maxes.push(max);
        }
    }
    let t0 = history.iter().map(|o| o.start).min();
    let who = |m: usize| if m >= MEMBERS { format!("member {} (faulted)", m - MEMBERS) } else { format!("member {m}") };
    let at = |t: Instant| t0.map_or(0.0, |t0| t.duration_since(t0).as_secs_f64());
    // Writes that failed, by key and value: indeterminate (see the module
    // docs), so a read may return one once it has begun.
    let failed: BTreeMap<(usize, u64), Instant> =
        history.iter().filter(|o| o.write && !o.ok).filter_map(|o| o.value.map(|v| ((o.key, v), o.start))).collect();
    for op in history.iter().filter(|o| !o.write && o.ok) {
        report.reads += 1;
        let newest_before = newest.get(&op.key).map_or(0, |(ends, maxes)| {
            let i = ends.partition_point(|end| *end < op.start);
            if i == 0 { 0 } else { maxes[i - 1] }
        });
        let indeterminate = op.value.and_then(|v| failed.get(&(op.key, v))).is_some_and(|began| *began < op.end);
        if op.value.unwrap_or(0) < newest_before && !indeterminate {
            report.stale += 1;
            // The first few, for whoever reads the run: when, through
            // which member, and the write it missed.
            if report.stale <= 10 {
                let missed = history
                    .iter()
                    .find(|w| w.write && w.ok && w.key == op.key && w.value == Some(newest_before))
                    .map(|w| format!("acknowledged by {} at {:.3}-{:.3} s", who(w.member), at(w.start), at(w.end)))
                    .unwrap_or_default();
                eprintln!(
                    "stale read: key {} through {} at {:.3}-{:.3} s gave {:?}, {newest_before} was {missed}",
                    op.key,
                    who(op.member),
                    at(op.start),
                    at(op.end),
                    op.value
                );
            }
        }
    }
    // The final values, through every member (each read is a QUORUM read).
    for (key, list) in &acked {
        let last = list.iter().map(|(_, v)| *v).max().unwrap_or(0);
        let mut answers = Vec::new();
        for addr in resp {
            if let Ok(v) = Resp::connect(addr).and_then(|mut c| c.command(&["GET", &format!("chaos:{key}")])) {
                answers.push(v.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0));
            }
        }
        if answers.is_empty() {
            bail!("no member answered the final read of chaos:{key}");
        }
        if answers.iter().any(|v| *v < last) {
            // A failed write is indeterminate: one that began before the
            // last acknowledged write may still take effect after it
            // (its version can be the higher one), and then its value is
            // what every member reads. That is not a lost write.
            let indeterminate = |v: &u64| failed.contains_key(&(*key, *v));
            if answers.iter().all(|v| *v >= last || indeterminate(v)) {
                report.resurrected += 1;
                eprintln!(
                    "final read: key {key} reads {answers:?} through the members, after {last} was acknowledged: a failed write's value"
                );
                continue;
            }
            report.lost += 1;
            let acked_by = history
                .iter()
                .find(|w| w.write && w.ok && w.key == *key && w.value == Some(last))
                .map(|w| format!("{} at {:.3}-{:.3} s", who(w.member), at(w.start), at(w.end)))
                .unwrap_or_default();
            eprintln!("lost: key {key} reads {answers:?} through the members; {last} was acknowledged by {acked_by}");
        }
    }
    Ok(())
}
