//! Write Cachet loaders in Rust: the guest side of `cachet:hooks@0.1.0`.
//!
//! A loader fills misses for one key namespace and refreshes what it loaded.
//! Implement [`Loader`] (only [`Loader::load`] is required), call
//! [`export_loader!`](crate::export_loader) once, and build the crate for
//! `wasm32-unknown-unknown` as a component (`cargo xtask build-policies`
//! builds every loader crate under `examples/` too).
//!
//! Data comes only from the host's origins, through [`origin::query`]
//! (PostgreSQL) and [`origin::http_get`] (HTTP): the node's configuration says
//! which origins a namespace may use. Everything around a load (one load per
//! key at a time, leases, stale-while-revalidate, early refresh, TTL jitter,
//! negative caching) is the host's job, so a loader stays a plain function
//! from a key to a value.

use std::fmt;

/// A value produced by a loader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The bytes to cache and return.
    pub value: Vec<u8>,
    /// Time to live in milliseconds; `None` uses the namespace's TTL.
    pub ttl_ms: Option<u64>,
}

impl Loaded {
    /// A value with the namespace's TTL.
    pub fn new(value: impl Into<Vec<u8>>) -> Self {
        Self { value: value.into(), ttl_ms: None }
    }

    /// A value with a TTL of its own.
    pub fn with_ttl(value: impl Into<Vec<u8>>, ttl_ms: u64) -> Self {
        Self { value: value.into(), ttl_ms: Some(ttl_ms) }
    }
}

/// Why an origin request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginError {
    /// The namespace may not use this origin (or it does not exist).
    NotAllowed(String),
    /// The origin could not be reached, or had no free connection in time.
    Unavailable(String),
    /// The origin did not answer within its deadline.
    Timeout,
    /// The origin answered with an error.
    Failed(String),
    /// The request itself is unusable.
    BadRequest(String),
}

impl fmt::Display for OriginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAllowed(m) => write!(f, "origin not allowed: {m}"),
            Self::Unavailable(m) => write!(f, "origin unavailable: {m}"),
            Self::Timeout => write!(f, "origin timed out"),
            Self::Failed(m) => write!(f, "origin failed: {m}"),
            Self::BadRequest(m) => write!(f, "bad origin request: {m}"),
        }
    }
}

/// Why a load, refresh or store failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// An origin request failed.
    Origin(OriginError),
    /// The loader could not make a value of what the origin returned.
    Invalid(String),
    /// The loader does not implement this call.
    Unsupported,
}

impl From<OriginError> for LoadError {
    fn from(err: OriginError) -> Self {
        Self::Origin(err)
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Origin(err) => err.fmt(f),
            Self::Invalid(m) => write!(f, "invalid origin data: {m}"),
            Self::Unsupported => write!(f, "not supported by this loader"),
        }
    }
}

/// One result row: each column as bytes, `None` for SQL NULL.
pub type Row = Vec<Option<Vec<u8>>>;

/// An HTTP origin's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

/// A loader for one namespace. Stateless: every call may run in a fresh
/// instance, so keep nothing between calls.
pub trait Loader {
    /// The value of `key` after a miss, or `None` if the origin has none
    /// (the host caches that answer for the namespace's negative TTL).
    fn load(key: &[u8], now: u64) -> Result<Option<Loaded>, LoadError>;

    /// A fresh value for `key`, loaded `age_ms` ago and now holding
    /// `current`; `None` removes the key. Defaults to [`Loader::load`].
    fn refresh(key: &[u8], current: &[u8], age_ms: u64, now: u64) -> Result<Option<Loaded>, LoadError> {
        let _ = (current, age_ms);
        Self::load(key, now)
    }

    /// Writes `value` (or deletes, on `None`) to the origin, for
    /// write-through and write-behind namespaces. Unsupported by default.
    fn store(key: &[u8], value: Option<&[u8]>) -> Result<(), LoadError> {
        let _ = (key, value);
        Err(LoadError::Unsupported)
    }
}

/// Origin requests, performed by the host.
pub mod origin {
    use super::{HttpResponse, OriginError, Row};

    /// Runs `statement` on the PostgreSQL origin `origin`, with `params`
    /// bound to `$1`, `$2`, ... (never spliced into the text; each parsed as
    /// the type PostgreSQL infers for its placeholder, `None` for NULL).
    pub fn query(origin: &str, statement: &str, params: &[Option<&str>]) -> Result<Vec<Row>, OriginError> {
        imp::query(origin, statement, params)
    }

    /// GETs `path` from the HTTP origin `origin` (appended to its base URL).
    pub fn http_get(origin: &str, path: &str) -> Result<HttpResponse, OriginError> {
        imp::http_get(origin, path)
    }

