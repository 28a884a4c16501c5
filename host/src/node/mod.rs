//! A node: its store, the policy control plane, loaders and cluster
//! membership, and the one request path every port feeds
//! ([`Node::dispatch`], in [`dispatch`]). The QUIC and RESP ports are thin
//! shells around it; tests drive it directly.
//!
//! The data lives in the [`Store`], which no other part of the node goes
//! around: the loaders, the cluster's record store, the control plane and
//! the metrics hold the store, not the node, so none of them imports this
//! module.

mod dispatch;
mod loaders;
mod policy;
mod start;
mod transaction;

use crate::admin::Control;
use crate::cluster::runtime::Cluster;
use crate::core::{PolicyError, PolicyFactory, Shard};
use crate::loader::Loaders;
use crate::metrics::RequestMetrics;
use crate::store::Store;
use cachet_proto::NodeStats;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard, OnceLock};
use std::time::Instant;

pub use crate::store::{Clock, ManualClock, MonotonicClock, NodeConfig};
pub use start::{NodeOptions, Running, StartError, TICK};

/// A node: the store and everything that decides how requests reach it.
pub struct Node {
    store: Arc<Store>,
    pub(crate) control: Control,
    pub(crate) metrics: RequestMetrics,
    started: Instant,
    connections: AtomicU64,
    /// Clients cut off or turned away by the ports' limits, for metrics.
    clients: crate::clients::ClientCounters,
    loaders: crate::loader::LoaderSlot,
    /// A cluster member's loaders built at start from `--loaders`, with
    /// the configuration text they were built from, until the log takes
    /// that configuration (see `node::loaders`).
    prebuilt_loaders: std::sync::Mutex<Option<(String, Arc<Loaders>)>>,
    cluster: OnceLock<Arc<Cluster>>,
}

impl Node {
    /// A node whose shards each get an instance from `policy`.
    pub fn new(config: NodeConfig, policy: Arc<dyn PolicyFactory>) -> Result<Self, PolicyError> {
        Self::with_clock(config, policy, Arc::new(MonotonicClock::new()))
    }

