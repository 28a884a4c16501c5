//! Redis's bit and string-edit commands: SETRANGE, SETBIT and INCRBYFLOAT
//! become in-place edits ([`Request::Edit`], run where the key lives),
//! and GETBIT, BITCOUNT, BITPOS and LCS are computed here from the
//! values a GET or MGET reads, so they need nothing new from the store or
//! the cluster.

use super::codec::Writer;
use super::reply::{Parsed, Reply, StringReply};
use bytes::Bytes;
use cachet_proto::{Edit, Request, Response};

const SYNTAX: &str = "ERR syntax error";
const NOT_INT: &str = "ERR value is not an integer or out of range";
const BIT_OFFSET: &str = "ERR bit offset is not an integer or out of range";

/// LCS refuses values whose lengths multiply past this (its table is that
/// many cells): memory and time per command stay bounded.
pub const MAX_LCS_CELLS: usize = 4 << 20;

fn int(arg: &[u8]) -> Option<i64> {
    std::str::from_utf8(arg).ok()?.parse().ok()
}

/// A bit offset: below 2^32, as Redis allows.
fn bit_offset(arg: &[u8]) -> Option<u64> {
    int(arg).and_then(|n| u64::try_from(n).ok()).filter(|n| *n < 1 << 32)
}

/// `BYTE` or `BIT`: whether indexes count bits.
fn unit(arg: &[u8]) -> Option<bool> {
    match String::from_utf8_lossy(arg).to_ascii_uppercase().as_str() {
        "BYTE" => Some(false),
        "BIT" => Some(true),
        _ => None,
    }
}

/// Parses one of these commands (`name` upper-case, arity checked by the
/// caller's table); `None` for any other command.
pub fn parse(name: &str, args: &[Bytes]) -> Option<Parsed> {
    let n = args.len();
    let key = || args[1].clone();
    let data = |request, reply| Some(Parsed::Data(request, Reply::Strings(reply)));
    let edit = |edit, reply| Some(Parsed::Data(Request::Edit { key: key(), edit }, reply));
    let invalid = |message: &str| Some(Parsed::Invalid(message.into()));
    match name {
        "SETRANGE" if n == 4 => match int(&args[2]).and_then(|o| u64::try_from(o).ok()) {
            Some(offset) => edit(Edit::SetRange { offset, bytes: args[3].clone() }, Reply::Integer),
            None => invalid("ERR offset is out of range"),
        },
        "SETBIT" if n == 4 => match (bit_offset(&args[2]), &args[3][..]) {
            (None, _) => invalid(BIT_OFFSET),
            (Some(offset), b"0" | b"1") => edit(Edit::SetBit { offset, on: &args[3][..] == b"1" }, Reply::Integer),
            _ => invalid("ERR bit is not an integer or out of range"),
        },
        "INCRBYFLOAT" if n == 3 => match cachet_proto::edit::parse_float(&args[2]) {
            Some(_) => edit(Edit::IncrByFloat(String::from_utf8_lossy(&args[2]).into_owned()), Reply::Bulk),
            None => invalid("ERR value is not a valid float"),
        },
        "GETBIT" if n == 3 => match bit_offset(&args[2]) {
            Some(offset) => data(Request::Get { key: key() }, StringReply::Bit { offset }),
            None => invalid(BIT_OFFSET),
        },
        "BITCOUNT" if n == 2 => data(Request::Get { key: key() }, StringReply::BitCount { range: None }),
        "BITCOUNT" if n == 4 || n == 5 => {
            let bits = if n == 5 { unit(&args[4]) } else { Some(false) };
            match (int(&args[2]), int(&args[3]), bits) {
                (Some(start), Some(end), Some(bits)) => {
                    data(Request::Get { key: key() }, StringReply::BitCount { range: Some((start, end, bits)) })
                }
                (_, _, None) => invalid(SYNTAX),
                _ => invalid(NOT_INT),
            }
        }
        "BITCOUNT" => invalid(SYNTAX),
        "BITPOS" if (3..=6).contains(&n) => {
            let on = match &args[2][..] {
                b"0" => false,
                b"1" => true,
                _ => return invalid("ERR The bit argument must be 1 or 0."),
            };
            let start = if n > 3 { int(&args[3]) } else { Some(0) };
            let end = if n > 4 { int(&args[4]).map(Some) } else { Some(None) };
            let bits = if n > 5 { unit(&args[5]) } else { Some(false) };
            match (start, end, bits) {
                (Some(start), Some(end), Some(bits)) => {
                    data(Request::Get { key: key() }, StringReply::BitPos { on, start, end, bits })
                }
                (_, _, None) => invalid(SYNTAX),
                _ => invalid(NOT_INT),
            }
        }
        "LCS" if n >= 3 => {
            let mut len = false;
            for option in &args[3..] {
                match String::from_utf8_lossy(option).to_ascii_uppercase().as_str() {
                    "LEN" => len = true,
                    "IDX" | "MINMATCHLEN" | "WITHMATCHLEN" => {
                        return invalid("ERR LCS IDX is not supported by Cachet (LEN and the plain form are)");
                    }
                    _ => return invalid(SYNTAX),
                }
            }
            let keys = vec![args[1].clone(), args[2].clone()];
            data(Request::MGet { keys }, StringReply::Lcs { len })
        }
        _ => None,
    }
}

