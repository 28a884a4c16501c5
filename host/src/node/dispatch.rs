//! The one request path. Every request a node serves, whichever port it
//! came on and whether or not the node is clustered, goes through
//! [`Node::dispatch`]:
//!
//! 1. requests the node answers itself (PING, STATS, admin commands);
//! 2. validation, once: TTLs of at least 1 ms, and every key and value of
//!    a write checked against the limits before any is applied;
//! 3. routing: to the cluster (a replicated operation coordinated here),
//!    to the loaders (a read-through GET, a write to an origin; other
//!    writes of origin-backed keys refused), or to the store, with the
//!    leases of loads in flight broken by every write;
//! 4. shadow sampling and hot keys see every request, and the request
//!    metrics time it from arrival to reply, also when the reply comes
//!    later.
//!
//! Ports only turn bytes into [`Request`]s and replies into bytes. The
//! RESP port's plain GET and SET fast path ([`Node::get_with_since`],
//! [`Node::set_since`]) serves from its read buffer when neither cluster
//! nor loaders could take the request, through the same store calls,
//! shadow sampling and metrics.

use super::Node;
use crate::reply::{Later, Routed};
use bytes::Bytes;
use cachet_proto::{Condition, Consistency, ErrorCode, ErrorReply, Request, Response};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

impl Node {
    /// Runs one request: its reply now, or a future of it (loads, writes to
    /// an origin, replicated operations, admin commands). Never panics on
    /// client input; every failure is an error reply. `consistency` is the
    /// client's choice for a clustered request (the cluster's default when
    /// `None`; a single node ignores it).
    pub fn dispatch(self: &Arc<Self>, request: Request, consistency: Option<Consistency>) -> Routed {
        self.dispatch_from(request, consistency, None)
    }

    /// [`Node::dispatch`] for a client at `source`: failed admin attempts
    /// are throttled per source address (see `admin::guard`).
    pub fn dispatch_from(
        self: &Arc<Self>,
        request: Request,
        consistency: Option<Consistency>,
        source: Option<IpAddr>,
    ) -> Routed {
        let started = Instant::now();
        let command = crate::metrics::command_index(&request);
        let now = self.store.now_ms_at(started);
        match self.route(now, request, consistency, source) {
            Routed::Now(response) => {
                self.metrics.record(command, started.elapsed(), is_error(&response));
                Routed::Now(response)
            }
            Routed::Later(later) => {
                let node = self.clone();
                Routed::Later(Box::pin(async move {
                    let response = later.await;
                    node.metrics.record(command, started.elapsed(), is_error(&response));
                    response
                }))
            }
        }
    }