    /// [`Node::new`] reading time from `clock`.
    pub fn with_clock(
        config: NodeConfig,
        policy: Arc<dyn PolicyFactory>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, PolicyError> {
        let store = Arc::new(Store::new(config, policy.clone(), clock)?);
        Ok(Self {
            control: Control::new(policy, store.clone()),
            metrics: RequestMetrics::default(),
            store,
            started: Instant::now(),
            connections: AtomicU64::new(0),
            clients: crate::clients::ClientCounters::default(),
            loaders: crate::loader::LoaderSlot::default(),
            prebuilt_loaders: std::sync::Mutex::new(None),
            cluster: OnceLock::new(),
        })
    }

    /// Gives the node a module registry and an admin token (admin commands
    /// are refused without one), and restores the registry's active module
    /// if it has one (see [`Control::with_registry`]).
    pub fn with_registry(mut self, registry: crate::registry::Registry, token: Option<String>) -> Self {
        self.control = self.control.with_registry(registry, token);
        self
    }

    /// The node's data.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The node's limits.
    pub fn config(&self) -> &NodeConfig {
        self.store.config()
    }

    /// The `now` of every shard call, from the node's clock.
    pub fn now_ms(&self) -> u64 {
        self.store.now_ms()
    }

    /// Open client connections.
    pub fn stats_connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Clients the ports cut off or turned away, by reason.
    pub fn clients(&self) -> &crate::clients::ClientCounters {
        &self.clients
    }

    /// Counts a client connection for stats; the guard uncounts it.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }

    /// Binds read-through loaders to this node: GETs of their namespaces
    /// load on a miss, and writes break leases. At most once per node; a
    /// second call is refused.
    pub fn attach_loaders(self: &Arc<Self>, loaders: Arc<Loaders>) -> Result<(), Arc<Loaders>> {
        self.loaders.set_once(loaders.clone())?;
        loaders.attach(&self.store);
        Ok(())
    }

    /// Puts `new` in place of the node's loaders (a cluster's loader
    /// configuration changed); the loaders replaced, which the caller
    /// retires ([`Loaders::retire`]) before dropping them. The new ones'
    /// write-behind waits for the old ones' queues.
    pub(crate) fn swap_loaders(&self, new: Option<Arc<Loaders>>) -> Option<Arc<Loaders>> {
        if let (Some(new), Some(old)) = (&new, self.loaders.get()) {
            new.replace(&old);
        }
        if let Some(new) = &new {
            new.attach(&self.store);
        }
        self.loaders.replace(new)
    }

    /// The loaders, if any are attached.
    pub fn loaders(&self) -> Option<Arc<Loaders>> {
        self.loaders.get()
    }

    /// Makes this node a cluster member: its data commands become
    /// replicated operations (see [`Cluster::route`]). At most once per
    /// node.
    pub fn attach_cluster(&self, cluster: Arc<Cluster>) -> Result<(), Arc<Cluster>> {
        self.cluster.set(cluster.clone())?;
        // A module this member quarantines is quarantined cluster-wide:
        // every member drops it at the same log index.
        self.control.on_quarantine(Box::new(move |label, reason| {
            cluster.propose_detached(crate::cluster::meta::entry::MetaEntry::Quarantine {
                label: label.to_string(),
                reason: reason.to_string(),
            });
        }));
        Ok(())
    }

    /// Requests the node's request path has run since it started.
    pub fn commands_processed(&self) -> u64 {
        (0..crate::metrics::COMMANDS.len()).map(|i| self.metrics.latency(i).count()).sum()
    }

    /// The cluster, if the node is in one.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Deletes every key starting with `prefix` on every shard; returns how
    /// many. Scans everything: for rare events only.
    pub fn delete_prefix(&self, prefix: &[u8]) -> u64 {
        self.store.delete_prefix(prefix)
    }

    /// Deletes every entry on every shard, breaking every load's lease;
    /// returns how many there were.
    pub fn flush_all(&self) -> u64 {
        if let Some(loaders) = self.loaders.get() {
            loaders.invalidate_all();
        }
        self.store.clear()
    }

    /// Resident entries over all shards.
    pub fn len(&self) -> u64 {
        self.store.len()
    }

    /// Resident entries with a TTL, over all shards.
    pub fn expiring(&self) -> u64 {
        self.store.expiring()
    }

    /// Whether no shard holds an entry.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Shards on the node.
    pub fn shard_count(&self) -> usize {
        self.store.shard_count()
    }

    /// Shard `i`, locked: for inspection, tools and tests.
    pub fn lock_shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.store.lock_shard(i)
    }

    /// Periodic work on every shard (active expiry, policy deadlines and
    /// recovery), the shadow ghosts, the supervisor that rolls back a
    /// module that keeps faulting, and the loaders' negative cache. Called
    /// every [`TICK`] by a node started with [`Node::start`] (tests with a
    /// manual clock call it themselves), off the I/O path (a rollback swaps
    /// every shard).
    pub fn tick(&self) {
        let now = self.now_ms();
        self.store.tick(now);
        self.control.tick(now);
        if let Some(loaders) = self.loaders.get() {
            loaders.tick(now);
        }
    }

    /// Counters summed over the shards, without the hot keys (see
    /// [`Node::hot_keys`]): what any client, the RESP port's INFO and the
    /// metrics endpoint may see.
    pub fn stats(&self) -> NodeStats {
        let active = self.control.activation();
        NodeStats {
            policy: active.name,
            policy_version: active.version,
            uptime_secs: self.started.elapsed().as_secs(),
            connections: self.connections.load(Ordering::Relaxed),
            cluster: self.cluster.get().map(|c| Box::new(c.stats())),
            ..self.store.stats()
        }
    }

    /// The hottest keys read lately, hottest first. Key bytes can be
    /// personal data (user ids, e-mail addresses in keys): only admin
    /// callers get them ([`cachet_proto::AdminCommand::Stats`]), never plain
    /// stats, INFO or the metrics endpoint.
    pub fn hot_keys(&self) -> Vec<cachet_proto::HotKey> {
        self.store.hot_keys()
    }

