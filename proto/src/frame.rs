//! Length-prefixed MessagePack frames: a 4-byte big-endian length, then an
//! [`Envelope`] (`v`ersion, request `id`, `body`) encoded as a MessagePack
//! map. Decoding is incremental: a partial frame is the explicit
//! [`Decoded::Incomplete`] state, not an error, and a declared length is
//! checked against the limit before anything is allocated.

use bytes::{Buf, BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::message::{Consistency, PROTOCOL_VERSION};

/// How deep a frame's values may nest. Cachet's messages nest a few
/// levels; rmp-serde's own limit (1,024) lets a small hostile frame recurse
/// deep enough to overflow a thread's stack in a debug build.
pub const MAX_DEPTH: usize = 32;

/// [`rmp_serde::from_slice`] with nesting limited to [`MAX_DEPTH`].
pub fn from_slice_shallow<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut deserializer = rmp_serde::Deserializer::from_read_ref(bytes);
    deserializer.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut deserializer)
}

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Largest reply a node sends and a client accepts; a request whose reply
/// would be larger (an MGET of many large values) is answered `TooLarge`.
pub const MAX_REPLY_LEN: usize = 64 << 20;

/// One frame's content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Protocol version.
    pub v: u16,
    /// Request id, echoed in the reply so requests can be pipelined.
    pub id: u64,
    /// The request or reply.
    pub body: T,
    /// The consistency a request asks for, when not the node's default.
    /// Absent from replies and from requests of older clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
}

/// What [`decode`] found.
#[derive(Debug, PartialEq)]
pub enum Decoded<T> {
    /// A whole frame, removed from the buffer.
    Frame(Envelope<T>),
    /// Not enough bytes yet; at least `needed` more are required.
    Incomplete {
        /// Bytes still missing.
        needed: usize,
    },
}

/// A frame that cannot be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The declared length is over the limit. The stream cannot be
    /// resynchronised without reading the whole frame, so it is closed.
    #[error("frame of {declared} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Length the header declared.
        declared: usize,
        /// The limit.
        limit: usize,
    },
    /// The frame was consumed but its content does not decode; the stream
    /// can go on.
    #[error("malformed frame: {detail}")]
    Malformed {
        /// The request id, when it could be read.
        id: Option<u64>,
        /// What the decoder said.
        detail: String,
    },
    /// A well-formed frame naming a command this side does not know.
    #[error("unknown command: {detail}")]
    UnknownCommand {
        /// The request id.
        id: u64,
        /// What the decoder said.
        detail: String,
    },
    /// A frame of another protocol version.
    #[error("protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The request id.
        id: u64,
        /// The version found.
        version: u16,
    },
    /// Encoding failed (a bug, not bad input).
    #[error("cannot encode frame: {0}")]
    Encode(String),
}

/// Appends one frame holding `body` to `out`.
pub fn encode<T: Serialize>(id: u64, body: &T, out: &mut BytesMut) -> Result<(), FrameError> {
    encode_at(id, body, None, out)
}

