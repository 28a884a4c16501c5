//! A loader whose behaviour the key picks, for the loader tests. Keys are
//! `h:MODE[:ARG]`:
//!
//! - `h:echo:X` loads `X`; `h:ttl:MS:X` loads `X` with a TTL of `MS`;
//! - `h:none:X` finds nothing;
//! - `h:loop` spins forever, `h:trap` panics, `h:grow` allocates without end;
//! - `h:huge` returns a value larger than any node accepts (2 MiB);
//! - `h:forbidden` queries the origin `secret`, which no test allows;
//! - `h:sql:ORIGIN:STATEMENT` runs STATEMENT on ORIGIN and loads the first
//!   column of the first row;
//! - `h:fail` reports an invalid origin answer;
//! - `h:http:ORIGIN:PATH` GETs PATH from the HTTP origin ORIGIN: 200 loads
//!   the body, 404 finds nothing, any other status is invalid;
//! - `h:kv:K` reads (and `store` writes) row `K` of table `kv(k, v)` on
//!   origin `db`; `h:slowkv:K` the same with a 200 ms sleep before each
//!   store; `h:down:K` the same on origin `down`.
//!
//! `refresh` loads the same way, but `h:echo:X` refreshes to `X'`, so a test
//! can tell a refreshed value from the first load.

use cachet_policy_sdk::export_loader;
use cachet_policy_sdk::loader::{LoadError, Loaded, Loader, origin};

/// The misbehaving loader.
pub struct Hostile;

fn arg(key: &[u8], mode: &str) -> Option<String> {
    let key = std::str::from_utf8(key).ok()?;
    key.strip_prefix("h:")?.strip_prefix(mode)?.strip_prefix(':').map(str::to_owned)
}

impl Loader for Hostile {
    fn load(key: &[u8], _now: u64) -> Result<Option<Loaded>, LoadError> {
        if let Some(x) = arg(key, "echo") {
            return Ok(Some(Loaded::new(x)));
        }
        if let Some(rest) = arg(key, "ttl") {
            let (ms, x) = rest.split_once(':').ok_or(LoadError::Invalid("h:ttl:MS:X".into()))?;
            let ms = ms.parse().map_err(|_| LoadError::Invalid("bad ttl".into()))?;
            return Ok(Some(Loaded::with_ttl(x, ms)));
        }
        if arg(key, "none").is_some() {
            return Ok(None);
        }
        if let Some((origin_name, k)) = kv(key) {
            let rows = origin::query(origin_name, "SELECT v FROM kv WHERE k = $1", &[Some(&k)])?;
            let first = rows.into_iter().next().and_then(|r| r.into_iter().next()).flatten();
            return Ok(first.map(Loaded::new));
        }
        if let Some(rest) = arg(key, "http") {
            let (name, path) = rest.split_once(':').ok_or(LoadError::Invalid("h:http:ORIGIN:PATH".into()))?;
            let response = origin::http_get(name, path)?;
            return match response.status {
                200 => Ok(Some(Loaded::new(response.body))),
                404 => Ok(None),
                status => Err(LoadError::Invalid(format!("status {status}"))),
            };
        }
        if let Some(rest) = arg(key, "sql") {
            let (name, statement) = rest.split_once(':').ok_or(LoadError::Invalid("h:sql:ORIGIN:SQL".into()))?;
            let rows = origin::query(name, statement, &[])?;
            let first = rows.into_iter().next().and_then(|r| r.into_iter().next()).flatten();
            return Ok(first.map(Loaded::new));
        }
        match key {
            b"h:loop" => {
                let mut n = 0u64;
                #[allow(clippy::empty_loop)]
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            b"h:trap" => panic!("the hostile loader was asked to trap"),
            b"h:grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            b"h:huge" => Ok(Some(Loaded::new(vec![b'x'; 2 << 20]))),
            b"h:forbidden" => origin::query("secret", "SELECT 1", &[]).map(|_| None).map_err(Into::into),
            _ => Err(LoadError::Invalid(format!("unknown test key {}", String::from_utf8_lossy(key)))),
        }
    }

    fn store(key: &[u8], value: Option<&[u8]>) -> Result<(), LoadError> {
        let Some((origin_name, k)) = kv(key) else { return Err(LoadError::Unsupported) };
        if arg(key, "slowkv").is_some() {
            origin::query(origin_name, "SELECT pg_sleep(0.2)::text", &[])?;
        }
        match value {
            Some(v) => {
                let v = std::str::from_utf8(v).map_err(|_| LoadError::Invalid("values are text".into()))?;
                origin::query(
                    origin_name,
                    "INSERT INTO kv (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                    &[Some(&k), Some(v)],
                )?;
            }
            None => {
                origin::query(origin_name, "DELETE FROM kv WHERE k = $1", &[Some(&k)])?;
            }
        }
        Ok(())
    }

    fn refresh(key: &[u8], _current: &[u8], _age_ms: u64, now: u64) -> Result<Option<Loaded>, LoadError> {
        if let Some(x) = arg(key, "echo") {
            return Ok(Some(Loaded::new(format!("{x}'"))));
        }
        Self::load(key, now)
    }
}

/// The origin and row of a `h:kv:K`, `h:slowkv:K` or `h:down:K` key.
fn kv(key: &[u8]) -> Option<(&'static str, String)> {
    if let Some(k) = arg(key, "kv").or_else(|| arg(key, "slowkv")) {
        return Some(("db", k));
    }
    arg(key, "down").map(|k| ("down", k))
}

export_loader!(Hostile);
