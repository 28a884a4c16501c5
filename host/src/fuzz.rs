//! Entry points for the coverage-guided fuzz targets (`fuzz/`, run with
//! `cargo xtask fuzz TARGET`): each feeds arbitrary bytes to one decoder a
//! client, a peer or a file can reach, and checks what must hold besides
//! "no panic". The same functions replay the committed corpora and every
//! input a fuzzer ever crashed on, as ordinary tests in every CI run.
//!
//! Not a public API: the targets are here, in the library, so they reach
//! the decoders without making them public.

use crate::resp::codec::{self, Limits, Parser};
use bytes::BytesMut;

/// A target: arbitrary bytes in, a panic if something that must hold
/// does not.
pub type Target = fn(&[u8]);

/// The targets, by name: what `cargo xtask fuzz` accepts and the corpus
/// folders are called.
pub const TARGETS: [(&str, Target); 6] = [
    ("resp", resp),
    ("frame", frame),
    ("peer", peer),
    ("manifest", manifest),
    ("loader_config", loader_config),
    ("http_path", http_path),
];

/// The RESP parser. The first byte picks how the rest is cut into reads;
/// the commands a connection's resumable parser takes from those pieces
/// must be exactly those a parser starting over takes from the whole, and
/// the plain GET/SET fast path must agree with both.
pub fn resp(data: &[u8]) {
    let Some((&cut, input)) = data.split_first() else { return };
    let limits = Limits { max_bulk: 64, max_args: 16, max_inline: 128, max_command: 256 };
    let mut whole = BytesMut::from(input);
    let mut expected = Vec::new();
    let expected_end = loop {
        match codec::parse_command(&mut whole, &limits) {
            Ok(Some(args)) => expected.push(args),
            Ok(None) => break Ok(()),
            Err(err) => break Err(err),
        }
    };
    let step = usize::from(cut % 16) + 1;
    let mut parser = Parser::default();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut got_end = Ok(());
    'feed: for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            if parser.idle()
                && let Some((key, len)) = codec::plain_get(&buf, &limits)
            {
                let args = codec::parse_command(&mut BytesMut::from(&buf[..len]), &limits);
                let args = args.ok().flatten().expect("the parser takes what plain_get takes");
                assert_eq!(&args[1][..], &buf[key], "plain_get's key");
            }
            match parser.parse(&mut buf, &limits) {
                Ok(Some(args)) => got.push(args),
                Ok(None) => break,
                Err(err) => {
                    got_end = Err(err);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(got, expected, "commands differ when the input arrives in pieces of {step}");
    // An error can only be found where the bytes before it were whole, so
    // both see the same one (or the piecewise parser stops at it first).
    if let (Err(a), Err(b)) = (&expected_end, &got_end) {
        assert_eq!(a, b, "errors differ");
    } else {
        assert_eq!(expected_end.is_err(), got_end.is_err(), "{expected_end:?} / {got_end:?}");
    }
}

/// The `cachet/1` frame decoder, requests and replies, frame after frame:
/// never a panic, and a decoded request encodes again.
pub fn frame(data: &[u8]) {
    use cachet_proto::{Decoded, Request, Response};
    let mut requests = BytesMut::from(data);
    while let Ok(Decoded::Frame(envelope)) = cachet_proto::decode::<Request>(&mut requests, 1 << 16) {
        let mut out = BytesMut::new();
        cachet_proto::encode(envelope.id, &envelope.body, &mut out).expect("a decoded request encodes");
    }
    let mut replies = BytesMut::from(data);
    while let Ok(Decoded::Frame(_)) = cachet_proto::decode::<Response>(&mut replies, 1 << 16) {}
}

/// A batch of peer frames (`cachet-peer/1`): all or nothing, never a
/// panic, and no allocation beyond what the bytes could hold.
pub fn peer(data: &[u8]) {
    let _ = crate::cluster::transport::decode_batch(data);
}

/// The module registry's manifest as read from the data directory.
pub fn manifest(data: &[u8]) {
    let _ = crate::registry::parse_manifest(data);
}

/// A loader configuration file's text, parsed and checked.
pub fn loader_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::loader::LoaderConfig::parse(text);
    }
}

/// The HTTP origin's path check: whatever it lets through stays below
/// the base URL once a server decodes it (its path, before any query;
/// each segment judged by what precedes a `;` path parameter, as Tomcat
/// and others strip them).
pub fn http_path(data: &[u8]) {
    let Ok(path) = std::str::from_utf8(data) else { return };
    if crate::loader::origin::check_path(path).is_ok() {
        let route = path.split('?').next().unwrap_or_default();
        let decoded = percent_decode(route);
        assert!(!decoded.starts_with('/') && !decoded.contains('\\'), "{path:?} decodes to {decoded:?}");
        let climbs = decoded.split('/').any(|segment| {
            let stem = segment.split(';').next().unwrap_or_default();
            stem == ".." || stem == "."
        });
        assert!(!climbs, "{path:?} decodes to {decoded:?}, which climbs");
    }
}

