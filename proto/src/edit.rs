//! In-place edits of a string value (Redis's SETRANGE, SETBIT and
//! INCRBYFLOAT), as pure functions of the value: a single node applies
//! them under the key's shard lock, a cluster at the key's primary, with
//! the same code and the same answers.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The largest value an edit may grow a string to (Redis's
/// `proto-max-bulk-len` default; a node's own value limit applies too).
pub const MAX_EDITED_LEN: u64 = 512 << 20;

/// An edit of one key's value; the key's TTL is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Edit {
    /// Overwrite bytes from `offset`, zero-padding a shorter value
    /// (SETRANGE); answers the new length.
    SetRange {
        /// Where the bytes go.
        offset: u64,
        /// The bytes.
        bytes: Bytes,
    },
    /// Set or clear one bit, counted from the first byte's most
    /// significant bit (SETBIT); answers the bit's old value.
    SetBit {
        /// The bit's index.
        offset: u64,
        /// Its new value.
        on: bool,
    },
    /// Add a decimal number to a decimal value (0 when absent), written
    /// back in the shortest form that reads as the same number
    /// (INCRBYFLOAT); answers the new value. The increment travels as its
    /// text.
    IncrByFloat(String),
}

/// What an edit does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edited {
    /// The new value to store (`None`: nothing changes).
    pub value: Option<Bytes>,
    /// The answer.
    pub answer: EditAnswer,
}

/// An edit's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EditAnswer {
    /// SETRANGE's length, SETBIT's old bit.
    Integer(i64),
    /// INCRBYFLOAT's new value.
    Value(Bytes),
}

/// Why an edit does not apply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// The value or the increment is not a number.
    #[error("value is not a valid float")]
    NotAFloat,
    /// The sum would not be a finite number.
    #[error("increment would produce NaN or Infinity")]
    NotFinite,
    /// The edit would grow the value past [`MAX_EDITED_LEN`].
    #[error("string exceeds maximum allowed size (proto-max-bulk-len)")]
    TooLong,
    /// The edit would grow the value past the node's value size limit.
    #[error("the value would be {len} bytes, over the {limit}-byte limit")]
    OverLimit {
        /// Its length.
        len: u64,
        /// The limit.
        limit: usize,
    },
}

impl Edit {
    /// Applies the edit to `current` (`None`: no such key); a value that
    /// would grow past `max_len` is refused before it is built.
    pub fn apply(&self, current: Option<&[u8]>, max_len: usize) -> Result<Edited, EditError> {
        let len = current.map_or(0, <[u8]>::len) as u64;
        let grown = match self {
            Self::SetRange { offset, bytes } if !bytes.is_empty() => offset.checked_add(bytes.len() as u64),
            Self::SetBit { offset, .. } => Some(offset / 8 + 1),
            _ => Some(0),
        };
        match grown {
            None => return Err(EditError::TooLong),
            Some(n) if n > MAX_EDITED_LEN => return Err(EditError::TooLong),
            Some(n) if n.max(len) > max_len as u64 && n > len => {
                return Err(EditError::OverLimit { len: n, limit: max_len });
            }
            _ => {}
        }
        match self {
            Self::SetRange { offset, bytes } => {
                let len = current.map_or(0, <[u8]>::len);
                // An empty write changes nothing (and creates no key).
                if bytes.is_empty() {
                    return Ok(Edited { value: None, answer: EditAnswer::Integer(len as i64) });
                }
                let end = offset
                    .checked_add(bytes.len() as u64)
                    .filter(|e| *e <= MAX_EDITED_LEN)
                    .ok_or(EditError::TooLong)?;
                let new_len = (end as usize).max(len);
                let mut value = BytesMut::zeroed(new_len);
                if let Some(current) = current {
                    value[..len].copy_from_slice(current);
                }
                value[*offset as usize..end as usize].copy_from_slice(bytes);
                Ok(Edited { value: Some(value.freeze()), answer: EditAnswer::Integer(new_len as i64) })
            }
            Self::SetBit { offset, on } => {
                let byte = offset / 8;
                if byte >= MAX_EDITED_LEN {
                    return Err(EditError::TooLong);
                }
                let byte = byte as usize;
                let mask = 0x80u8 >> (offset % 8);
                let len = current.map_or(0, <[u8]>::len).max(byte + 1);
                let mut value = BytesMut::zeroed(len);
                if let Some(current) = current {
                    value[..current.len()].copy_from_slice(current);
                }
                let old = value[byte] & mask != 0;
                if *on {
                    value[byte] |= mask;
                } else {
                    value[byte] &= !mask;
                }
                Ok(Edited { value: Some(value.freeze()), answer: EditAnswer::Integer(i64::from(old)) })
            }
            Self::IncrByFloat(by) => {
                let by = parse_float(by.as_bytes()).ok_or(EditError::NotAFloat)?;
                let now = match current {
                    None => 0.0,
                    Some(value) => parse_float(value).ok_or(EditError::NotAFloat)?,
                };
                let sum = now + by;
                if !sum.is_finite() {
                    return Err(EditError::NotFinite);
                }
                let text = Bytes::from(format_float(sum));
                Ok(Edited { value: Some(text.clone()), answer: EditAnswer::Value(text) })
            }
        }
    }
}

