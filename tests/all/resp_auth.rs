//! The RESP port's users and TLS: AUTH, HELLO AUTH, permissions per
//! command category and key pattern, `redis-cli --user/--pass` and
//! `redis-cli --tls`, and the refusal to serve beyond loopback unprotected.

use super::resp::RespNode;
use cachet::resp::acl::Acl;
use cachet::resp::{self, RespOptions};
use cachet::server::tls::{self, TlsSource};
use cachet_tests::TempDir;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const USERS: &str = "\
user app on >s3cret ~app:* +@read +@write
user ops on >r00t allkeys +@all
user viewer on nopass allkeys +@read
user gone off >s3cret +@all
";

fn node_with_users(text: &str) -> RespNode {
    let acl = Arc::new(Acl::parse(text).expect("users parse"));
    RespNode::start_with(|o| RespOptions { acl: Some(acl), ..o })
}

/// Sends `command` (already encoded) and reads one reply's first bytes.
fn roundtrip(stream: &mut TcpStream, command: &[u8]) -> String {
    stream.write_all(command).expect("write");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn redis_as(node: &RespNode, user: &str, password: &str) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://{user}:{password}@{}/", node.addr()))?.get_connection()
}

#[test]
fn nothing_runs_before_auth_and_users_keep_to_their_permissions() {
    let node = node_with_users(USERS);
    let mut raw = TcpStream::connect(node.addr()).expect("connect");
    assert_eq!(roundtrip(&mut raw, b"*2\r\n$3\r\nGET\r\n$5\r\napp:1\r\n"), "-NOAUTH Authentication required.\r\n");
    assert_eq!(roundtrip(&mut raw, b"PING\r\n"), "-NOAUTH Authentication required.\r\n");
    assert_eq!(
        roundtrip(&mut raw, b"AUTH app wrong\r\n"),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert!(roundtrip(&mut raw, b"AUTH gone s3cret\r\n").starts_with("-WRONGPASS"), "a disabled user");
    assert_eq!(roundtrip(&mut raw, b"AUTH app s3cret\r\n"), "+OK\r\n");
    assert_eq!(roundtrip(&mut raw, b"SET app:1 v\r\n"), "+OK\r\n");
    // The plain GET/SET fast path is checked too.
    assert_eq!(roundtrip(&mut raw, b"*2\r\n$3\r\nGET\r\n$5\r\napp:1\r\n"), "$1\r\nv\r\n");
    assert_eq!(
        roundtrip(&mut raw, b"*2\r\n$3\r\nGET\r\n$7\r\nother:1\r\n"),
        "-NOPERM No permissions to access a key\r\n"
    );
    assert_eq!(
        roundtrip(&mut raw, b"*3\r\n$3\r\nSET\r\n$7\r\nother:1\r\n$1\r\nv\r\n"),
        "-NOPERM No permissions to access a key\r\n"
    );
    assert_eq!(
        roundtrip(&mut raw, b"FLUSHALL\r\n"),
        "-NOPERM User app has no permissions to run the 'flushall' command\r\n"
    );
    assert_eq!(node.node.stats().entries, 1, "only app:1 was written");
    assert_eq!(node.node.clients().auth_failures(), 2);

    // The redis crate signs in from its URL.
    let mut ops = redis_as(&node, "ops", "r00t").expect("ops signs in");
    let _: () = redis::cmd("SET").arg("other:1").arg("x").query(&mut ops).expect("ops writes any key");
    let size: i64 = redis::cmd("DBSIZE").query(&mut ops).expect("ops may run admin commands");
    assert_eq!(size, 2);
    let mut viewer = redis_as(&node, "viewer", "anything").expect("nopass");
    let got: Option<String> = redis::cmd("GET").arg("other:1").query(&mut viewer).expect("viewer reads");
    assert_eq!(got.as_deref(), Some("x"));
    let err = redis::cmd("DEL").arg("other:1").query::<i64>(&mut viewer).expect_err("viewer cannot write");
    assert!(err.to_string().to_lowercase().contains("noperm"), "{err}");
    assert!(redis_as(&node, "app", "nope").is_err(), "a wrong password fails the connection");

    // redis-cli, as users run it.
    let port = node.addr().port().to_string();
    let out = Command::new("redis-cli")
        .args(["-p", &port, "--user", "app", "--pass", "s3cret", "--no-auth-warning", "GET", "app:1"])
        .output()
        .expect("redis-cli must be installed (redis-tools)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v");
}

#[test]
fn hello_signs_in_and_switches_protocol_at_once() {
    let node = node_with_users(USERS);
    let mut raw = TcpStream::connect(node.addr()).expect("connect");
    assert!(roundtrip(&mut raw, b"HELLO 3\r\n").starts_with("-NOAUTH"), "HELLO without AUTH on a protected port");
    assert!(roundtrip(&mut raw, b"HELLO 3 AUTH app wrong\r\n").starts_with("-WRONGPASS"));
    let reply = roundtrip(&mut raw, b"HELLO 3 AUTH app s3cret SETNAME worker\r\n");
    assert!(reply.starts_with("%7\r\n"), "a RESP3 map: {reply:?}");
    assert_eq!(roundtrip(&mut raw, b"GET app:none\r\n"), "_\r\n", "RESP3 null");
}

#[test]
fn repeated_wrong_passwords_close_the_connection() {
    let node = node_with_users(USERS);
    let mut raw = TcpStream::connect(node.addr()).expect("connect");
    for _ in 0..9 {
        assert!(roundtrip(&mut raw, b"AUTH app guess\r\n").starts_with("-WRONGPASS"));
    }
    raw.write_all(b"AUTH app guess\r\n").expect("write");
    let mut rest = Vec::new();
    raw.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let _ = raw.read_to_end(&mut rest);
    assert!(String::from_utf8_lossy(&rest).starts_with("-WRONGPASS"), "the tenth is answered, then closed");
    assert_eq!(node.node.clients().auth_failures(), 10);
}

#[test]
fn a_password_alone_protects_the_default_user() {
    let acl = Arc::new(Acl::default().with_default_password("hunter2"));
    let node = RespNode::start_with(|o| RespOptions { acl: Some(acl), ..o });
    let mut raw = TcpStream::connect(node.addr()).expect("connect");
    assert!(roundtrip(&mut raw, b"SET k v\r\n").starts_with("-NOAUTH"));
    assert_eq!(roundtrip(&mut raw, b"AUTH hunter2\r\n"), "+OK\r\n");
    assert_eq!(roundtrip(&mut raw, b"SET k v\r\n"), "+OK\r\n");
    let out = Command::new("redis-cli")
        .args(["-p", &node.addr().port().to_string(), "-a", "hunter2", "--no-auth-warning", "GET", "k"])
        .output()
        .expect("redis-cli must be installed (redis-tools)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v");
}

#[test]
fn an_unprotected_port_beyond_loopback_is_refused_unless_insecure() {
    let node = RespNode::start();
    let everywhere = "0.0.0.0:0".parse().expect("addr");
    let err = resp::start(node.node.clone(), RespOptions::new(everywhere)).err().expect("refused");
    assert!(err.to_string().contains("refusing to listen beyond loopback"), "{err}");
    // A port whose users all need a password may listen anywhere.
    let acl = Arc::new(Acl::parse("user a on >pw +@all allkeys").expect("parses"));
    let protected = resp::start(node.node.clone(), RespOptions { acl: Some(acl), ..RespOptions::new(everywhere) })
        .expect("protected: allowed");
    protected.shutdown();
    // A `default` user with nopass leaves it open: refused again.
    let open = Arc::new(Acl::parse("user default on nopass +@all allkeys").expect("parses"));
    let options = RespOptions { acl: Some(open), ..RespOptions::new(everywhere) };
    assert!(resp::start(node.node.clone(), options).is_err());
    let insecure = resp::start(node.node.clone(), RespOptions { insecure: true, ..RespOptions::new(everywhere) })
        .expect("told to");
    insecure.shutdown();
}

#[test]
fn redis_cli_connects_over_tls() {
    let dir = TempDir::new("resp-tls");
    let config = tls::tcp_server_config(&TlsSource::DevCa { data_dir: dir.0.clone() }).expect("TLS config");
    let node = RespNode::start_with(|o| RespOptions { tls: Some(Arc::new(config)), ..o });
    let ca = dir.0.join(tls::CA_CERT);
    let port = node.addr().port().to_string();
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert", ca.to_str().expect("utf-8 path"), "-h", "127.0.0.1", "-p", &port])
            .args(args)
            .output()
            .expect("redis-cli must be installed (redis-tools)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["SET", "k", "over tls"]), "OK");
    assert_eq!(cli(&["GET", "k"]), "over tls");
    // Plain text on a TLS port gets no reply, and the node serves on.
    let mut plain = TcpStream::connect(node.addr()).expect("connect");
    plain.write_all(b"PING\r\n").expect("write");
    plain.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut buf = [0u8; 64];
    let n = plain.read(&mut buf).unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).contains("PONG"), "no plain-text reply on a TLS port");
    assert_eq!(cli(&["PING"]), "PONG");
}
