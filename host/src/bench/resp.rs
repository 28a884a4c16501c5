//! The same load over RESP (TCP), so one generator drives redis-server,
//! Cachet's RESP port and (through the parent module) Cachet's QUIC port.
//!
//! Closed loop: each connection sends `pipeline` commands, waits for their
//! replies, and repeats; every command of a batch is charged the batch's
//! round trip, which is what a pipelining client sees.
//!
//! Open loop (`--rate`): one pacer per thread gives each request an
//! intended send time and hands it to its connections in turn, whether or
//! not earlier replies came back. A connection's writer sends what it is
//! handed (commands waiting behind a slow reply go out together, as a
//! pipelining client's would) and its reader matches replies to requests
//! in order; latency counts from the intended time, so a server that falls
//! behind is charged for the queue (no coordinated omission).

use super::{BenchError, BenchOptions, Keys, ThreadResult, key};
use bytes::{Buf, BytesMut};
use cachet_policy_sdk::rng::SplitMix64;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn io_error(err: std::io::Error) -> BenchError {
    BenchError::Options(format!("RESP connection: {err}"))
}

fn push_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// One parsed reply: `Some(true)` a value, `Some(false)` a null, `None`
/// an error; status and integer replies count as values.
type Reply = Option<bool>;

/// Takes one whole reply off `buf`, or `None` if more bytes are needed.
fn take_reply(buf: &mut BytesMut) -> Result<Option<Reply>, BenchError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[1..end];
    let reply = match buf.first() {
        Some(b'+') | Some(b':') => Some(true),
        Some(b'-') => None,
        Some(b'_') => Some(false),
        Some(b'$') => {
            let len: i64 = std::str::from_utf8(line)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| BenchError::Options("bad bulk length in a reply".into()))?;
            if len < 0 {
                Some(false)
            } else {
                let total = end + 2 + len as usize + 2;
                if buf.len() < total {
                    return Ok(None);
                }
                buf.advance(total);
                return Ok(Some(Some(true)));
            }
        }
        other => return Err(BenchError::Options(format!("unexpected reply type {other:?}"))),
    };
    buf.advance(end + 2);
    Ok(Some(reply))
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, BenchError> {
    let stream = TcpStream::connect(addr).await.map_err(io_error)?;
    stream.set_nodelay(true).map_err(io_error)?;
    Ok(stream)
}

/// Sends `commands` (already encoded, `count` of them) and reads `count`
/// replies.
async fn round_trip(
    stream: &mut TcpStream,
    input: &mut BytesMut,
    commands: &[u8],
    count: usize,
    replies: &mut Vec<Reply>,
) -> Result<(), BenchError> {
    stream.write_all(commands).await.map_err(io_error)?;
    replies.clear();
    while replies.len() < count {
        while let Some(reply) = take_reply(input)? {
            replies.push(reply);
            if replies.len() == count {
                return Ok(());
            }
        }
        if stream.read_buf(input).await.map_err(io_error)? == 0 {
            return Err(BenchError::Options("the server closed the connection".into()));
        }
    }
    Ok(())
}

/// Writes every key once, 64 per batch, over a few connections.
pub(super) fn preload(options: &BenchOptions, value: &[u8]) -> Result<(), BenchError> {
    super::runtime()?.block_on(async {
        let workers = 8u64.min(options.keys.max(1));
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (addr, n, value) = (options.client.server, options.keys, value.to_vec());
            tasks.push(tokio::spawn(async move {
                let mut stream = connect(addr).await?;
                let (mut input, mut replies, mut batch) = (BytesMut::new(), Vec::new(), Vec::new());
                let mut i = w;
                while i < n {
                    batch.clear();
                    let mut count = 0;
                    while i < n && count < 64 {
                        push_command(&mut batch, &[b"SET", key(i).as_bytes(), &value]);
                        i += workers;
                        count += 1;
                    }
                    round_trip(&mut stream, &mut input, &batch, count, &mut replies).await?;
                    if replies.iter().any(Option::is_none) {
                        return Err(BenchError::Options("the server refused a preload SET".into()));
                    }
                }
                Ok(())
            }));
        }
        for task in tasks {
            task.await.map_err(|e| BenchError::Options(e.to_string()))??;
        }
        Ok(())
    })
}

/// This thread's share of the connections, each a closed loop of
/// `pipeline`-command batches.
pub(super) fn run_thread(
    thread: usize,
    threads: usize,
    options: &BenchOptions,
    keys: &Arc<Keys>,
    start: Instant,
) -> Result<ThreadResult, BenchError> {
    let connections = (thread..options.connections).step_by(threads).count();
    let value = vec![b'x'; options.value_size];
    super::runtime()?.block_on(async {
        let end = start + options.duration;
        let mut tasks = Vec::new();
        for c in 0..connections {
            let mut stream = connect(options.client.server).await?;
            let (keys, value, get_ratio, pipeline) =
                (keys.clone(), value.clone(), options.get_ratio, options.pipeline.max(1));
            let seed = ((thread as u64) << 32 | c as u64) ^ 0x005E_ED0F_4E5D;
            tasks.push(tokio::spawn(async move {
                let mut rng = SplitMix64::new(seed);
                let mut result = ThreadResult::new();
                let (mut input, mut replies, mut batch, mut gets) =
                    (BytesMut::with_capacity(64 << 10), Vec::new(), Vec::new(), Vec::new());
                tokio::time::sleep_until(start.into()).await;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    batch.clear();
                    gets.clear();
                    for _ in 0..pipeline {
                        let k = key(keys.pick(&mut rng));
                        let is_get = (rng.next_u64() as f64 / u64::MAX as f64) < get_ratio;
                        if is_get {
                            push_command(&mut batch, &[b"GET", k.as_bytes()]);
                        } else {
                            push_command(&mut batch, &[b"SET", k.as_bytes(), &value]);
                        }
                        gets.push(is_get);
                    }
                    match round_trip(&mut stream, &mut input, &batch, pipeline, &mut replies).await {
                        Ok(()) => {
                            for (&is_get, reply) in gets.iter().zip(&replies) {
                                let outcome = reply.ok_or(()).map(|found| is_get && found);
                                result.record_outcome(sent, is_get, outcome.is_ok(), outcome.unwrap_or(false));
                            }
                        }
                        Err(_) => {
                            for &is_get in &gets {
                                result.record_outcome(sent, is_get, false, false);
                            }
                            break;
                        }
                    }
                }
                result
            }));
        }
        let mut total = ThreadResult::new();
        for task in tasks {
            total.merge(&task.await.map_err(|e| BenchError::Options(e.to_string()))?)?;
        }
        Ok(total)
    })
}

