//! The RESP wire format, sans-IO: commands in (arrays of bulk strings, or
//! inline lines as typed into telnet), replies out in RESP2 or RESP3.
//!
//! "Not enough bytes yet" is `Ok(None)`, not an error; nothing is consumed
//! until a whole command is there. Every length is checked before anything
//! is buffered for it, so a declared bulk of 2^40 bytes is refused at once
//! rather than waited for.

use bytes::{BufMut, Bytes, BytesMut};
use std::ops::Range;

/// Limits on what one command may declare.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest bulk string (a key or value).
    pub max_bulk: usize,
    /// Most arguments in one command.
    pub max_args: usize,
    /// Longest inline command line.
    pub max_inline: usize,
    /// Largest whole command, headers included (Redis's
    /// `client-query-buffer-limit`): checked against what each bulk header
    /// declares, so a command that would be too big is refused before its
    /// bytes arrive.
    pub max_command: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::for_values(1 << 20, 64 << 10)
    }
}

impl Limits {
    /// The limits a node with these largest value and key sizes uses: a
    /// bulk may hold one value (with room for the framing of a key), and a
    /// command sixteen of each (an MSET of sixteen full-size pairs).
    pub fn for_values(max_value: usize, max_key: usize) -> Self {
        let max_bulk = max_value.max(max_key) + (64 << 10);
        Self {
            max_bulk,
            max_args: 1 << 20,
            max_inline: 64 << 10,
            max_command: max_value.saturating_add(max_key).saturating_mul(16).saturating_add(64 << 10),
        }
    }
}

/// Input that is not RESP, or over a limit; the connection is answered with
/// the error and closed, as Redis does.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A multibulk count that is not a number or over the limit.
    #[error("Protocol error: invalid multibulk length")]
    MultibulkLength,
    /// A bulk length that is not a number or over the limit.
    #[error("Protocol error: invalid bulk length")]
    BulkLength,
    /// Something other than `$` where a bulk string must start.
    #[error("Protocol error: expected '$', got '{0}'")]
    ExpectedBulk(char),
    /// A bulk string not followed by CRLF.
    #[error("Protocol error: bulk string not terminated by CRLF")]
    Unterminated,
    /// An inline command line over the limit.
    #[error("Protocol error: too big inline request")]
    InlineTooLong,
    /// Quotes that do not close in an inline command.
    #[error("Protocol error: unbalanced quotes in request")]
    UnbalancedQuotes,
    /// A command whose declared size is over [`Limits::max_command`].
    #[error("Protocol error: command of at least {declared} bytes is over the query buffer limit of {limit} bytes")]
    CommandTooBig {
        /// Bytes the command has declared so far.
        declared: usize,
        /// The limit.
        limit: usize,
    },
}

/// Position of the CRLF ending the line that starts at `from`.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(2).position(|w| w == b"\r\n").map(|p| from + p)
}

/// Longest content of a `*` or `$` header line (its digits).
const MAX_HEADER: usize = 32;

