//! The node as its own composition root: [`Node::start`] builds a node from
//! its options (store, policy registry, loaders, cluster membership), opens
//! its ports, and runs what every node needs whichever ports it serves: the
//! 100 ms tick (active expiry, policy deadlines and recovery, the shadow's
//! ghosts, the supervisor that rolls back a faulting module, the loaders'
//! negative cache) and the metrics endpoint. [`Running::shutdown`] stops it
//! all in order. `main.rs` only turns arguments into [`NodeOptions`]; tests
//! and examples start nodes the same way.

use super::{Node, NodeConfig};
use crate::cluster::runtime::{Cluster, ClusterError, ClusterOptions};
use crate::core::{PolicyError, PolicyFactory};
use crate::loader::shared::SharedLoaders;
use crate::loader::{LoaderConfig, Loaders, LoadersError};
use crate::registry::Registry;
use crate::resp::{RespError, RespOptions, RunningResp};
use crate::server::{RunningServer, ServeOptions, ServerError};
use crate::store::Clock;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the node's periodic work runs.
pub const TICK: Duration = Duration::from_millis(100);

/// Everything a node is started with.
pub struct NodeOptions {
    /// Sizing.
    pub config: NodeConfig,
    /// The policy every shard starts with.
    pub policy: Arc<dyn PolicyFactory>,
    /// Where time comes from; `None` for the real clock.
    pub clock: Option<Arc<dyn Clock>>,
    /// The module registry, and the admin token that opens admin commands.
    pub registry: Option<(Registry, Option<String>)>,
    /// Read-through loaders.
    pub loaders: Option<LoaderConfig>,
    /// Cluster membership.
    pub cluster: Option<ClusterOptions>,
    /// The QUIC port (`cachet/1`).
    pub quic: Option<ServeOptions>,
    /// The Redis-protocol port.
    pub resp: Option<RespOptions>,
    /// Where the metrics endpoint listens.
    pub metrics: Option<SocketAddr>,
}