/// A decimal number as Redis reads one (no surrounding space, not NaN or
/// infinite).
pub fn parse_float(text: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(text).ok()?;
    if text.is_empty() || text.trim() != text {
        return None;
    }
    text.parse::<f64>().ok().filter(|f| f.is_finite())
}

/// A number as INCRBYFLOAT writes it: the shortest decimal that reads back
/// as the same number, without an exponent or trailing zeros (`10.6`,
/// `5200`, `0.0001`).
pub fn format_float(value: f64) -> String {
    let text = format!("{value}");
    if text == "-0" { "0".into() } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(edit: &Edit, current: Option<&str>) -> (Option<String>, EditAnswer) {
        let Ok(Edited { value, answer }) = edit.apply(current.map(str::as_bytes), usize::MAX) else {
            panic!("{edit:?}")
        };
        (value.map(|v| String::from_utf8_lossy(&v).into_owned()), answer)
    }

    #[test]
    fn edits_answer_as_redis_does() {
        let range =
            |offset, bytes: &'static str| Edit::SetRange { offset, bytes: Bytes::from_static(bytes.as_bytes()) };
        assert_eq!(
            answer(&range(6, "Redis"), Some("Hello World")),
            (Some("Hello Redis".into()), EditAnswer::Integer(11))
        );
        assert_eq!(answer(&range(3, "ab"), None), (Some("\0\0\0ab".into()), EditAnswer::Integer(5)));
        assert_eq!(answer(&range(3, ""), None), (None, EditAnswer::Integer(0)), "no key made");
        assert_eq!(range(MAX_EDITED_LEN, "x").apply(None, usize::MAX), Err(EditError::TooLong));
        assert_eq!(range(u64::MAX, "x").apply(None, usize::MAX), Err(EditError::TooLong));
        assert_eq!(
            range(99, "x").apply(None, 64),
            Err(EditError::OverLimit { len: 100, limit: 64 }),
            "refused unbuilt"
        );

        let bit = |offset, on| Edit::SetBit { offset, on };
        assert_eq!(answer(&bit(7, true), None), (Some("\u{1}".into()), EditAnswer::Integer(0)));
        assert_eq!(answer(&bit(1, true), Some("\u{1}")), (Some("A".into()), EditAnswer::Integer(0)));
        assert_eq!(answer(&bit(7, false), Some("A")), (Some("@".into()), EditAnswer::Integer(1)));
        assert_eq!(bit(MAX_EDITED_LEN * 8, true).apply(None, usize::MAX), Err(EditError::TooLong));

        let add = |by: &str| Edit::IncrByFloat(by.into());
        let value = |s: &str| EditAnswer::Value(Bytes::copy_from_slice(s.as_bytes()));
        assert_eq!(answer(&add("0.1"), Some("10.50")).1, value("10.6"));
        assert_eq!(answer(&add("2.0e2"), Some("5.0e3")).1, value("5200"));
        assert_eq!(answer(&add("-5"), Some("5")).1, value("0"));
        assert_eq!(answer(&add("3"), None).1, value("3"));
        assert_eq!(add("1").apply(Some(b"abc"), usize::MAX), Err(EditError::NotAFloat));
        assert_eq!(add(" 1").apply(None, usize::MAX), Err(EditError::NotAFloat));
        assert_eq!(add("1.7e308").apply(Some(b"1.7e308"), usize::MAX), Err(EditError::NotFinite));
        assert_eq!(add("inf").apply(None, usize::MAX), Err(EditError::NotAFloat));
    }
}