    #[cfg(target_arch = "wasm32")]
    mod imp {
        use super::{HttpResponse, OriginError, Row};
        use crate::__wasm::hooks::cachet::hooks::origin as wit;
        use crate::__wasm::hooks::cachet::hooks::types::OriginError as WitError;

        fn error(err: WitError) -> OriginError {
            match err {
                WitError::NotAllowed(m) => OriginError::NotAllowed(m),
                WitError::Unavailable(m) => OriginError::Unavailable(m),
                WitError::Timeout => OriginError::Timeout,
                WitError::Failed(m) => OriginError::Failed(m),
                WitError::BadRequest(m) => OriginError::BadRequest(m),
            }
        }

        pub(super) fn query(origin: &str, statement: &str, params: &[Option<&str>]) -> Result<Vec<Row>, OriginError> {
            let params: Vec<Option<String>> = params.iter().map(|p| p.map(str::to_owned)).collect();
            wit::query(origin, statement, &params).map_err(error)
        }

        pub(super) fn http_get(origin: &str, path: &str) -> Result<HttpResponse, OriginError> {
            wit::http_get(origin, path).map(|r| HttpResponse { status: r.status, body: r.body }).map_err(error)
        }
    }

    /// Natively there is no host to run origin requests.
    #[cfg(not(target_arch = "wasm32"))]
    mod imp {
        use super::{HttpResponse, OriginError, Row};

        pub(super) fn query(origin: &str, _: &str, _: &[Option<&str>]) -> Result<Vec<Row>, OriginError> {
            Err(OriginError::Unavailable(format!("`{origin}`: origins exist only inside a Cachet node")))
        }

        pub(super) fn http_get(origin: &str, _: &str) -> Result<HttpResponse, OriginError> {
            Err(OriginError::Unavailable(format!("`{origin}`: origins exist only inside a Cachet node")))
        }
    }
}

/// The loader's types in WIT form, for what [`export_loader!`](crate::export_loader)
/// expands to. Here rather than in the export glue (`__wasm`) so that the
/// glue never depends on this module: this one uses its bindings instead.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __export {
    use super::{LoadError, Loaded, OriginError};
    use crate::__wasm::hooks::cachet::hooks::types as wt;

    fn origin_error(err: OriginError) -> wt::OriginError {
        match err {
            OriginError::NotAllowed(m) => wt::OriginError::NotAllowed(m),
            OriginError::Unavailable(m) => wt::OriginError::Unavailable(m),
            OriginError::Timeout => wt::OriginError::Timeout,
            OriginError::Failed(m) => wt::OriginError::Failed(m),
            OriginError::BadRequest(m) => wt::OriginError::BadRequest(m),
        }
    }

    /// A loader error in WIT form.
    pub fn load_error(err: LoadError) -> wt::LoadError {
        match err {
            LoadError::Origin(e) => wt::LoadError::Origin(origin_error(e)),
            LoadError::Invalid(m) => wt::LoadError::Invalid(m),
            LoadError::Unsupported => wt::LoadError::Unsupported,
        }
    }

    /// A load result in WIT form.
    pub fn loaded(result: Result<Option<Loaded>, LoadError>) -> Result<Option<wt::Loaded>, wt::LoadError> {
        result.map(|v| v.map(|l| wt::Loaded { value: l.value, ttl_ms: l.ttl_ms })).map_err(load_error)
    }
}

/// Exports a [`Loader`] type as the `cachet:hooks/loader` interface.
///
/// Expands to nothing on native targets.
#[macro_export]
macro_rules! export_loader {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::__wasm::hooks::cachet::hooks::types as __wt;
            use $crate::__wasm::hooks::exports::cachet::hooks::loader as __wl;
            struct __CachetLoader;
            impl __wl::Guest for __CachetLoader {
                fn load(key: Vec<u8>, now: u64) -> Result<Option<__wt::Loaded>, __wt::LoadError> {
                    $crate::loader::__export::loaded(<$ty as $crate::loader::Loader>::load(&key, now))
                }
                fn refresh(
                    key: Vec<u8>,
                    current: Vec<u8>,
                    age_ms: u64,
                    now: u64,
                ) -> Result<Option<__wt::Loaded>, __wt::LoadError> {
                    $crate::loader::__export::loaded(<$ty as $crate::loader::Loader>::refresh(
                        &key, &current, age_ms, now,
                    ))
                }
                fn store(key: Vec<u8>, value: Option<Vec<u8>>) -> Result<(), __wt::LoadError> {
                    <$ty as $crate::loader::Loader>::store(&key, value.as_deref())
                        .map_err($crate::loader::__export::load_error)
                }
            }
    $crate::__wasm::hooks::__export_read_through_world!(__CachetLoader with_types_in $crate::__wasm::hooks);
        };
    };
}