impl NodeOptions {
    /// A node with no ports, loaders, cluster or registry yet.
    pub fn new(config: NodeConfig, policy: Arc<dyn PolicyFactory>) -> Self {
        Self {
            config,
            policy,
            clock: None,
            registry: None,
            loaders: None,
            cluster: None,
            quic: None,
            resp: None,
            metrics: None,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The policy refused to start in a shard.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The loader configuration.
    #[error(transparent)]
    Loaders(#[from] LoadersError),
    /// Cluster membership.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The QUIC port.
    #[error(transparent)]
    Quic(#[from] ServerError),
    /// The RESP port.
    #[error(transparent)]
    Resp(#[from] RespError),
    /// The metrics endpoint.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::endpoint::MetricsError),
    /// Options that do not go together.
    #[error("{0}")]
    Config(String),
    /// The node's own thread.
    #[error("cannot start the node's thread: {0}")]
    Thread(std::io::Error),
}

/// A started node; [`Running::shutdown`] stops it.
pub struct Running {
    node: Arc<Node>,
    quic: Option<RunningServer>,
    resp: Option<RunningResp>,
    metrics: Option<SocketAddr>,
    background: Option<crate::server::threads::Running>,
}

impl Node {
    /// Builds a node from `options`, attaches its loaders and cluster,
    /// opens its ports and starts its tick and metrics endpoint. Whatever
    /// started before a failure is stopped again.
    pub fn start(options: NodeOptions) -> Result<Running, StartError> {
        let clock = options.clock.unwrap_or_else(|| Arc::new(crate::store::MonotonicClock::new()));
        let mut node = Self::with_clock(options.config, options.policy, clock)?;
        if let Some((registry, token)) = options.registry {
            node = node.with_registry(registry, token);
        }
        let node = Arc::new(node);
        let mut running = Running { node: node.clone(), quic: None, resp: None, metrics: None, background: None };
        // The tick first: a node must expire keys and supervise its policy
        // whichever ports it serves.
        let (background, metrics) = background(node.clone(), options.metrics)?;
        running.background = Some(background);
        running.metrics = metrics;
        // Loaders are built (their modules compiled) before the cluster
        // starts: a bad module fails the start, and as a key's primary a
        // member must be able to load as soon as it serves.
        let loaders = options.loaders.as_ref().map(Loaders::new).transpose()?;
        if let Some(cluster) = options.cluster {
            // A member's `--loaders` is its proposal for the cluster's
            // loader configuration; the log's wins (see `node::loaders`).
            let seed = options
                .loaders
                .as_ref()
                .map(SharedLoaders::from_config)
                .transpose()
                .map_err(|e| StartError::Config(e.to_string()))?;
            let cluster = Cluster::start(cluster, node.store().clone())?;
            // The runtime applies the cluster's policy and loaders to this
            // node.
            let host: std::sync::Weak<Self> = Arc::downgrade(&node);
            cluster
                .attach_policies(host.clone() as std::sync::Weak<dyn crate::cluster::policy::PolicyHost>)
                .map_err(StartError::Config)?;
            if let Err(cluster) = node.attach_cluster(cluster.clone()) {
                cluster.shutdown();
            }
            // After `attach_cluster`: the runtime may build the log's
            // loaders as soon as it has the host, and the node must know
            // its cluster by then.
            cluster
                .attach_loader_host(host as std::sync::Weak<dyn crate::cluster::loaders::LoaderHost>)
                .map_err(StartError::Config)?;
            if let (Some(seed), Some(loaders)) = (seed, loaders) {
                node.keep_prebuilt_loaders(&seed, loaders);
                if let Err(err) = cluster.seed_loaders(seed) {
                    cluster.shutdown();
                    return Err(StartError::Config(err));
                }
            }
        } else if let Some(loaders) = loaders {
            // A fresh node has none yet.
            let _ = node.attach_loaders(loaders);
        }
        if let Some(quic) = options.quic {
            running.quic = Some(crate::server::start(node.clone(), quic)?);
        }
        if let Some(resp) = options.resp {
            running.resp = Some(crate::resp::start(node.clone(), resp)?);
        }
        Ok(running)
    }
}

/// The node's own thread: the tick, and the metrics endpoint when asked.
fn background(
    node: Arc<Node>,
    metrics: Option<SocketAddr>,
) -> Result<(crate::server::threads::Running, Option<SocketAddr>), StartError> {
    let (ready, started) = std::sync::mpsc::channel();
    let at = metrics.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let thread = crate::server::threads::spawn("cachet-node", at, vec![metrics], move |_, metrics, stopped| {
        run_background(node.clone(), metrics, stopped, ready.clone())
    })
    .map_err(StartError::Thread)?;
    match started.recv() {
        Ok(Ok(bound)) => Ok((thread, bound)),
        Ok(Err(err)) => {
            thread.shutdown();
            Err(err.into())
        }
        Err(_) => {
            thread.shutdown();
            Err(StartError::Thread(std::io::Error::other("the node's thread ended while starting")))
        }
    }
}

type Ready = std::sync::mpsc::Sender<Result<Option<SocketAddr>, crate::metrics::endpoint::MetricsError>>;

async fn run_background(
    node: Arc<Node>,
    metrics: Option<SocketAddr>,
    mut stopped: watch::Receiver<bool>,
    ready: Ready,
) {
    let endpoint = match metrics {
        Some(addr) => {
            let (bound, at) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(crate::metrics::endpoint::serve(node.clone(), addr, stopped.clone(), bound));
            match at.await {
                Ok(local) => {
                    let _ = ready.send(Ok(Some(local)));
                    Some(task)
                }
                Err(_) => {
                    let err = match task.await {
                        Ok(Err(err)) => err,
                        _ => crate::metrics::endpoint::MetricsError::new(
                            addr,
                            std::io::Error::other("the endpoint ended"),
                        ),
                    };
                    let _ = ready.send(Err(err));
                    return;
                }
            }
        }
        None => {
            let _ = ready.send(Ok(None));
            None
        }
    };
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {
                // A tick may swap every shard (automatic rollback): on a
                // blocking thread, so the metrics endpoint keeps answering.
                let node = node.clone();
                let _ = tokio::task::spawn_blocking(move || node.tick()).await;
            }
            _ = stopped.changed() => break,
        }
    }
    if let Some(task) = endpoint {
        let _ = task.await;
    }
}

impl Running {
    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Where the QUIC port listens.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().map(RunningServer::local_addr)
    }

    /// Where the RESP port listens.
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.resp.as_ref().map(RunningResp::local_addr)
    }

    /// Where the metrics endpoint listens.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// Stops the ports (each finishes what is in flight), then the
    /// cluster's runtime, then the tick and the metrics endpoint.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(resp) = self.resp.take() {
            resp.shutdown();
        }
        if let Some(quic) = self.quic.take() {
            quic.shutdown();
        }
        if let Some(cluster) = self.node.cluster() {
            cluster.shutdown();
        }
        if let Some(background) = self.background.take() {
            background.shutdown();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}
