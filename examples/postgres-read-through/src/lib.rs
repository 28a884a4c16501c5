//! A read-through loader for keys `user:ID`, from a PostgreSQL table
//!
//! ```sql
//! CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL);
//! ```
//!
//! The value cached for `user:42` is the row as JSON,
//! `{"id":42,"name":"Ada","email":"ada@example.org"}`. A key whose id is not a
//! number is an invalid request; an id with no row is "not found", which the
//! node caches negatively. In a namespace configured `write = "through"` (or
//! `"behind"`), `SET user:42 {"id":42,"name":..,"email":..}` upserts the row
//! and `DEL user:42` deletes it. The origin it queries is called `users-db` in the
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

    fn store(key: &[u8], value: Option<&[u8]>) -> Result<(), LoadError> {
        let id = user_id(key)?;
        let Some(value) = value else {
            origin::query(ORIGIN, "DELETE FROM users WHERE id = $1", &[Some(id)])?;
            return Ok(());
        };
        let text = std::str::from_utf8(value).map_err(|_| LoadError::Invalid("the value is not UTF-8".into()))?;
        let fields = parse_object(text).ok_or_else(|| LoadError::Invalid("the value is not a user object".into()))?;
        let field = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| LoadError::Invalid(format!("the user has no `{name}`")))
        };
        if field("id")? != id {
            return Err(LoadError::Invalid(format!("the value's id is not the key's ({id})")));
        }
        origin::query(
            ORIGIN,
            "INSERT INTO users (id, name, email) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email",
            &[Some(id), Some(field("name")?), Some(field("email")?)],
        )?;
        Ok(())
    }
}

/// The fields of a flat JSON object of strings and integers, as text.
/// Enough for the values this loader writes; anything else is `None`.
fn parse_object(text: &str) -> Option<Vec<(String, String)>> {
    let mut chars = text.trim().chars().peekable();
    let mut fields = Vec::new();
    if chars.next()? != '{' {
        return None;
    }
    loop {
        skip_spaces(&mut chars);
        if chars.peek() == Some(&'}') && fields.is_empty() {
            chars.next();
            break;
        }
        let key = parse_string(&mut chars)?;
        skip_spaces(&mut chars);
        if chars.next()? != ':' {
            return None;
        }
        skip_spaces(&mut chars);
        let value = if chars.peek() == Some(&'"') {
            parse_string(&mut chars)?
        } else {
            let mut digits = String::new();
            while let Some(&c) = chars.peek().filter(|c| c.is_ascii_digit() || **c == '-') {
                digits.push(c);
                chars.next();
            }
            if digits.is_empty() {
                return None;
            }
            digits
        };
        fields.push((key, value));
        skip_spaces(&mut chars);
        match chars.next()? {
            ',' => continue,
            '}' => break,
            _ => return None,
        }
    }
    skip_spaces(&mut chars);
    chars.next().is_none().then_some(fields)
}

fn skip_spaces(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while chars.peek().is_some_and(|c| c.is_whitespace()) {
        chars.next();
    }
}

fn parse_string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<String> {
    if chars.next()? != '"' {
        return None;
    }
    let mut out = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                '/' => out.push('/'),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'u' => {
                    let hex: String = (0..4).map(|_| chars.next()).collect::<Option<String>>()?;
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                _ => return None,
            },
            c => out.push(c),
        }
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
    fn written_values_parse_back() {
        let json = to_json("7", "A \"q\" \\ b", "x@y\n");
        let fields = parse_object(&json).expect("our own JSON parses");
        assert_eq!(
            fields,
            vec![("id".into(), "7".into()), ("name".into(), "A \"q\" \\ b".into()), ("email".into(), "x@y\n".into())]
        );
        assert_eq!(parse_object("{}"), Some(vec![]));
        for bad in ["", "[1]", "{\"id\":}", "{\"id\":1,}", "{\"id\":1} x", "{\"a\":\"\\q\"}"] {
            assert_eq!(parse_object(bad), None, "{bad}");
        }
    }

    #[test]
    fn natively_there_is_no_origin() {
        assert!(matches!(Users::load(b"user:1", 0), Err(LoadError::Origin(_))));
    }
}