/// Where the CRLF ends the header line whose content starts at `from`:
/// `Ok(None)` while it may still come, `Err` once the content is longer
/// than [`MAX_HEADER`]. The same verdict however the line arrives: in one
/// read or a byte at a time (a `\r` at the limit may still be the CRLF's).
fn header_end(buf: &[u8], from: usize) -> Result<Option<usize>, ()> {
    let window = &buf[from.min(buf.len())..buf.len().min(from + MAX_HEADER + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(p) => Ok(Some(from + p)),
        None if window.len() > MAX_HEADER + 1 => Err(()),
        None => Ok(None),
    }
}

fn parse_len(digits: &[u8]) -> Option<i64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Takes one whole command off the front of `buf`: its arguments, the
/// first being the command name. `Ok(None)` when more bytes are needed.
/// Starts from the first byte each time: a connection keeps a [`Parser`]
/// instead.
pub fn parse_command(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
    Parser::default().parse(buf, limits)
}

/// A connection's command parser. It remembers how far it got into the
/// command at the front of the buffer, so a command that arrives in many
/// reads is scanned once in all, not once per read (which is quadratic in
/// the command's size).
///
/// Contract: between calls the caller only appends to the buffer; it takes
/// bytes off the front only through [`Parser::parse`], or while
/// [`Parser::idle`].
#[derive(Debug, Default)]
pub struct Parser {
    /// The multibulk command under way, if its header has been read.
    partial: Option<Partial>,
    /// How far an inline line has been searched for its end.
    inline_scanned: usize,
}

#[derive(Debug)]
struct Partial {
    /// Arguments declared.
    count: usize,
    /// Arguments found so far, as spans of the buffer.
    spans: Vec<(usize, usize)>,
    /// Where the next argument's header starts.
    at: usize,
}

/// Arguments whose spans are allocated before they are seen: a count is a
/// claim, not bytes, so it buys no memory up front.
const SPANS_AHEAD: usize = 64;

impl Parser {
    /// Whether no command is part-way parsed: the front of the buffer may
    /// then be taken by someone else (the plain GET/SET fast path).
    pub fn idle(&self) -> bool {
        self.partial.is_none() && self.inline_scanned == 0
    }

    /// Takes one whole command off the front of `buf`, as
    /// [`parse_command`], resuming where the last call stopped.
    pub fn parse(&mut self, buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        let result = match (&self.partial, buf.first()) {
            (Some(_), _) => self.multibulk(buf, limits),
            (None, None) => Ok(None),
            (None, Some(b'*')) => self.multibulk(buf, limits),
            (None, Some(_)) => self.inline(buf, limits),
        };
        if !matches!(result, Ok(None)) {
            // A command taken, or an error that ends the connection.
            *self = Self::default();
        }
        result
    }

    fn multibulk(&mut self, buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        let partial = match &mut self.partial {
            Some(partial) => partial,
            None => {
                let Some(end) = header_end(buf, 1).map_err(|()| ProtocolError::MultibulkLength)? else {
                    return Ok(None);
                };
                let count = parse_len(&buf[1..end]).ok_or(ProtocolError::MultibulkLength)?;
                if count > limits.max_args as i64 {
                    return Err(ProtocolError::MultibulkLength);
                }
                let at = end + 2;
                if count <= 0 {
                    // `*0` and `*-1` are empty commands: skipped, as Redis does.
                    let _ = buf.split_to(at);
                    return Ok(Some(Vec::new()));
                }
                let count = count as usize;
                self.partial.insert(Partial { count, spans: Vec::with_capacity(count.min(SPANS_AHEAD)), at })
            }
        };
        while partial.spans.len() < partial.count {
            let at = partial.at;
            match buf.get(at) {
                None => return Ok(None),
                Some(b'$') => {}
                Some(&other) => return Err(ProtocolError::ExpectedBulk(other as char)),
            }
            let Some(end) = header_end(buf, at + 1).map_err(|()| ProtocolError::BulkLength)? else {
                return Ok(None);
            };
            let len = parse_len(&buf[at + 1..end]).ok_or(ProtocolError::BulkLength)?;
            if len < 0 || len > limits.max_bulk as i64 {
                return Err(ProtocolError::BulkLength);
            }
            let start = end + 2;
            let stop = start + len as usize;
            if stop + 2 > limits.max_command {
                return Err(ProtocolError::CommandTooBig { declared: stop + 2, limit: limits.max_command });
            }
            if buf.len() < stop + 2 {
                return Ok(None);
            }
            if &buf[stop..stop + 2] != b"\r\n" {
                return Err(ProtocolError::Unterminated);
            }
            partial.spans.push((start, stop));
            partial.at = stop + 2;
        }
        let frame = buf.split_to(partial.at).freeze();
        Ok(Some(partial.spans.iter().map(|&(a, b)| frame.slice(a..b)).collect()))
    }

    /// A line of space-separated words, with double or single quotes for
    /// words holding spaces (and `\n`-style escapes in double quotes).
    fn inline(&mut self, buf: &mut BytesMut, limits: &Limits) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        let from = self.inline_scanned.min(buf.len());
        let Some(newline) = buf[from..].iter().position(|&b| b == b'\n').map(|p| from + p) else {
            if buf.len() > limits.max_inline {
                return Err(ProtocolError::InlineTooLong);
            }
            self.inline_scanned = buf.len();
            return Ok(None);
        };
        if newline > limits.max_inline {
            return Err(ProtocolError::InlineTooLong);
        }
        let line = buf.split_to(newline + 1);
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        split_words(line).map(Some)
    }
}

