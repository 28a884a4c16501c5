//! Hostile clients against a real `cachet serve` process: one enormous
//! RESP command, a client that pipelines large reads and never reads the
//! replies, and 10,000 idle sockets. The node's resident memory (from
//! /proc) must stay under 200 MiB throughout while another client is
//! served. Every loop is bounded in count and time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The limit the issue sets for every phase.
const MAX_RSS_MIB: u64 = 200;

struct Serve {
    child: Child,
    resp: SocketAddr,
    dir: PathBuf,
}

impl Serve {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("cachet-hostile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let port = |udp: bool| {
            if udp {
                std::net::UdpSocket::bind("127.0.0.1:0").expect("probe").local_addr().expect("addr").port()
            } else {
                std::net::TcpListener::bind("127.0.0.1:0").expect("probe").local_addr().expect("addr").port()
            }
        };
        let resp: SocketAddr = format!("127.0.0.1:{}", port(false)).parse().expect("addr");
        let listen = format!("127.0.0.1:{}", port(true));
        let log = std::fs::File::create(dir.join("serve.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_cachet"))
            .args(["serve", "--listen", &listen, "--resp-listen", &resp.to_string(), "--threads", "1", "--shards", "1"])
            .args(["--max-connections", "15000", "--data-dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cachet serve starts");
        let serve = Self { child, resp, dir };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(mut stream) = TcpStream::connect(serve.resp)
                && ping(&mut stream)
            {
                return serve;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the node did not start; log in {}", serve.dir.display());
    }

    /// The node's resident memory, in MiB.
    fn rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("/proc status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS");
        kib / 1024
    }

    /// A bystander's PING over a fresh connection, answered in time.
    fn serves_others(&self) -> bool {
        TcpStream::connect(self.resp).is_ok_and(|mut stream| ping(&mut stream))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("node log in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn ping(stream: &mut TcpStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Runs `phase` in a thread while the main thread samples the node's
/// memory and checks a bystander is served; the peak in MiB.
fn watch(node: &Serve, phase: impl FnOnce() + Send + 'static) -> u64 {
    let running = std::thread::spawn(phase);
    let mut peak = node.rss_mib();
    let started = Instant::now();
    while !running.is_finished() {
        assert!(started.elapsed() < Duration::from_secs(120), "the phase did not end in 120 s");
        peak = peak.max(node.rss_mib());
        assert!(node.serves_others(), "a bystander was not served");
        std::thread::sleep(Duration::from_millis(100));
    }
    running.join().expect("phase");
    peak.max(node.rss_mib())
}

#[test]
fn hostile_clients_leave_the_node_under_200_mib_and_serving() {
    let node = Serve::start();
    let resp = node.resp;
    let baseline = node.rss_mib();

    // 1. One 300 MiB command: an MSET announced with 300 bulks of 1 MiB.
    let peak = watch(&node, move || {
        let mut hostile = TcpStream::connect(resp).expect("connect");
        hostile.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let bulk: Vec<u8> = [&b"$1048576\r\n"[..], &vec![b'x'; 1 << 20], b"\r\n"].concat();
        let mut sent = 0usize;
        if hostile.write_all(b"*301\r\n$4\r\nMSET\r\n").is_ok() {
            for _ in 0..300 {
                if hostile.write_all(&bulk).is_err() {
                    break;
                }
                sent += bulk.len();
            }
        }
        assert!(sent < 100 << 20, "the node took {sent} bytes of a command over its limit");
        let mut reply = String::new();
        hostile.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let _ = BufReader::new(hostile).read_line(&mut reply);
        assert!(reply.contains("query buffer limit"), "{reply:?}");
    });
    assert!(peak < MAX_RSS_MIB, "a 300 MiB command: {peak} MiB resident (from {baseline})");
    eprintln!("300 MiB command: peak {peak} MiB resident (baseline {baseline} MiB)");

    // 2. 20,000 pipelined GETs of a 512 KiB value, none read.
    let mut setter = TcpStream::connect(resp).expect("connect");
    let set: Vec<u8> = [&b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$524288\r\n"[..], &vec![b'v'; 512 << 10], b"\r\n"].concat();
    setter.write_all(&set).expect("set");
    let mut ok = [0u8; 5];
    setter.read_exact(&mut ok).expect("reply");
    assert_eq!(&ok, b"+OK\r\n");
    let peak = watch(&node, move || {
        let mut greedy = TcpStream::connect(resp).expect("connect");
        greedy.set_write_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let gets = b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n".repeat(20_000);
        // The node stops reading once its replies wait: the write may not
        // finish, and the client holds its socket a few seconds unread.
        let _ = greedy.write_all(&gets);
        std::thread::sleep(Duration::from_secs(3));
        drop(greedy);
    });
    assert!(peak < MAX_RSS_MIB, "an unread pipeline: {peak} MiB resident");
    eprintln!("20,000 unread GETs of 512 KiB: peak {peak} MiB resident");

    // 3. 10,000 idle sockets, held by a helper process (its own file limit).
    let script = format!(
        "import socket, sys\nsocks = []\nfor i in range(10000):\n    s = socket.create_connection(('127.0.0.1', {}))\n    \
         socks.append(s)\nprint(len(socks), flush=True)\nsys.stdin.read()\n",
        resp.port()
    );
    let mut holder = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 must be installed");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("stdout")).read_line(&mut line).expect("holder reports");
    assert_eq!(line.trim(), "10000", "the holder opened every socket");
    let mut peak = node.rss_mib();
    for _ in 0..20 {
        peak = peak.max(node.rss_mib());
        assert!(node.serves_others(), "a bystander was not served beside 10,000 idle sockets");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(holder.stdin.take());
    let _ = holder.wait();
    assert!(peak < MAX_RSS_MIB, "10,000 idle sockets: {peak} MiB resident");
    eprintln!("10,000 idle sockets: peak {peak} MiB resident");
}