    /// [`Node::dispatch`] for callers that wait for the reply: tests, tools
    /// and examples outside an async runtime. An admin command runs on the
    /// calling thread; a reply that comes later is awaited on a runtime of
    /// its own (inside a runtime, use `dispatch` and await it).
    pub fn execute(self: &Arc<Self>, request: Request) -> Response {
        let index = crate::metrics::command_index(&request);
        if let Request::Admin { token, command } = request {
            let started = Instant::now();
            let response = self.admin(&token, command);
            self.metrics.record(index, started.elapsed(), is_error(&response));
            return response;
        }
        match self.dispatch(request, None) {
            Routed::Now(response) => response,
            Routed::Later(later) => {
                if tokio::runtime::Handle::try_current().is_ok() {
                    return error(
                        ErrorCode::Internal,
                        "this request waits (a load or other members): dispatch it and await the reply",
                    );
                }
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime.block_on(later),
                    Err(err) => error(ErrorCode::Internal, format!("cannot wait for the reply: {err}")),
                }
            }
        }
    }

    fn route(
        self: &Arc<Self>,
        now: u64,
        request: Request,
        consistency: Option<Consistency>,
        source: Option<IpAddr>,
    ) -> Routed {
        let request = match request {
            Request::Ping => return Routed::Now(Response::Pong),
            Request::Stats => return Routed::Now(Response::Stats(self.stats())),
            Request::Admin { token, command } => return self.admin_routed(token, command, source),
            request => request,
        };
        if let Some(refused) = self.refuse_invalid(&request) {
            return Routed::Now(refused);
        }
        // Only requests that will run reach the shadow evaluation: a
        // refused one (an oversized key) must not move its predictions.
        self.observe(now, &request);
        // Read once per request: the loaders may be replaced meanwhile (a
        // cluster's configuration changing), and each read costs a lock.
        let loaders = self.loaders.get();
        if let Some(cluster) = self.cluster.get() {
            // Of the writes to keys a namespace writes to its origin, the
            // cluster takes SET and DEL (at each key's primary); the rest
            // are refused as on a single node.
            if !matches!(request, Request::Set { .. } | Request::Del { .. })
                && let Some(refused) = refuse_origin_write(loaders.as_deref(), &request)
            {
                return Routed::Now(refused);
            }
            if let Some(routed) = cluster.route(&self.store, &request, consistency) {
                return routed;
            }
        }
        if let Some(loaders) = &loaders {
            if let Some(routed) = loaders.route(&request) {
                return routed;
            }
            // A write to several keys would have to break every key's lease
            // under the one lock a lease holds.
            if let Some(key) =
                request.spans_keys().then(|| request.keys().into_iter().find(|k| loaders.covers(k))).flatten()
            {
                return Routed::Now(error(
                    ErrorCode::NotAllowed,
                    format!(
                        "`{}` is in a loader namespace: {} is not supported for keys a loader fills",
                        String::from_utf8_lossy(key),
                        request.name().to_ascii_uppercase()
                    ),
                ));
            }
            if let Some(refused) = refuse_origin_write(Some(loaders), &request) {
                return Routed::Now(refused);
            }
        }
        Routed::Now(self.run_local(now, request, loaders.as_deref()))
    }

    /// Checks made once, before routing: TTLs, and the size of every key
    /// and value a write stores (a multi-key write is refused whole, before
    /// any of it applies).
    pub(super) fn refuse_invalid(&self, request: &Request) -> Option<Response> {
        let too_large = |err: crate::core::ShardError| crate::store::commands::shard_error(&err);
        let checked = match request {
            Request::Set { ttl_ms: Some(0), .. } | Request::SetWith { ttl_ms: Some(0), keep_ttl: false, .. } => {
                Err(error(ErrorCode::InvalidArgument, "a TTL must be at least 1 ms"))
            }
            Request::GetEx { ttl: cachet_proto::TtlChange::Set(0), .. } => {
                Err(error(ErrorCode::InvalidArgument, "a TTL must be at least 1 ms"))
            }
            Request::Set { key, value, .. } | Request::SetWith { key, value, .. } => {
                self.store.check_sizes(key, value).map_err(too_large)
            }
            Request::MSet { pairs } | Request::MSetNx { pairs } => {
                pairs.iter().try_for_each(|(key, value)| self.store.check_sizes(key, value)).map_err(too_large)
            }
            // The destination's name must fit; the value fits already.
            Request::Rename { to, .. } | Request::Copy { to, .. } => self.store.check_sizes(to, b"").map_err(too_large),
            // On a cluster every key travels to peers, which refuse one
            // over the limit: refused here, by name, instead of timing out.
            request if self.cluster.get().is_some() => {
                request.keys().into_iter().try_for_each(|key| self.store.check_sizes(key, b"")).map_err(too_large)
            }
            _ => Ok(()),
        };
        checked.err()
    }

    /// Runs a request on this node's store. A write to a key of a loader
    /// namespace breaks the lease of its load in flight, and holds it until
    /// the write is done, so no load starts and installs in between.
    fn run_local(&self, now: u64, request: Request, loaders: Option<&crate::loader::Loaders>) -> Response {
        let Some(loaders) = loaders.filter(|_| request.is_write()) else {
            return self.store.execute(now, request);
        };
        match request {
            Request::Del { keys } => {
                let deleted = keys.into_iter().filter(|key| {
                    let _lease = loaders.break_lease(key);
                    self.store.execute(now, Request::Del { keys: vec![key.clone()] }) == Response::Count(1)
                });
                Response::Count(deleted.count() as u64)
            }
            Request::MSet { pairs } => {
                for (key, value) in pairs {
                    let _lease = loaders.break_lease(&key);
                    let response = self.store.execute(now, Request::MSet { pairs: vec![(key, value)] });
                    if response != Response::Ok {
                        return response;
                    }
                }
                Response::Ok
            }
            Request::FlushAll => Response::Count(self.flush_all()),
            request => {
                let key = request.keys().first().map(|k| Bytes::clone(k));
                let _lease = key.as_ref().and_then(|key| loaders.break_lease(key));
                self.store.execute(now, request)
            }
        }
    }

    /// An admin command: refused at once when the token is wrong (or a
    /// back-off runs), else run off the I/O thread: loading compiles a
    /// component and activation swaps every shard.
    fn admin_routed(
        self: &Arc<Self>,
        token: String,
        command: cachet_proto::AdminCommand,
        source: Option<IpAddr>,
    ) -> Routed {
        if !self.admin_authorized(&token, source) {
            return Routed::Now(self.admin_from(&token, command, source));
        }
        let node = self.clone();
        let later: Later = Box::pin(async move {
            match tokio::task::spawn_blocking(move || node.admin_from(&token, command, source)).await {
                Ok(reply) => reply,
                Err(err) => error(ErrorCode::Internal, format!("admin command failed: {err}")),
            }
        });
        Routed::Later(later)
    }

    /// Runs an admin command if `token` is the node's admin token and no
    /// back-off after failed attempts is running; blocks while a policy
    /// swaps.
    pub fn admin(&self, token: &str, command: cachet_proto::AdminCommand) -> Response {
        self.admin_from(token, command, None)
    }

    /// [`Node::admin`] for a client at `source` (throttled per address).
    /// On a cluster, policy changes go through the metadata log
    /// (`node::policy`).
    pub fn admin_from(&self, token: &str, command: cachet_proto::AdminCommand, source: Option<IpAddr>) -> Response {
        if let Some(cluster) = self.cluster.get()
            && super::policy::cluster_wide(&command)
        {
            if let Some(refused) = self.control.refuse(token, source, command.name()) {
                return refused;
            }
            return self.cluster_policy(cluster, token, source, command);
        }
        self.admin_from_local(token, source, command)
    }

    /// An admin command on this node alone.
    pub(super) fn admin_from_local(
        &self,
        token: &str,
        source: Option<IpAddr>,
        command: cachet_proto::AdminCommand,
    ) -> Response {
        self.control.admin(token, source, command, || cachet_proto::NodeStats {
            hot_keys: self.hot_keys(),
            hot_keys_hidden: false,
            ..self.stats()
        })
    }

    /// A GET whose value `f` sees under the shard's lock instead of a
    /// clone: the RESP port copies it straight into the reply. Counted,
    /// sampled for the shadow and timed exactly as a dispatched GET. Only
    /// for a node whose GETs stay local (no cluster, no loaders).
    pub fn get_with<R>(&self, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> R {
        self.get_with_since(Instant::now(), key, f).0
    }

    /// [`Node::get_with`] timed from `started`, returning when it ended: a
    /// run of pipelined GETs times each from the end of the one before,
    /// one clock read per GET instead of two (a read is ~4% of a
    /// pipelined GET's cost).
    pub fn get_with_since<R>(&self, started: Instant, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> (R, Instant) {
        let now = self.store.now_ms_at(started);
        self.observe_sampled(now, key, || Request::Get { key: Bytes::copy_from_slice(key) });
        let out = self.store.get_with(now, key, f);
        let ended = Instant::now();
        self.metrics.record(crate::metrics::GET, ended.saturating_duration_since(started), false);
        (out, ended)
    }

    /// A plain SET (no TTL, no condition) of slices, which the shard copies:
    /// the RESP port's path for the commonest write, timed from `started`
    /// like [`Node::get_with_since`], `reply` (writing the answer) included.
    /// Only for a node whose writes stay local (no cluster, no loaders).
    pub fn set_since<R>(
        &self,
        started: Instant,
        key: &[u8],
        value: &[u8],
        reply: impl FnOnce(Response) -> R,
    ) -> (R, Instant) {
        let now = self.store.now_ms_at(started);
        self.observe_sampled(now, key, || {
            let (key, value) = (Bytes::copy_from_slice(key), Bytes::copy_from_slice(value));
            Request::Set { key, value, ttl_ms: None, condition: Condition::Always, hint: 0 }
        });
        // The shard checks the sizes itself.
        let response = self.store.set_slice(now, key, value, None, Condition::Always, 0);
        let failed = is_error(&response);
        let out = reply(response);
        let ended = Instant::now();
        self.metrics.record(crate::metrics::SET, ended.saturating_duration_since(started), failed);
        (out, ended)
    }

    /// Shows the shadow evaluation a request on `key` if `key` is sampled;
    /// the request (copies of borrowed bytes) is built only then.
    fn observe_sampled(&self, now: u64, key: &[u8], request: impl FnOnce() -> Request) {
        if let Some(threshold) = self.control.shadow_threshold()
            && crate::shadow::in_sample(key, threshold)
            && let Some(mut shadow) = self.control.shadow()
            && let Some(shadow) = shadow.as_mut()
        {
            shadow.observe(now, &request());
        }
    }

    /// Shows the shadow evaluation a request if any of its keys is sampled
    /// (decided without its lock).
    pub(super) fn observe(&self, now: u64, request: &Request) {
        if let Some(threshold) = self.control.shadow_threshold()
            && request.keys().iter().any(|key| crate::shadow::in_sample(key, threshold))
            && let Some(mut shadow) = self.control.shadow()
            && let Some(shadow) = shadow.as_mut()
        {
            shadow.observe(now, request);
        }
    }
}

/// A refusal when a write would change a key of a namespace that writes
/// to its origin other than through the loaders' own SET and DEL
/// ([`crate::loader::Loaders::route`]): the cache and the origin would
/// part.
fn refuse_origin_write(loaders: Option<&crate::loader::Loaders>, request: &Request) -> Option<Response> {
    if !request.is_write() {
        return None;
    }
    let loaders = loaders?;
    let key = request.keys().into_iter().find(|key| loaders.write_mode(key).is_some())?;
    Some(error(
        ErrorCode::NotAllowed,
        format!(
            "`{}` is in a namespace written to its origin: only SET (unconditional) and DEL of one key apply",
            String::from_utf8_lossy(key)
        ),
    ))
}

pub(super) fn is_error(response: &Response) -> bool {
    matches!(response, Response::Error(_))
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(ErrorReply::new(code, message))
}