/// A whole plain `GET key` at the front of `buf`, as the key's span and the
/// frame's length, without taking it off: most traffic is GET, and serving
/// it from the read buffer skips building a frame and its arguments (an
/// allocation and two reference counts per command). `None` for anything
/// else, incomplete, or over the limits: [`parse_command`] then takes it,
/// errors included.
pub fn plain_get(buf: &[u8], limits: &Limits) -> Option<(Range<usize>, usize)> {
    let at = command_head(buf, b"*2\r\n$3\r\n", b"GET")?;
    let (key, end) = bulk_at(buf, at, limits)?;
    Some((key, end))
}

/// A whole `SET key value` (no options) at the front of `buf`, as the key's
/// and the value's spans and the frame's length; as [`plain_get`].
pub fn plain_set(buf: &[u8], limits: &Limits) -> Option<(Range<usize>, Range<usize>, usize)> {
    let at = command_head(buf, b"*3\r\n$3\r\n", b"SET")?;
    let (key, at) = bulk_at(buf, at, limits)?;
    let (value, end) = bulk_at(buf, at, limits)?;
    Some((key, value, end))
}

/// Where the first argument starts if `buf` opens with `head` and `name`
/// (in any case).
fn command_head(buf: &[u8], head: &[u8], name: &[u8]) -> Option<usize> {
    let rest = buf.strip_prefix(head)?;
    (rest.get(..name.len())?.eq_ignore_ascii_case(name) && rest.get(name.len()..name.len() + 2)? == b"\r\n")
        .then_some(head.len() + name.len() + 2)
}

/// A whole bulk string at `at` in its plainest form (`$`, decimal digits):
/// its span and where the next item starts.
fn bulk_at(buf: &[u8], at: usize, limits: &Limits) -> Option<(Range<usize>, usize)> {
    if buf.get(at)? != &b'$' {
        return None;
    }
    let end = line_end(buf, at + 1)?;
    let digits = &buf[at + 1..end];
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let len = digits.iter().fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
    if len > limits.max_bulk {
        return None;
    }
    let start = end + 2;
    let stop = start + len;
    (buf.get(stop..stop + 2)? == b"\r\n").then_some((start..stop, stop + 2))
}

fn split_words(line: &[u8]) -> Result<Vec<Bytes>, ProtocolError> {
    let mut words = Vec::new();
    let mut i = 0;
    while i < line.len() {
        if line[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let mut word = Vec::new();
        match line[i] {
            quote @ (b'"' | b'\'') => {
                i += 1;
                loop {
                    let Some(&c) = line.get(i) else {
                        return Err(ProtocolError::UnbalancedQuotes);
                    };
                    i += 1;
                    if c == quote {
                        break;
                    }
                    if c == b'\\' && quote == b'"' {
                        let Some(&next) = line.get(i) else {
                            return Err(ProtocolError::UnbalancedQuotes);
                        };
                        i += 1;
                        word.push(match next {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            other => other,
                        });
                    } else {
                        word.push(c);
                    }
                }
                if line.get(i).is_some_and(|c| !c.is_ascii_whitespace()) {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    word.push(line[i]);
                    i += 1;
                }
            }
        }
        words.push(Bytes::from(word));
    }
    Ok(words)
}

/// Writes replies in the connection's protocol version.
pub struct Writer<'a> {
    out: &'a mut BytesMut,
    resp3: bool,
}

impl<'a> Writer<'a> {
    /// Replies into `out`, RESP3 when `resp3`.
    pub fn new(out: &'a mut BytesMut, resp3: bool) -> Self {
        Self { out, resp3 }
    }

