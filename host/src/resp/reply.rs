//! A parsed command and the shape of its RESP reply: what the parser
//! hands the request path and the reply writer.

use cachet_proto::Request;

/// A command, parsed once.
pub enum Parsed {
    /// A data command: the request for the dispatcher, and how to write its
    /// reply.
    Data(Request, Reply),
    /// A malformed data command: the error reply's text.
    Invalid(String),
    /// A command the port answers itself (`commands::execute_local`).
    Local,
}

/// How a data command's reply is written in RESP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A bulk string or null (GET, GETDEL, GETEX, SET ... GET).
    Bulk,
    /// OK, or null when a condition kept the write from applying; a count
    /// as an integer (SET, MSET, DEL, EXISTS, DBSIZE).
    Write,
    /// 1 or 0 (EXPIRE, PERSIST).
    Flag,
    /// An integer (INCR, APPEND, STRLEN).
    Integer,
    /// An array of bulk strings (MGET).
    Values,
    /// A TTL in seconds or milliseconds, Redis's -2/-1 included.
    Ttl {
        /// PTTL.
        millis: bool,
    },
    /// OK whatever the count (FLUSHALL).
    Ok,
    /// The bytes `start..=end` of a GET's value, Redis's negative indexes
    /// included; empty for a missing key (GETRANGE, SUBSTR).
    Range {
        /// First index (from the end when negative).
        start: i64,
        /// Last index, included (from the end when negative).
        end: i64,
    },
    /// When a TTL ends, as a Unix time; Redis's -2/-1 included
    /// (EXPIRETIME, PEXPIRETIME).
    ExpireTime {
        /// PEXPIRETIME.
        millis: bool,
    },
    /// "string" for a key that exists, "none" otherwise (TYPE).
    Type,
    /// Computed from the value(s) read (GETBIT, BITCOUNT, BITPOS, LCS).
    Strings(StringReply),
    /// SCAN's cursor and keys; none with a TYPE other than `string`.
    Scan {
        /// Drop the keys (TYPE named a type Cachet has no keys of).
        none: bool,
    },
}

/// How one of these commands' replies is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringReply {
    /// GETBIT: the bit at `offset` (0 beyond the value).
    Bit {
        /// The bit's index.
        offset: u64,
    },
    /// BITCOUNT: set bits in a range of bytes (or bits).
    BitCount {
        /// First and last index (negative from the end), and whether they
        /// count bits rather than bytes; `None`: the whole value.
        range: Option<(i64, i64, bool)>,
    },
    /// BITPOS: the first bit set to `on` in a range.
    BitPos {
        /// The bit looked for.
        on: bool,
        /// First index (negative from the end).
        start: i64,
        /// Last index, if given.
        end: Option<i64>,
        /// Indexes count bits rather than bytes.
        bits: bool,
    },
    /// LCS: the longest common subsequence of two values, or its length.
    Lcs {
        /// LEN: the length only.
        len: bool,
    },
}
