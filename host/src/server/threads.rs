//! Thread per core, shared by the QUIC and RESP ports: one OS thread per
//! socket, each running a current-thread tokio runtime, all stopped by one
//! signal. No runtime work crosses threads, which measured several times
//! cheaper per request than a multi-thread runtime here.

use std::future::Future;
use std::net::SocketAddr;
use tokio::sync::watch;

/// A port served by a group of threads; [`Running::shutdown`] stops it.
pub struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Signals every thread to stop (they finish what is in flight, as
    /// their serving futures decide) and waits for them.
    pub fn shutdown(self) {
        let _ = self.stop.send(true);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Spawns a thread named `{prefix}-{i}` per socket, each blocking on
/// `serve(i, socket, stopped)` in a runtime of its own.
pub fn spawn<S, F>(
    prefix: &str,
    addr: SocketAddr,
    sockets: Vec<S>,
    serve: impl Fn(usize, S, watch::Receiver<bool>) -> F + Clone + Send + 'static,
) -> std::io::Result<Running>
where
    S: Send + 'static,
    F: Future<Output = ()>,
{
    let (stop, stopped) = watch::channel(false);
    let mut threads = Vec::with_capacity(sockets.len());
    for (i, socket) in sockets.into_iter().enumerate() {
        let (serve, stopped) = (serve.clone(), stopped.clone());
        let thread = std::thread::Builder::new().name(format!("{prefix}-{i}")).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(err) => {
                    tracing::error!(%err, "cannot start a runtime");
                    return;
                }
            };
            runtime.block_on(serve(i, socket, stopped));
        });
        match thread {
            Ok(thread) => threads.push(thread),
            Err(err) => {
                // Stop the ones already running before reporting.
                Running { addr, stop, threads }.shutdown();
                return Err(err);
            }
        }
    }
    Ok(Running { addr, stop, threads })
}