    /// `+OK`-style status.
    pub fn simple(&mut self, text: &str) {
        self.out.put_u8(b'+');
        self.out.put_slice(text.as_bytes());
        self.out.put_slice(b"\r\n");
    }

    /// An error line; `message` starts with its code (`ERR ...`).
    pub fn error(&mut self, message: &str) {
        self.out.put_u8(b'-');
        // A reply line cannot hold a line break.
        for b in message.bytes() {
            self.out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
        }
        self.out.put_slice(b"\r\n");
    }

    /// An integer.
    pub fn integer(&mut self, n: i64) {
        self.out.put_u8(b':');
        self.out.put_slice(itoa(n).as_bytes());
        self.out.put_slice(b"\r\n");
    }

    /// A bulk string.
    pub fn bulk(&mut self, data: &[u8]) {
        self.out.put_u8(b'$');
        self.out.put_slice(itoa(data.len() as i64).as_bytes());
        self.out.put_slice(b"\r\n");
        self.out.put_slice(data);
        self.out.put_slice(b"\r\n");
    }

    /// A bulk string or null.
    pub fn bulk_or_null(&mut self, data: Option<&[u8]>) {
        match data {
            Some(data) => self.bulk(data),
            None => self.null(),
        }
    }

    /// Null: `$-1` in RESP2, `_` in RESP3.
    pub fn null(&mut self) {
        self.out.put_slice(if self.resp3 { b"_\r\n" } else { b"$-1\r\n" });
    }

    /// The header of an array of `len` items, written next.
    pub fn array(&mut self, len: usize) {
        self.out.put_u8(b'*');
        self.out.put_slice(itoa(len as i64).as_bytes());
        self.out.put_slice(b"\r\n");
    }

    /// The header of a map of `len` pairs (an array of 2×`len` in RESP2).
    pub fn map(&mut self, len: usize) {
        if self.resp3 {
            self.out.put_u8(b'%');
            self.out.put_slice(itoa(len as i64).as_bytes());
            self.out.put_slice(b"\r\n");
        } else {
            self.array(len * 2);
        }
    }

    /// Bytes already encoded as a reply.
    pub fn raw(&mut self, encoded: &[u8]) {
        self.out.put_slice(encoded);
    }

    /// A verbatim text blob (INFO): a verbatim string in RESP3, bulk in RESP2.
    pub fn text(&mut self, text: &str) {
        if self.resp3 {
            self.out.put_u8(b'=');
            self.out.put_slice(itoa(text.len() as i64 + 4).as_bytes());
            self.out.put_slice(b"\r\ntxt:");
            self.out.put_slice(text.as_bytes());
            self.out.put_slice(b"\r\n");
        } else {
            self.bulk(text.as_bytes());
        }
    }
}