/// A request handed to a connection in open loop: when it was meant to
/// go out, and whether it is a GET.
struct Paced {
    intended: Instant,
    is_get: bool,
    key: String,
}

/// This thread's share of the connections in open loop at `rate` requests
/// a second over all threads (see the module docs).
pub(super) fn run_thread_open(
    thread: usize,
    threads: usize,
    options: &BenchOptions,
    rate: f64,
    keys: &Arc<Keys>,
    start: Instant,
) -> Result<ThreadResult, BenchError> {
    let connections = (thread..options.connections).step_by(threads).count().max(1);
    let value = vec![b'x'; options.value_size];
    super::runtime()?.block_on(async {
        let end = start + options.duration;
        let result = Arc::new(std::sync::Mutex::new(ThreadResult::new()));
        let mut senders = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..connections {
            let stream = connect(options.client.server).await?;
            let (mut read, mut write) = stream.into_split();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Paced>();
            let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, bool)>();
            senders.push(tx);
            let value = value.clone();
            tasks.spawn(async move {
                let mut batch = Vec::new();
                while let Some(first) = rx.recv().await {
                    batch.clear();
                    let mut next = Some(first);
                    while let Some(paced) = next {
                        if paced.is_get {
                            push_command(&mut batch, &[b"GET", paced.key.as_bytes()]);
                        } else {
                            push_command(&mut batch, &[b"SET", paced.key.as_bytes(), &value]);
                        }
                        if sent_tx.send((paced.intended, paced.is_get)).is_err() {
                            return;
                        }
                        next = rx.try_recv().ok();
                    }
                    if write.write_all(&batch).await.is_err() {
                        return;
                    }
                }
            });
            let result = result.clone();
            // Replies still missing this long after the run count as
            // failed: a server that stopped answering ends the run.
            let give_up = end + std::time::Duration::from_secs(10);
            tasks.spawn(async move {
                let mut input = BytesMut::with_capacity(64 << 10);
                let mut local = ThreadResult::new();
                while let Some((intended, is_get)) = sent_rx.recv().await {
                    let reply = loop {
                        match take_reply(&mut input) {
                            Ok(Some(reply)) => break Some(reply),
                            Ok(None) => {}
                            Err(_) => break None,
                        }
                        match tokio::time::timeout_at(give_up.into(), read.read_buf(&mut input)).await {
                            Ok(Ok(0) | Err(_)) | Err(_) => break None,
                            Ok(Ok(_)) => {}
                        }
                    };
                    match reply {
                        Some(reply) => {
                            let outcome = reply.ok_or(()).map(|found| is_get && found);
                            local.record_outcome(intended, is_get, outcome.is_ok(), outcome.unwrap_or(false));
                        }
                        None => {
                            // The connection is gone: this and every request
                            // handed to it since fail.
                            local.record_outcome(intended, is_get, false, false);
                            while let Some((intended, is_get)) = sent_rx.recv().await {
                                local.record_outcome(intended, is_get, false, false);
                            }
                        }
                    }
                }
                if let Ok(mut total) = result.lock() {
                    let _ = total.merge(&local);
                }
            });
        }
        let interval = std::time::Duration::from_secs_f64(threads as f64 / rate);
        // Threads interleave their schedules instead of firing together.
        let mut intended = start + interval.mul_f64(thread as f64 / threads as f64);
        let mut rng = SplitMix64::new((thread as u64) ^ 0x0FE2_A710_0B5E);
        let mut n = 0usize;
        while intended < end {
            super::pace_until(intended).await;
            let k = key(keys.pick(&mut rng));
            let is_get = (rng.next_u64() as f64 / u64::MAX as f64) < options.get_ratio;
            // A connection that failed stops taking requests; they count
            // as errors through the ones already handed to it.
            let _ = senders[n % senders.len()].send(Paced { intended, is_get, key: k });
            n += 1;
            intended += interval;
        }
        drop(senders);
        while tasks.join_next().await.is_some() {}
        let total = result.lock().map(|r| {
            let mut copy = ThreadResult::new();
            let _ = copy.merge(&r);
            copy
        });
        total.map_err(|_| BenchError::Options("a connection's task panicked".into()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_taken_whole_or_not_at_all() {
        let mut buf = BytesMut::from(&b"+OK\r\n$3\r\nabc\r\n$-1\r\n-ERR no\r\n:5\r\n_\r\n$5\r\nab"[..]);
        let mut got = Vec::new();
        while let Some(reply) = take_reply(&mut buf).expect("valid") {
            got.push(reply);
        }
        assert_eq!(got, [Some(true), Some(true), Some(false), None, Some(true), Some(false)]);
        assert_eq!(&buf[..], b"$5\r\nab", "a partial bulk stays");
    }
}