    /// Whether `token` opens admin commands on this node now for a caller
    /// at `source` (see [`Control::authorized`]).
    pub fn admin_authorized(&self, token: &str, source: Option<std::net::IpAddr>) -> bool {
        self.control.authorized(token, source)
    }

    /// The registry and shards, for `cachet policy list`.
    pub fn policy_listing(&self, message: String) -> cachet_proto::PolicyListing {
        self.control.policy_listing(message)
    }

    /// [`Node::policy_listing`] without waiting for a policy operation in
    /// progress: for scrapes.
    pub fn policy_listing_now(&self) -> cachet_proto::PolicyListing {
        self.control.policy_listing_now()
    }
}

/// Keeps a connection counted while it lives.
pub struct ConnectionGuard(Arc<Node>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::NativeFactory;
    use bytes::Bytes;
    use cachet_policy_sdk::Config;
    use cachet_proto::{Condition, ErrorCode, ErrorReply, Request, Response, TtlState};

    fn node() -> Arc<Node> {
        let policy: Arc<dyn PolicyFactory> = Arc::new(NativeFactory::<cachet_policy_lru::Lru>::new(Config::default()));
        let config = NodeConfig { shards: 3, max_value_size: 16, ..NodeConfig::default() };
        Arc::new(Node::new(config, policy).expect("node"))
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn set(key: &str, value: &str, condition: Condition) -> Request {
        Request::Set { key: b(key), value: b(value), ttl_ms: None, condition, hint: 0 }
    }

    #[test]
    fn commands_do_what_they_say() {
        let node = node();
        assert_eq!(node.execute(set("a", "1", Condition::Always)), Response::Ok);
        assert_eq!(node.execute(set("a", "2", Condition::IfAbsent)), Response::Applied(false));
        assert_eq!(node.execute(set("b", "2", Condition::IfPresent)), Response::Applied(false));
        assert_eq!(node.execute(set("a", "3", Condition::IfPresent)), Response::Applied(true));
        assert_eq!(node.execute(Request::Get { key: b("a") }), Response::Value(Some(b("3"))));
        assert_eq!(node.execute(Request::MSet { pairs: vec![(b("x"), b("1")), (b("y"), b("2"))] }), Response::Ok);
        assert_eq!(
            node.execute(Request::MGet { keys: vec![b("x"), b("nope"), b("y")] }),
            Response::Values(vec![Some(b("1")), None, Some(b("2"))])
        );
        assert_eq!(node.execute(Request::Exists { keys: vec![b("x"), b("y"), b("z")] }), Response::Count(2));
        assert_eq!(node.execute(Request::Del { keys: vec![b("x"), b("z")] }), Response::Count(1));
        assert_eq!(node.execute(Request::Incr { key: b("n"), delta: 5 }), Response::Integer(5));
        assert_eq!(node.execute(Request::Incr { key: b("n"), delta: -7 }), Response::Integer(-2));
        let overflow = node.execute(Request::Incr { key: b("a"), delta: i64::MAX });
        assert!(
            matches!(overflow, Response::Error(ErrorReply { code: ErrorCode::WrongType, ref message }) if message.contains("overflow"))
        );
        node.execute(set("w", "word", Condition::Always));
        let not_a_number = node.execute(Request::Incr { key: b("w"), delta: 1 });
        assert!(matches!(not_a_number, Response::Error(ErrorReply { code: ErrorCode::WrongType, .. })));
        assert_eq!(node.execute(Request::Get { key: b("w") }), Response::Value(Some(b("word"))));
        assert_eq!(node.execute(Request::Ttl { key: b("a") }), Response::Ttl(TtlState::Persistent));
        assert_eq!(node.execute(Request::Ttl { key: b("zz") }), Response::Ttl(TtlState::Missing));
        assert_eq!(
            node.execute(Request::Expire { key: b("a"), ttl_ms: 60_000, when: Default::default() }),
            Response::Applied(true)
        );
        assert!(
            matches!(node.execute(Request::Ttl { key: b("a") }), Response::Ttl(TtlState::Remaining(ms)) if ms <= 60_000 && ms > 50_000)
        );
        assert_eq!(
            node.execute(Request::Expire { key: b("zz"), ttl_ms: 1, when: Default::default() }),
            Response::Applied(false)
        );
        assert_eq!(node.execute(Request::Ping), Response::Pong);
        let Response::Stats(stats) = node.execute(Request::Stats) else { panic!("stats") };
        assert_eq!((stats.entries, stats.shards, stats.policy.as_str()), (4, 3, "lru"));
    }

    /// The RESP port's GET lends the value instead of cloning it; it must
    /// count, time and expire exactly as `execute` does.
    #[test]
    fn a_lent_read_counts_and_times_like_a_get() {
        let node = node();
        node.execute(set("a", "1", Condition::Always));
        assert_eq!(node.get_with(&b("a"), |v| v.map(<[u8]>::to_vec)), Some(b"1".to_vec()));
        assert_eq!(node.get_with(&b("nope"), |v| v.map(<[u8]>::to_vec)), None);
        assert_eq!(node.execute(Request::Get { key: b("a") }), Response::Value(Some(b("1"))));
        let stats = node.stats();
        assert_eq!((stats.hits, stats.misses), (2, 1));
        assert_eq!(node.metrics.latency(crate::metrics::GET).count(), 3, "every read is timed as a GET");
    }

    #[test]
    fn replies_are_bounded_and_ttls_must_be_positive() {
        let policy: Arc<dyn PolicyFactory> = Arc::new(NativeFactory::<cachet_policy_lru::Lru>::new(Config::default()));
        let config = NodeConfig { shards: 1, max_value_size: 1 << 20, ..NodeConfig::default() };
        let node = Arc::new(Node::new(config, policy).expect("node"));
        node.execute(Request::Set {
            key: b("big"),
            value: Bytes::from(vec![0u8; 1 << 20]),
            ttl_ms: None,
            condition: Condition::Always,
            hint: 0,
        });
        // 70 copies of a 1 MiB value: a 3-byte-per-key request for a 70 MiB reply.
        let reply = node.execute(Request::MGet { keys: vec![b("big"); 70] });
        assert!(matches!(reply, Response::Error(ErrorReply { code: ErrorCode::TooLarge, .. })), "{reply:?}");
        assert!(matches!(node.execute(Request::MGet { keys: vec![b("big"); 3] }), Response::Values(v) if v.len() == 3));
        let zero = node.execute(Request::Set {
            key: b("k"),
            value: b("v"),
            ttl_ms: Some(0),
            condition: Condition::Always,
            hint: 0,
        });
        assert!(matches!(zero, Response::Error(ErrorReply { code: ErrorCode::InvalidArgument, .. })), "{zero:?}");
        node.execute(set("k", "v", Condition::Always));
        assert_eq!(
            node.execute(Request::Expire { key: b("k"), ttl_ms: 0, when: Default::default() }),
            Response::Applied(true)
        );
        assert_eq!(node.execute(Request::Get { key: b("k") }), Response::Value(None), "EXPIRE 0 deletes");
    }

    #[test]
    fn oversized_values_are_refused_and_change_nothing() {
        let node = node();
        node.execute(set("k", "small", Condition::Always));
        let reply = node.execute(set("k", "this value is far too long", Condition::Always));
        assert!(matches!(reply, Response::Error(ErrorReply { code: ErrorCode::TooLarge, .. })), "{reply:?}");
        let reply =
            node.execute(Request::MSet { pairs: vec![(b("m"), b("ok")), (b("k"), b("this one is too long!"))] });
        assert!(matches!(reply, Response::Error(ErrorReply { code: ErrorCode::TooLarge, .. })));
        assert_eq!(node.execute(Request::Get { key: b("k") }), Response::Value(Some(b("small"))));
        assert_eq!(node.execute(Request::Get { key: b("m") }), Response::Value(None), "mset is all or nothing");
    }

    /// Hot keys are key bytes: plain stats leave them out (and say so),
    /// the admin variant with the node's token has them, a wrong token gets
    /// nothing but a refusal.
    #[test]
    fn hot_keys_are_only_for_admin_callers() {
        use cachet_proto::AdminCommand;
        let factory = crate::policies::native(crate::policies::DEFAULT_POLICY, Default::default()).expect("policy");
        let node = Node::new(NodeConfig::default(), factory).expect("node");
        let registry =
            crate::registry::Registry::open(None, crate::wasm::PolicyEngine::new().expect("engine")).expect("registry");
        let node = Arc::new(node.with_registry(registry, Some("s3cret".into())));
        let key = Bytes::from_static(b"user:alice@example.org");
        let set = Request::Set {
            key: key.clone(),
            value: Bytes::from_static(b"v"),
            ttl_ms: None,
            condition: Default::default(),
            hint: 0,
        };
        assert_eq!(node.execute(set), Response::Ok);
        for _ in 0..5 {
            node.execute(Request::Get { key: key.clone() });
        }

        let Response::Stats(plain) = node.execute(Request::Stats) else { panic!("plain stats") };
        assert!(plain.hot_keys.is_empty(), "plain stats leak {:?}", plain.hot_keys);
        assert!(plain.hot_keys_hidden);
        assert_eq!(plain.hits, 5);

        let admin = |token: &str| node.execute(Request::Admin { token: token.into(), command: AdminCommand::Stats });
        let Response::Stats(full) = admin("s3cret") else { panic!("admin stats") };
        assert_eq!(full.hot_keys.first().map(|h| &h.key), Some(&key), "{:?}", full.hot_keys);
        assert!(!full.hot_keys_hidden);
        assert_eq!(full.hits, 5);

        let refused = admin("guess");
        assert!(matches!(refused, Response::Error(ErrorReply { code: ErrorCode::Unauthorized, .. })), "{refused:?}");

        let factory = crate::policies::native(crate::policies::DEFAULT_POLICY, Default::default()).expect("policy");
        let no_token = Arc::new(Node::new(NodeConfig::default(), factory).expect("node"));
        let refused = no_token.execute(Request::Admin { token: String::new(), command: AdminCommand::Stats });
        assert!(matches!(refused, Response::Error(ErrorReply { code: ErrorCode::Unauthorized, .. })), "{refused:?}");
    }

    /// Shadow evaluation sees only requests that run: reads refused (a
    /// GETEX with a TTL of 0) are not sampled, valid ones are.
    #[test]
    fn shadow_evaluation_skips_refused_requests() {
        use cachet_proto::AdminCommand;
        let factory = crate::policies::native("lru", Default::default()).expect("policy");
        let node = Node::new(NodeConfig::default(), factory).expect("node");
        let registry =
            crate::registry::Registry::open(None, crate::wasm::PolicyEngine::new().expect("engine")).expect("registry");
        let node = Arc::new(node.with_registry(registry, Some("s3cret".into())));
        let admin = |command| node.execute(Request::Admin { token: "s3cret".into(), command });
        let Response::Policies(listing) = admin(AdminCommand::List) else { panic!("a listing") };
        let (name, version) = listing.active.split_once('@').expect("name@version");
        let shadow = AdminCommand::Shadow { name: name.into(), version: version.into() };
        assert!(matches!(admin(shadow), Response::Policies(_)));
        let sampled = || {
            let Response::Policies(listing) = admin(AdminCommand::List) else { panic!("a listing") };
            listing.shadow.expect("a shadow runs").sampled_reads
        };
        for i in 0..5_000 {
            let refused = Request::GetEx { key: Bytes::from(format!("k{i}")), ttl: cachet_proto::TtlChange::Set(0) };
            assert!(matches!(node.execute(refused), Response::Error(_)));
        }
        assert_eq!(sampled(), 0, "refused requests reached the shadow");
        for i in 0..5_000 {
            node.execute(Request::Get { key: Bytes::from(format!("k{i}")) });
        }
        assert!(sampled() > 0, "valid reads are sampled");
    }
}