/// Writes the reply computed from what the GET or MGET read.
pub fn write(w: &mut Writer<'_>, reply: StringReply, response: Response) {
    match (reply, response) {
        (StringReply::Bit { offset }, Response::Value(v)) => w.integer(i64::from(bit(v.as_deref(), offset))),
        (StringReply::BitCount { range }, Response::Value(v)) => w.integer(bit_count(v.as_deref(), range) as i64),
        (StringReply::BitPos { on, start, end, bits }, Response::Value(v)) => {
            w.integer(bit_pos(v.as_deref(), on, start, end, bits))
        }
        (StringReply::Lcs { len }, Response::Values(values)) => {
            let a = values.first().cloned().flatten().unwrap_or_default();
            let b = values.get(1).cloned().flatten().unwrap_or_default();
            if a.len().saturating_mul(b.len()) > MAX_LCS_CELLS {
                w.error(&format!(
                    "ERR LCS of values of {} and {} bytes is refused: Cachet computes it for at most {MAX_LCS_CELLS} \
                     byte pairs",
                    a.len(),
                    b.len()
                ));
                return;
            }
            let common = lcs(&a, &b);
            if len {
                w.integer(common.len() as i64);
            } else {
                w.bulk(&common);
            }
        }
        (_, other) => w.error(&format!("ERR unexpected reply {other:?}")),
    }
}

/// The bit at `offset`, counted from the first byte's most significant.
fn bit(value: Option<&[u8]>, offset: u64) -> bool {
    let byte = usize::try_from(offset / 8).unwrap_or(usize::MAX);
    value.and_then(|v| v.get(byte)).is_some_and(|b| b & (0x80 >> (offset % 8)) != 0)
}

/// `start..=end` of `len` items, Redis's negative indexes and clamping;
/// `None` when empty.
fn span(len: u64, start: i64, end: i64) -> Option<(u64, u64)> {
    let len = len as i64;
    let fix = |i: i64| if i < 0 { (i + len).max(0) } else { i };
    let (start, end) = (fix(start), fix(end).min(len - 1));
    (len > 0 && start <= end).then_some((start as u64, end as u64))
}

/// Set bits of `value` in `range` (bytes, or bits).
fn bit_count(value: Option<&[u8]>, range: Option<(i64, i64, bool)>) -> u64 {
    let value = value.unwrap_or_default();
    match range {
        None => value.iter().map(|b| u64::from(b.count_ones())).sum(),
        Some((start, end, false)) => match span(value.len() as u64, start, end) {
            Some((s, e)) => value[s as usize..=e as usize].iter().map(|b| u64::from(b.count_ones())).sum(),
            None => 0,
        },
        Some((start, end, true)) => match span(value.len() as u64 * 8, start, end) {
            Some((s, e)) => (s..=e).filter(|i| bit(Some(value), *i)).count() as u64,
            None => 0,
        },
    }
}