fn itoa(n: i64) -> String {
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &[u8]) -> Result<Option<Vec<Bytes>>, ProtocolError> {
        parse_command(&mut BytesMut::from(input), &Limits::default())
    }

    /// What `plain_get` and `plain_set` take, `parse_command` parses the
    /// same way.
    fn agrees_with_the_parser(input: &[u8], limits: &Limits) {
        let mut buf = BytesMut::from(input);
        let parsed = parse_command(&mut buf, limits);
        let consumed = input.len() - buf.len();
        if let Some((key, value, len)) = plain_set(input, limits) {
            let args = parsed.clone().expect("the parser accepts it").expect("whole");
            assert_eq!(args.len(), 3, "{input:?}");
            assert!(args[0].eq_ignore_ascii_case(b"SET"));
            assert_eq!((&args[1][..], &args[2][..]), (&input[key], &input[value]));
            assert_eq!(len, consumed);
        }
        // Anything else (unusual spellings such as `$+3` included) is left
        // to the parser.
        if let Some((key, len)) = plain_get(input, limits) {
            let args = parsed.expect("the parser accepts it").expect("whole");
            assert_eq!(args.len(), 2, "{input:?}");
            assert!(args[0].eq_ignore_ascii_case(b"GET"));
            assert_eq!(&args[1][..], &input[key]);
            assert_eq!(len, consumed);
        }
    }

    #[test]
    fn plain_get_takes_what_the_parser_would_and_nothing_else() {
        let limits = Limits { max_bulk: 8, ..Limits::default() };
        let frames: Vec<&[u8]> = vec![
            b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n",
            b"*2\r\n$3\r\nget\r\n$0\r\n\r\n",
            b"*2\r\n$3\r\nGeT\r\n$8\r\n12345678\r\n*1\r\n$4\r\nPING\r\n",
            b"*2\r\n$3\r\nGET\r\n$9\r\n123456789\r\n",
            b"*2\r\n$3\r\nGET\r\n$3\r\nkeyXY",
            b"*2\r\n$3\r\nGET\r\n$-1\r\n",
            b"*2\r\n$3\r\nGET\r\n$+3\r\nkey\r\n",
            b"*2\r\n$3\r\nGET\r\n$99999999999\r\n",
            b"*2\r\n$3\r\nSET\r\n$3\r\nkey\r\n",
            b"*3\r\n$3\r\nGET\r\n$1\r\na\r\n$1\r\nb\r\n",
            b"GET key\r\n",
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
            b"*3\r\n$3\r\nset\r\n$0\r\n\r\n$0\r\n\r\n*2\r\n$3\r\nGET\r\n$0\r\n\r\n",
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$9\r\n123456789\r\n",
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n:5\r\nvalue\r\n",
            b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$2\r\nNX\r\n",
        ];
        for frame in &frames {
            agrees_with_the_parser(frame, &limits);
            // Every prefix is incomplete or something else, never a GET of
            // a cut key.
            for cut in 0..frame.len() {
                agrees_with_the_parser(&frame[..cut], &limits);
            }
        }
        for canonical in &frames[..3] {
            assert!(plain_get(canonical, &limits).is_some(), "{canonical:?}");
        }
        assert_eq!(plain_get(frames[0], &limits), Some((17..20, 22)));
        assert_eq!(plain_get(frames[3], &limits), None, "over max_bulk: the parser's error");
        assert_eq!(plain_set(frames[11], &limits), Some((17..20, 26..31, 33)));
        assert!(plain_set(frames[12], &limits).is_some());
        for other in &frames[13..] {
            assert_eq!(plain_set(other, &limits), None, "{other:?}");
        }
    }

    #[test]
    fn multibulk_commands_parse_and_partial_ones_wait() {
        let whole = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*1\r\n$4\r\nPING\r\n";
        let mut buf = BytesMut::from(&whole[..]);
        let first = parse_command(&mut buf, &Limits::default()).expect("ok").expect("whole");
        assert_eq!(first, [&b"SET"[..], b"k", b"hello"]);
        let second = parse_command(&mut buf, &Limits::default()).expect("ok").expect("whole");
        assert_eq!(second, [&b"PING"[..]]);
        assert!(buf.is_empty());
        for cut in 1..whole.len() - 14 {
            let mut partial = BytesMut::from(&whole[..cut]);
            assert_eq!(parse_command(&mut partial, &Limits::default()), Ok(None), "cut at {cut}");
            assert_eq!(partial.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn hostile_lengths_are_refused_before_buffering() {
        assert_eq!(parse(b"*1\r\n$1099511627776\r\n"), Err(ProtocolError::BulkLength));
        assert_eq!(parse(b"*99999999999\r\n"), Err(ProtocolError::MultibulkLength));
        assert_eq!(parse(b"*x\r\n"), Err(ProtocolError::MultibulkLength));
        assert_eq!(parse(b"*1\r\n$-5\r\n"), Err(ProtocolError::BulkLength));
        assert_eq!(parse(b"*1\r\n:5\r\n"), Err(ProtocolError::ExpectedBulk(':')));
        assert_eq!(parse(b"*1\r\n$2\r\nabXY"), Err(ProtocolError::Unterminated));
        let endless = vec![b'*'; 100];
        assert_eq!(parse(&endless), Err(ProtocolError::MultibulkLength), "a header line that never ends");
        let long = vec![b'a'; (64 << 10) + 1];
        assert_eq!(parse(&long), Err(ProtocolError::InlineTooLong));
    }

    #[test]
    fn a_command_over_the_limit_is_refused_by_its_headers_alone() {
        let limits = Limits { max_bulk: 100, max_command: 64, ..Limits::default() };
        let mut parser = Parser::default();
        // `*3`, SET, the key and the value's header: 25 bytes; the header
        // declares 40 more (and a CRLF), past 64, before any is sent.
        let mut buf = BytesMut::from(&b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$40\r\n"[..]);
        assert_eq!(parser.parse(&mut buf, &limits), Err(ProtocolError::CommandTooBig { declared: 67, limit: 64 }));
        let mut fits = BytesMut::from(&b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$37\r\n"[..]);
        assert_eq!(Parser::default().parse(&mut fits, &limits), Ok(None), "64 bytes: waits for the rest");
        // The default limits follow the value size.
        let limits = Limits::for_values(1 << 20, 64 << 10);
        assert_eq!(limits.max_command, 16 * ((1 << 20) + (64 << 10)) + (64 << 10));
        assert_eq!(limits.max_bulk, (1 << 20) + (64 << 10));
    }

    #[test]
    fn a_command_sent_in_pieces_is_scanned_once() {
        let whole = b"*4\r\n$4\r\nMSET\r\n$1\r\na\r\n$5\r\nhello\r\n$1\r\nb\r\n*1\r\n$4\r\nPING\r\n";
        let limits = Limits::default();
        let mut parser = Parser::default();
        let mut buf = BytesMut::new();
        let mut commands = Vec::new();
        for (i, &byte) in whole.iter().enumerate() {
            buf.extend_from_slice(&[byte]);
            if i == 30 {
                // What was parsed is not parsed again: spoil the first
                // argument's header in place, which only a parser that
                // started over would read.
                assert!(!parser.idle());
                buf[5] = b'#';
            }
            while let Some(args) = parser.parse(&mut buf, &limits).expect("valid") {
                commands.push(args);
            }
        }
        assert_eq!(commands, [vec![&b"MSET"[..], b"a", b"hello", b"b"], vec![&b"PING"[..]]]);
        assert!(buf.is_empty() && parser.idle());
        // An inline line arriving a byte at a time: searched once too.
        let mut parser = Parser::default();
        let mut buf = BytesMut::new();
        let mut lines = Vec::new();
        for &byte in b"SET k v\r\nGET k\n" {
            buf.extend_from_slice(&[byte]);
            if let Some(args) = parser.parse(&mut buf, &limits).expect("valid") {
                lines.push(args);
            }
        }
        assert_eq!(lines, [vec![&b"SET"[..], b"k", b"v"], vec![&b"GET"[..], b"k"]]);
    }

    #[test]
    fn inline_commands_split_on_spaces_and_quotes() {
        assert_eq!(
            parse(b"set k \"two words\\n\"\r\n").expect("ok").expect("line"),
            [&b"set"[..], b"k", b"two words\n"]
        );
        assert_eq!(parse(b"PING\n").expect("ok").expect("line"), [&b"PING"[..]]);
        assert_eq!(parse(b"get 'a b'\r\n").expect("ok").expect("line"), [&b"get"[..], b"a b"]);
        assert_eq!(parse(b"get \"open\r\n"), Err(ProtocolError::UnbalancedQuotes));
        assert_eq!(parse(b"get k"), Ok(None));
    }

    #[test]
    fn replies_follow_the_protocol_version() {
        let mut out = BytesMut::new();
        let mut w = Writer::new(&mut out, false);
        w.null();
        w.bulk(b"v");
        w.integer(-2);
        w.map(1);
        w.error("ERR bad\r\nthing");
        assert_eq!(&out[..], b"$-1\r\n$1\r\nv\r\n:-2\r\n*2\r\n-ERR bad  thing\r\n");
        let mut out = BytesMut::new();
        let mut w = Writer::new(&mut out, true);
        w.null();
        w.map(1);
        w.text("a:1");
        assert_eq!(&out[..], b"_\r\n%1\r\n=7\r\ntxt:a:1\r\n");
    }
}