/// Starting inputs per target, made by the real encoders (so the fuzzer
/// begins from valid frames and files): `cargo xtask fuzz` writes them
/// into an empty corpus.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::cluster::replica::Message;
    use crate::cluster::transport::PeerFrame;
    use bytes::Bytes;
    use cachet_proto::{Condition, Request};
    let mut seeds = vec![
        ("resp", b"\x03*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n".to_vec()),
        ("resp", b"\x00PING\r\nset k \"two words\"\r\nGET k\n".to_vec()),
        ("resp", b"\x07*1\r\n$99999999\r\n*0\r\n*-1\r\n".to_vec()),
        ("http_path", b"users/42.json?fields=a,b".to_vec()),
        ("http_path", b"a/%2e%2e/b".to_vec()),
        ("manifest", br#"{"modules":[],"active":null,"previous":null}"#.to_vec()),
        (
            "loader_config",
            b"[origins.db]\npostgres = \"host=127.0.0.1 dbname=app\"\n\n[[namespace]]\nprefix = \"user:\"\nmodule = \"users.wasm\"\norigin = \"db\"\nttl-ms = 60000\n".to_vec(),
        ),
    ];
    let requests = [
        Request::Get { key: Bytes::from_static(b"user:1") },
        Request::Set {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v"),
            ttl_ms: Some(60_000),
            condition: Condition::IfAbsent,
            hint: 3,
        },
        Request::MGet { keys: vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")] },
        Request::Ping,
    ];
    let mut frames = BytesMut::new();
    for (id, request) in requests.iter().enumerate() {
        let _ = cachet_proto::encode(id as u64, request, &mut frames);
    }
    seeds.push(("frame", frames.to_vec()));
    let peer = [
        PeerFrame::Gossip(Bytes::from_static(b"swim")),
        PeerFrame::Replica { epoch: 1, message: Message::Get { req: 7, key: Bytes::from_static(b"k") } },
    ];
    let mut batch = Vec::new();
    for frame in &peer {
        let _ = rmp_serde::encode::write(&mut batch, frame);
    }
    seeds.push(("peer", batch));
    seeds
}

/// `%XX` decoded once, as a server does; other bytes as they are.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::TARGETS;
    use bytes::BytesMut;
    use std::path::PathBuf;

    /// Every committed corpus input and every input a fuzzer crashed on,
    /// through its target: the CI part of fuzzing.
    #[test]
    fn the_corpora_and_past_crashes_replay_cleanly() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut replayed = 0;
        for (name, target) in TARGETS {
            for kind in ["corpus", "regressions"] {
                let Ok(entries) = std::fs::read_dir(root.join(kind).join(name)) else { continue };
                for entry in entries {
                    let path = entry.expect("corpus entry").path();
                    let data = std::fs::read(&path).expect("corpus file");
                    let outcome = std::panic::catch_unwind(|| target(&data));
                    assert!(outcome.is_ok(), "{name}: {} panics", path.display());
                    replayed += 1;
                }
            }
        }
        assert!(replayed >= TARGETS.len(), "only {replayed} inputs: the corpora are missing");
    }

    /// The seed files in `fuzz/corpus/` are what [`super::seeds`] makes
    /// (`CACHET_BLESS_SEEDS=1` writes them after a protocol change).
    #[test]
    fn the_committed_seeds_are_the_encoders_own() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let bless = std::env::var_os("CACHET_BLESS_SEEDS").is_some();
        for (i, (name, data)) in super::seeds().iter().enumerate() {
            let path = root.join(name).join(format!("seed-{i}"));
            if bless {
                std::fs::create_dir_all(root.join(name)).expect("corpus folder");
                std::fs::write(&path, data).expect("seed");
            }
            let committed = std::fs::read(&path).ok();
            assert_eq!(
                committed.as_deref(),
                Some(&data[..]),
                "{} is not what seeds() makes: run with CACHET_BLESS_SEEDS=1",
                path.display()
            );
        }
    }

    #[test]
    fn the_seeds_run_cleanly_and_cover_every_target() {
        let seeds = super::seeds();
        for (name, target) in TARGETS {
            let mine: Vec<_> = seeds.iter().filter(|(n, _)| *n == name).collect();
            assert!(!mine.is_empty(), "no seed for {name}");
            for (_, data) in mine {
                target(data);
            }
        }
        // The seeds are valid inputs, not just bytes: a frame and a peer
        // batch decode.
        let frame = &seeds.iter().find(|(n, _)| *n == "frame").expect("frame seed").1;
        let mut buf = BytesMut::from(&frame[..]);
        assert!(matches!(
            cachet_proto::decode::<cachet_proto::Request>(&mut buf, 1 << 16),
            Ok(cachet_proto::Decoded::Frame(_))
        ));
        let peer = &seeds.iter().find(|(n, _)| *n == "peer").expect("peer seed").1;
        assert_eq!(crate::cluster::transport::decode_batch(peer).map(|f| f.len()), Ok(2));
    }
}