/// The first bit set to `on` from `start` to `end` (bytes, or bits), as
/// Redis answers BITPOS: -1 when none; looking for a 0 with no `end`, the
/// value counts as followed by zeros.
fn bit_pos(value: Option<&[u8]>, on: bool, start: i64, end: Option<i64>, bits: bool) -> i64 {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return if on { -1 } else { 0 };
    };
    let unit = if bits { 1 } else { 8 };
    let items = value.len() as u64 * 8 / unit;
    let Some((s, e)) = span(items, start, end.unwrap_or(-1)) else { return -1 };
    let (first, last) = (s * unit, e * unit + unit - 1);
    match (first..=last).find(|i| bit(Some(value), *i) == on) {
        Some(i) => i as i64,
        None if !on && end.is_none() => (last + 1) as i64,
        None => -1,
    }
}

/// The longest common subsequence of `a` and `b` (the first one found
/// walking back from their ends, as Redis's).
fn lcs(a: &[u8], b: &[u8]) -> Vec<u8> {
    let (n, m) = (a.len(), b.len());
    let width = m + 1;
    let mut table = vec![0u32; (n + 1) * width];
    for i in 1..=n {
        for j in 1..=m {
            table[i * width + j] = if a[i - 1] == b[j - 1] {
                table[(i - 1) * width + j - 1] + 1
            } else {
                table[(i - 1) * width + j].max(table[i * width + j - 1])
            };
        }
    }
    let mut out = Vec::with_capacity(table[n * width + m] as usize);
    let (mut i, mut j) = (n, m);
    while i > 0 && j > 0 {
        if a[i - 1] == b[j - 1] {
            out.push(a[i - 1]);
            i -= 1;
            j -= 1;
        } else if table[(i - 1) * width + j] > table[i * width + j - 1] {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    out.reverse();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_commands_answer_as_redis_does() {
        // Redis's documentation examples.
        let foobar = Some(&b"foobar"[..]);
        assert_eq!(bit_count(foobar, None), 26);
        assert_eq!(bit_count(foobar, Some((0, 0, false))), 4);
        assert_eq!(bit_count(foobar, Some((1, 1, false))), 6);
        assert_eq!(bit_count(foobar, Some((1, 1, true))), 1);
        assert_eq!(bit_count(foobar, Some((5, 30, true))), 17);
        assert_eq!(bit_count(foobar, Some((-2, -1, false))), 7);
        assert_eq!(bit_count(None, Some((0, -1, false))), 0);
        let v = Some(&[0xff, 0xf0, 0x00][..]);
        assert_eq!(bit_pos(v, false, 0, None, false), 12);
        assert_eq!(bit_pos(Some(&[0x00, 0xff, 0xf0][..]), true, 0, None, false), 8);
        assert_eq!(bit_pos(Some(&[0x00, 0xff, 0xf0][..]), true, 2, None, false), 16);
        assert_eq!(bit_pos(Some(&[0x00, 0xff, 0xf0][..]), true, 2, Some(-1), false), 16);
        assert_eq!(bit_pos(Some(&[0x00, 0xff, 0xf0][..]), true, 7, Some(15), true), 8);
        assert_eq!(bit_pos(Some(&[0x00, 0x00, 0x00][..]), true, 0, None, false), -1);
        assert_eq!(bit_pos(Some(&[0xff, 0xff][..]), false, 0, None, false), 16, "zeros follow the value");
        assert_eq!(bit_pos(Some(&[0xff, 0xff][..]), false, 0, Some(-1), false), -1, "not with an end");
        assert_eq!(bit_pos(None, false, 0, None, false), 0);
        assert_eq!(bit_pos(None, true, 0, None, false), -1);
        assert!(bit(Some(&b"`"[..]), 1) && bit(Some(&b"`"[..]), 2) && !bit(Some(&b"`"[..]), 3));
        assert!(!bit(Some(&b"`"[..]), 100));
        assert_eq!(lcs(b"ohmytext", b"mynewtext"), b"mytext");
        assert_eq!(lcs(b"", b"abc"), b"");
    }
}
