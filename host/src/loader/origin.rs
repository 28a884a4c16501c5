//! Origins: the databases (and later HTTP services) the host queries for
//! loader modules. A guest only names an origin and passes parameters; the
//! host holds the connections, binds the parameters (never splicing them
//! into statement text), bounds every call with a deadline and every result
//! by size.

use super::config::OriginConfig;
use super::pg_tls::{self, PgTls};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::TryStreamExt;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_postgres::types::{ToSql, Type};

/// Rows a single query may return to a loader.
const MAX_ROWS: usize = 10_000;
/// Bytes a single query may return to a loader.
const MAX_RESULT_BYTES: usize = 16 << 20;

/// Why an origin request failed (mirrors the WIT `origin-error`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OriginFailure {
    /// The namespace may not use this origin, or it does not exist.
    #[error("origin `{0}` is not allowed for this namespace")]
    NotAllowed(String),
    /// No connection could be had in time.
    #[error("origin unavailable: {0}")]
    Unavailable(String),
    /// The origin did not answer within its deadline.
    #[error("origin timed out")]
    Timeout,
    /// The origin answered with an error.
    #[error("origin failed: {0}")]
    Failed(String),
    /// The request is unusable (bad parameter, unsupported column type...).
    #[error("bad origin request: {0}")]
    BadRequest(String),
    /// The TLS handshake the connection string asks for failed: the
    /// server's certificate was refused (wrong CA, wrong host name, expired)
    /// or the server does not speak TLS. Retrying will not help; fix
    /// `sslmode`/`sslrootcert` or the server's certificate.
    #[error("TLS to the origin failed: {0}; check sslmode and sslrootcert")]
    Tls(String),
}

/// One result row, each column as bytes (`None` for NULL).
pub type Row = Vec<Option<Vec<u8>>>;

/// A PostgreSQL origin: a connection pool and a deadline.
pub struct PostgresOrigin {
    pool: Pool,
    pg_config: tokio_postgres::Config,
    /// The connection string's TLS, kept for the change feed's own
    /// connection.
    tls: PgTls,
    deadline: Duration,
    queries: AtomicU64,
    failures: AtomicU64,
}

/// Counters of one origin, for stats and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OriginStats {
    /// The origin's name.
    pub name: String,
    /// Requests sent.
    pub queries: u64,
    /// Requests that failed (any reason).
    pub failures: u64,
}

/// An HTTP origin: allow-listed base URLs and an agent with a deadline.
pub struct HttpOrigin {
    bases: Vec<String>,
    agent: ureq::Agent,
    queries: AtomicU64,
    failures: AtomicU64,
}

/// The origins of a node, by name.
pub struct Origins {
    postgres: BTreeMap<String, PostgresOrigin>,
    http: BTreeMap<String, HttpOrigin>,
    handle: tokio::runtime::Handle,
}