/// Appends one frame holding `body`, asking for `consistency`.
pub fn encode_at<T: Serialize>(
    id: u64,
    body: &T,
    consistency: Option<Consistency>,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    let start = out.len();
    out.put_u32(0);
    let envelope = Envelope { v: PROTOCOL_VERSION, id, body, consistency };
    let mut writer = out.writer();
    let written = rmp_serde::encode::write_named(&mut writer, &envelope);
    let out = writer.into_inner();
    let len = out.len() - start - HEADER_LEN;
    match (written, u32::try_from(len)) {
        (Ok(()), Ok(len)) => {
            out[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        // Never leave half a frame behind: the stream would desynchronise.
        (Err(e), _) => {
            out.truncate(start);
            Err(FrameError::Encode(e.to_string()))
        }
        (_, Err(_)) => {
            out.truncate(start);
            Err(FrameError::Encode(format!("frame of {len} bytes")))
        }
    }
}

/// The fields every frame has, read when the body does not decode.
#[derive(Deserialize)]
struct Probe {
    v: u16,
    id: u64,
}

/// Takes one frame from the front of `buf`. Frames larger than `max_len`
/// are refused from their header alone.
pub fn decode<T: DeserializeOwned>(buf: &mut BytesMut, max_len: usize) -> Result<Decoded<T>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(Decoded::Incomplete { needed: HEADER_LEN - buf.len() });
    }
    let declared = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if declared > max_len {
        return Err(FrameError::TooLarge { declared, limit: max_len });
    }
    if buf.len() < HEADER_LEN + declared {
        return Ok(Decoded::Incomplete { needed: HEADER_LEN + declared - buf.len() });
    }
    buf.advance(HEADER_LEN);
    let payload = buf.split_to(declared);
    match from_slice_shallow::<Envelope<T>>(&payload) {
        Ok(envelope) if envelope.v == PROTOCOL_VERSION => Ok(Decoded::Frame(envelope)),
        Ok(envelope) => Err(FrameError::UnsupportedVersion { id: envelope.id, version: envelope.v }),
        Err(err) => {
            let detail = err.to_string();
            match from_slice_shallow::<Probe>(&payload) {
                Ok(probe) if probe.v != PROTOCOL_VERSION => {
                    Err(FrameError::UnsupportedVersion { id: probe.id, version: probe.v })
                }
                Ok(probe) if detail.contains("unknown variant") => {
                    Err(FrameError::UnknownCommand { id: probe.id, detail })
                }
                Ok(probe) => Err(FrameError::Malformed { id: Some(probe.id), detail }),
                Err(_) => Err(FrameError::Malformed { id: None, detail }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Condition, Request, Response};
    use bytes::Bytes;
    use proptest::prelude::*;

    fn frame_of<T: Serialize>(id: u64, body: &T) -> BytesMut {
        let mut buf = BytesMut::new();
        encode(id, body, &mut buf).expect("encodes");
        buf
    }

    #[test]
    fn deeply_nested_frames_are_refused_not_recursed() {
        // An unknown field holding 5,000 one-element arrays (5,007 bytes):
        // serde skips an unknown field's value by walking it, once per
        // level, so without a depth limit a fuzzer's input like this one
        // overflowed a debug build's test thread.
        let mut nested = vec![0x81u8, 0xa2, b'z', b'z'];
        nested.extend(std::iter::repeat_n(0x91u8, 5_000));
        let mut buf = BytesMut::new();
        buf.put_u32(nested.len() as u32);
        buf.put_slice(&nested);
        let err = decode::<Request>(&mut buf, 1 << 16).expect_err("refused");
        assert!(matches!(err, FrameError::Malformed { .. }), "{err:?}");
        assert!(err.to_string().contains("depth"), "{err}");
    }

    #[test]
    fn partial_frames_are_incomplete_not_errors() {
        let whole = frame_of(7, &Request::Get { key: Bytes::from_static(b"k") });
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            match decode::<Request>(&mut part, 1024) {
                Ok(Decoded::Incomplete { needed }) => assert!(needed > 0 && needed <= whole.len() - cut),
                other => panic!("cut at {cut}: {other:?}"),
            }
            assert_eq!(part.len(), cut, "nothing consumed");
        }
        let mut buf = whole.clone();
        let Ok(Decoded::Frame(env)) = decode::<Request>(&mut buf, 1024) else { panic!("whole frame") };
        assert_eq!((env.id, env.body), (7, Request::Get { key: Bytes::from_static(b"k") }));
        assert!(buf.is_empty());
    }

    #[test]
    fn a_huge_declared_length_is_refused_before_allocating() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2][..]);
        assert_eq!(
            decode::<Request>(&mut buf, 1 << 20),
            Err(FrameError::TooLarge { declared: u32::MAX as usize, limit: 1 << 20 })
        );
    }

    #[test]
    fn garbage_is_malformed_and_consumed() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(b"\xc1\xc1\xc1");
        let next = frame_of(9, &Request::Ping);
        buf.extend_from_slice(&next);
        assert!(matches!(decode::<Request>(&mut buf, 1024), Err(FrameError::Malformed { id: None, .. })));
        let Ok(Decoded::Frame(env)) = decode::<Request>(&mut buf, 1024) else { panic!("next frame") };
        assert_eq!((env.id, env.body), (9, Request::Ping));
    }

    #[test]
    fn unknown_commands_and_versions_keep_their_id() {
        #[derive(Serialize)]
        enum Future {
            Teleport { to: u32 },
        }
        let mut buf = frame_of(5, &Future::Teleport { to: 1 });
        assert!(matches!(decode::<Request>(&mut buf, 1024), Err(FrameError::UnknownCommand { id: 5, .. })));
        let mut buf = BytesMut::new();
        buf.put_u32(0);
        let mut w = buf.writer();
        rmp_serde::encode::write_named(&mut w, &Envelope { v: 99, id: 6, body: Request::Ping, consistency: None })
            .expect("encode");
        let mut buf = w.into_inner();
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode::<Request>(&mut buf, 1024), Err(FrameError::UnsupportedVersion { id: 6, version: 99 }));
    }

    fn request() -> impl Strategy<Value = Request> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from);
        prop_oneof![
            bytes().prop_map(|key| Request::Get { key }),
            (bytes(), bytes(), proptest::option::of(any::<u64>()), any::<u32>()).prop_map(
                |(key, value, ttl_ms, hint)| {
                    Request::Set { key, value, ttl_ms, condition: Condition::IfAbsent, hint }
                }
            ),
            proptest::collection::vec(bytes(), 0..5).prop_map(|keys| Request::MGet { keys }),
            proptest::collection::vec((bytes(), bytes()), 0..5).prop_map(|pairs| Request::MSet { pairs }),
            (bytes(), any::<i64>()).prop_map(|(key, delta)| Request::Incr { key, delta }),
            Just(Request::Stats),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip_when_fed_in_any_chunks(reqs in proptest::collection::vec(request(), 1..8), chunk in 1usize..40) {
            let mut wire = BytesMut::new();
            for (i, r) in reqs.iter().enumerate() {
                encode(i as u64, r, &mut wire).expect("encodes");
            }
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Decoded::Frame(env) = decode::<Request>(&mut buf, 1 << 20).expect("decodes") {
                    got.push(env.body);
                }
            }
            prop_assert_eq!(got, reqs);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..8 {
                match decode::<Response>(&mut buf, 1024) {
                    Ok(Decoded::Frame(_)) | Err(FrameError::Malformed { .. }) | Err(FrameError::UnknownCommand { .. })
                        | Err(FrameError::UnsupportedVersion { .. }) => {}
                    Ok(Decoded::Incomplete { .. }) | Err(_) => break,
                }
            }
        }
    }
}
