//! A read-through loader for keys `user:ID`, from a PostgreSQL table
//!
//! ```sql
//! CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL);
//! ```
//!
//! The value cached for `user:42` is the row as JSON,
//! `{"id":42,"name":"Ada","email":"ada@example.org"}`. A key whose id is not a
//! number is an invalid request; an id with no row is "not found", which the
//! node caches negatively. The origin it queries is called `users-db` in the
//! node's loader configuration (see this directory's README).

use cachet_policy_sdk::export_loader;
use cachet_policy_sdk::loader::{LoadError, Loaded, Loader, origin};

/// The origin name this loader expects in the node configuration.
pub const ORIGIN: &str = "users-db";

/// Loads `user:ID` keys.
pub struct Users;

impl Loader for Users {
    fn load(key: &[u8], _now: u64) -> Result<Option<Loaded>, LoadError> {
        let id = user_id(key)?;
        let rows = origin::query(ORIGIN, "SELECT id::text, name, email FROM users WHERE id = $1", &[Some(id)])?;
        let Some(row) = rows.first() else { return Ok(None) };
        let column = |i: usize| -> Result<&str, LoadError> {
            let bytes = row.get(i).and_then(|c| c.as_deref()).ok_or_else(|| missing(i))?;
            std::str::from_utf8(bytes).map_err(|_| LoadError::Invalid(format!("column {i} is not UTF-8")))
        };
        Ok(Some(Loaded::new(to_json(column(0)?, column(1)?, column(2)?))))
    }
}

fn missing(i: usize) -> LoadError {
    LoadError::Invalid(format!("column {i} is missing or NULL"))
}

/// The numeric id of `user:ID`.
fn user_id(key: &[u8]) -> Result<&str, LoadError> {
    let id = key
        .strip_prefix(b"user:")
        .and_then(|id| std::str::from_utf8(id).ok())
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| LoadError::Invalid("keys look like user:<number>".into()))?;
    Ok(id)
}

/// `{"id":..,"name":..,"email":..}` with the strings escaped.
fn to_json(id: &str, name: &str, email: &str) -> String {
    format!(r#"{{"id":{id},"name":{},"email":{}}}"#, quote(name), quote(email))
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

export_loader!(Users);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_numbers() {
        assert_eq!(user_id(b"user:42"), Ok("42"));
        assert!(user_id(b"user:").is_err());
        assert!(user_id(b"user:4x").is_err());
        assert!(user_id(b"account:4").is_err());
    }

    #[test]
    fn json_is_escaped() {
        assert_eq!(to_json("1", "A \"B\"", "x\\y\n"), r#"{"id":1,"name":"A \"B\"","email":"x\\y\u000a"}"#);
    }

    #[test]
    fn natively_there_is_no_origin() {
        assert!(matches!(Users::load(b"user:1", 0), Err(LoadError::Origin(_))));
    }
}