impl Origins {
    /// Builds pools for `configs` (connections open lazily, so a database
    /// that is down at start-up does not stop the node). Must be called
    /// inside the runtime that will drive the connections.
    pub fn new(configs: &BTreeMap<String, OriginConfig>, handle: tokio::runtime::Handle) -> Result<Self, String> {
        let mut postgres = BTreeMap::new();
        let mut http = BTreeMap::new();
        for (name, config) in configs {
            if let Some(bases) = &config.http {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_millis(config.request_timeout_ms)))
                    .timeout_connect(Some(Duration::from_millis(config.connect_timeout_ms)))
                    // Statuses go to the loader; redirects are not followed,
                    // since they could lead outside the allow-list.
                    .http_status_as_error(false)
                    .max_redirects(0)
                    .user_agent("cachet")
                    .build()
                    .into();
                let origin =
                    HttpOrigin { bases: bases.clone(), agent, queries: AtomicU64::new(0), failures: AtomicU64::new(0) };
                http.insert(name.clone(), origin);
            }
            let Some(url) = &config.postgres else { continue };
            let (mut pg_config, tls) = pg_tls::parse(url).map_err(|e| format!("origin `{name}`: {e}"))?;
            let connect = Duration::from_millis(config.connect_timeout_ms);
            pg_config.connect_timeout(connect);
            pg_config.options(format!("-c statement_timeout={}", config.statement_timeout_ms));
            pg_config.application_name("cachet");
            let manager = Manager::from_config(
                pg_config.clone(),
                tls.clone(),
                ManagerConfig { recycling_method: RecyclingMethod::Fast },
            );
            let pool = Pool::builder(manager)
                .max_size(config.pool_size)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(connect))
                .create_timeout(Some(connect))
                .recycle_timeout(Some(connect))
                .build()
                .map_err(|e| format!("origin `{name}`: {e}"))?;
            let deadline = Duration::from_millis(config.statement_timeout_ms.saturating_add(1_000));
            let origin = PostgresOrigin {
                pool,
                pg_config,
                tls,
                deadline,
                queries: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            };
            postgres.insert(name.clone(), origin);
        }
        Ok(Self { postgres, http, handle })
    }

    /// The connection settings and TLS of a PostgreSQL origin (for LISTEN).
    pub(crate) fn postgres_config(&self, name: &str) -> Option<(tokio_postgres::Config, PgTls)> {
        self.postgres.get(name).map(|o| (o.pg_config.clone(), o.tls.clone()))
    }

    /// Counters per origin.
    pub fn stats(&self) -> Vec<OriginStats> {
        let stats = |name: &String, queries: &AtomicU64, failures: &AtomicU64| OriginStats {
            name: name.clone(),
            queries: queries.load(Ordering::Relaxed),
            failures: failures.load(Ordering::Relaxed),
        };
        let pg = self.postgres.iter().map(|(name, o)| stats(name, &o.queries, &o.failures));
        pg.chain(self.http.iter().map(|(name, o)| stats(name, &o.queries, &o.failures))).collect()
    }

    /// Runs a query from a thread outside the runtime (a loader call runs
    /// on a blocking thread), waiting at most the origin's deadline.
    /// `read_only` runs it in a `READ ONLY` transaction, so PostgreSQL
    /// itself refuses any write the statement attempts.
    pub fn query_blocking(
        &self,
        name: &str,
        statement: &str,
        params: &[Option<String>],
        read_only: bool,
    ) -> Result<Vec<Row>, OriginFailure> {
        let origin = self.postgres.get(name).ok_or_else(|| OriginFailure::NotAllowed(name.to_string()))?;
        origin.queries.fetch_add(1, Ordering::Relaxed);
        let result = self.handle.block_on(async {
            match tokio::time::timeout(origin.deadline, query(&origin.pool, statement, params, read_only)).await {
                Ok(result) => result,
                Err(_) => Err(OriginFailure::Timeout),
            }
        });
        if result.is_err() {
            origin.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

impl Origins {
    /// GETs `path` below the HTTP origin `name`'s base URLs (tried in order
    /// while unreachable or answering 5xx), from a blocking thread. `path`
    /// may not leave the base: no `..` segment, no leading `/`, no scheme,
    /// credentials, fragment, backslash, whitespace or control character.
    pub fn http_get_blocking(&self, name: &str, path: &str) -> Result<(u16, Vec<u8>), OriginFailure> {
        let origin = self.http.get(name).ok_or_else(|| OriginFailure::NotAllowed(name.to_string()))?;
        check_path(path)?;
        origin.queries.fetch_add(1, Ordering::Relaxed);
        let result = http_get(origin, path);
        if result.is_err() {
            origin.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

pub(crate) fn check_path(path: &str) -> Result<(), OriginFailure> {
    // Escaped: the path comes from a guest fed a client's key, and the
    // message reaches log lines, where a raw newline could forge one.
    let bad = |why: &str| Err(OriginFailure::BadRequest(format!("path `{}` {why}", path.escape_debug())));
    let route = path.split('?').next().unwrap_or_default();
    let lower = route.to_ascii_lowercase();
    if path.starts_with('/') || route.contains("//") {
        return bad("must be relative to the origin's base URL, without empty segments");
    }
    // A segment counts as `.` or `..` by what comes before any path
    // parameter: Tomcat and others strip `;...` (raw or as `%3b`) before
    // resolving, so `..;x/` climbs there.
    let climbs = |segment: &str| {
        let stem = segment.split(';').next().unwrap_or_default();
        let stem = stem.split("%3b").next().unwrap_or_default();
        stem == ".." || stem == "."
    };
    // `%25` is refused outright: with no escaped `%`, one decoding step is
    // all a server can do, so the escapes checked here are all there are
    // (`%252e` would otherwise decode to `%2e`, then to `.`).
    if lower.split('/').any(climbs) || ["%2e", "%2f", "%5c", "%25"].iter().any(|escape| lower.contains(escape)) {
        return bad("may not climb out of the base URL (`..`, `.`, path parameters on them, \
             or escaped dots, slashes, backslashes and percent signs)");
    }
    if route.contains(':') || path.contains(['@', '#', '\\']) {
        return bad("may not hold a scheme, a port, credentials, a fragment or backslashes");
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("may not hold spaces or control characters");
    }
    Ok(())
}

fn http_get(origin: &HttpOrigin, path: &str) -> Result<(u16, Vec<u8>), OriginFailure> {
    let mut last = OriginFailure::Unavailable("no base URL answered".into());
    for (i, base) in origin.bases.iter().enumerate() {
        let url = format!("{base}{path}");
        match origin.agent.get(&url).call() {
            Ok(mut response) => {
                let status = response.status().as_u16();
                if status >= 500 && i + 1 < origin.bases.len() {
                    last = OriginFailure::Failed(format!("{base} answered {status}"));
                    continue;
                }
                let body = response.body_mut().with_config().limit(MAX_RESULT_BYTES as u64).read_to_vec().map_err(
                    |e| match e {
                        ureq::Error::Timeout(_) => OriginFailure::Timeout,
                        ureq::Error::BodyExceedsLimit(_) => {
                            OriginFailure::BadRequest(format!("the response exceeds {MAX_RESULT_BYTES} bytes"))
                        }
                        other => OriginFailure::Failed(other.to_string()),
                    },
                )?;
                return Ok((status, body));
            }
            Err(ureq::Error::Timeout(_)) => return Err(OriginFailure::Timeout),
            Err(err) => last = OriginFailure::Unavailable(format!("{base}: {err}")),
        }
    }
    Err(last)
}

async fn query(
    pool: &Pool,
    statement: &str,
    params: &[Option<String>],
    read_only: bool,
) -> Result<Vec<Row>, OriginFailure> {
    let mut client = pool.get().await.map_err(|e| match pg_tls::tls_failure(&e) {
        Some(tls) => OriginFailure::Tls(tls),
        None => OriginFailure::Unavailable(e.to_string()),
    })?;
    if !read_only {
        let prepared = client.prepare_cached(statement).await.map_err(|e| pg_failure(&e))?;
        let pg: &tokio_postgres::Client = &client;
        return read_rows(pg, &prepared, params).await;
    }
    // One transaction per statement: the guest's statement is its only
    // one, so even a statement that ends the transaction (COMMIT, SET
    // TRANSACTION) has nothing left to run read-write. On an error, or a
    // deadline, dropping the transaction rolls it back.
    let tx = client.build_transaction().read_only(true).start().await.map_err(|e| pg_failure(&e))?;
    let prepared = tx.prepare_cached(statement).await.map_err(|e| pg_failure(&e))?;
    let pg: &tokio_postgres::Transaction<'_> = &tx;
    let rows = read_rows(pg, &prepared, params).await?;
    tx.commit().await.map_err(|e| pg_failure(&e))?;
    Ok(rows)
}

/// Binds `params` to `prepared` and reads its rows on `client` (a
/// connection or a transaction), within the row and byte limits.
async fn read_rows(
    client: &impl tokio_postgres::GenericClient,
    prepared: &tokio_postgres::Statement,
    params: &[Option<String>],
) -> Result<Vec<Row>, OriginFailure> {
    let types = prepared.params();
    if types.len() != params.len() {
        return Err(OriginFailure::BadRequest(format!(
            "the statement has {} parameters, {} were given",
            types.len(),
            params.len()
        )));
    }
    let bound: Vec<Box<dyn ToSql + Sync + Send>> = types
        .iter()
        .zip(params)
        .enumerate()
        .map(|(i, (ty, p))| bind(i + 1, ty, p.as_deref()))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)).collect();
    // Rows are read as they stream in and the query is abandoned at the
    // first limit crossed: a loader cannot make the node buffer a whole
    // table.
    let rows = client.query_raw(prepared, refs.iter().copied()).await.map_err(|e| pg_failure(&e))?;
    let mut rows = std::pin::pin!(rows);
    let mut total = 0usize;
    let mut out = Vec::new();
    while let Some(row) = rows.try_next().await.map_err(|e| pg_failure(&e))? {
        if out.len() == MAX_ROWS {
            return Err(OriginFailure::BadRequest(format!("more than {MAX_ROWS} rows returned")));
        }
        let mut columns = Vec::with_capacity(row.len());
        for (i, column) in row.columns().iter().enumerate() {
            let value = read_column(&row, i, column.type_()).map_err(|ty| {
                OriginFailure::BadRequest(format!(
                    "column `{}` has type {ty}; cast it to text (`::text`) in the statement",
                    column.name()
                ))
            })?;
            total += value.as_ref().map_or(0, Vec::len);
            columns.push(value);
        }
        if total > MAX_RESULT_BYTES {
            return Err(OriginFailure::BadRequest(format!("the result exceeds {MAX_RESULT_BYTES} bytes")));
        }
        out.push(columns);
    }
    Ok(out)
}

/// PostgreSQL's own words, with its error code when it sent one.
fn pg_failure(err: &tokio_postgres::Error) -> OriginFailure {
    match err.as_db_error() {
        Some(db) if db.code() == &tokio_postgres::error::SqlState::QUERY_CANCELED => OriginFailure::Timeout,
        Some(db) => OriginFailure::Failed(format!("{} ({})", db.message(), db.code().code())),
        None if err.is_closed() => OriginFailure::Unavailable(err.to_string()),
        None => OriginFailure::Failed(err.to_string()),
    }
}

/// Parses parameter `n` as the type PostgreSQL inferred for it.
fn bind(n: usize, ty: &Type, text: Option<&str>) -> Result<Box<dyn ToSql + Sync + Send>, OriginFailure> {
    fn parse<T: FromStr>(n: usize, ty: &Type, text: Option<&str>) -> Result<Option<T>, OriginFailure> {
        text.map(|t| {
            t.trim()
                .parse::<T>()
                .map_err(|_| OriginFailure::BadRequest(format!("parameter ${n} `{t}` is not a valid {ty}")))
        })
        .transpose()
    }
    Ok(match *ty {
        Type::BOOL => Box::new(parse::<bool>(n, ty, text)?),
        Type::INT2 => Box::new(parse::<i16>(n, ty, text)?),
        Type::INT4 => Box::new(parse::<i32>(n, ty, text)?),
        Type::INT8 => Box::new(parse::<i64>(n, ty, text)?),
        Type::FLOAT4 => Box::new(parse::<f32>(n, ty, text)?),
        Type::FLOAT8 => Box::new(parse::<f64>(n, ty, text)?),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => Box::new(text.map(str::to_owned)),
        Type::BYTEA => Box::new(text.map(|t| t.as_bytes().to_vec())),
        _ => {
            return Err(OriginFailure::BadRequest(format!(
                "parameter ${n} has type {ty}; cast the placeholder (`${n}::text`) in the statement"
            )));
        }
    })
}

/// Column `i` as bytes, or the name of its unsupported type.
fn read_column(row: &tokio_postgres::Row, i: usize, ty: &Type) -> Result<Option<Vec<u8>>, String> {
    fn text<T: ToString>(v: Result<Option<T>, tokio_postgres::Error>) -> Result<Option<Vec<u8>>, String> {
        v.map(|v| v.map(|v| v.to_string().into_bytes())).map_err(|e| e.to_string())
    }
    match *ty {
        Type::BOOL => text(row.try_get::<_, Option<bool>>(i)),
        Type::INT2 => text(row.try_get::<_, Option<i16>>(i)),
        Type::INT4 => text(row.try_get::<_, Option<i32>>(i)),
        Type::INT8 => text(row.try_get::<_, Option<i64>>(i)),
        Type::FLOAT4 => text(row.try_get::<_, Option<f32>>(i)),
        Type::FLOAT8 => text(row.try_get::<_, Option<f64>>(i)),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            row.try_get::<_, Option<String>>(i).map(|v| v.map(String::into_bytes)).map_err(|e| e.to_string())
        }
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i).map_err(|e| e.to_string()),
        _ => Err(ty.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::check_path;

    #[test]
    fn paths_stay_below_their_base() {
        for ok in ["users/42", "users?id=42&x=a:b", "a/b/", "v1/items.json", "", "a;v=1/b", "...", "a..;/b"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/etc/passwd",
            "../secret",
            "a/../../b",
            "a/./b",
            "a//b",
            "%2e%2e/x",
            "a%2Fb",
            "http://evil/",
            "user@evil",
            "a#frag",
            "a\\b",
            "a b",
            "a\nb",
            // Tomcat-style path parameters on `..` and `.`.
            "..;/secret",
            "a/..;x=1/..;/b",
            "a/.;/b",
            "a/..%3B/b",
            // Escaped backslashes, raw or escaped once more.
            "a%5cb",
            "a%5C..%5Cb",
            "..\\b",
            // Double-encoded dots, slashes and backslashes.
            "%252e%252e/x",
            "a%252Fb",
            "a%255cb",
            "a%25b",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        // The refusal, which is logged, carries no raw control character.
        let Err(super::OriginFailure::BadRequest(message)) = check_path("x\n2024-01-01 INFO forged\x1b[31m") else {
            panic!("refused");
        };
        assert!(!message.contains(['\n', '\x1b']), "{message}");
    }
}
