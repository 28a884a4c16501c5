//! A reply now, or one to await: what the dispatcher, the loaders and the
//! cluster hand back for a request. Its own module so that each of them can
//! name it without importing the others.

use cachet_proto::Response;

/// A reply that takes a while (a load, a write to an origin, a replicated
/// operation, an admin command off the I/O thread).
pub type Later = std::pin::Pin<Box<dyn Future<Output = Response> + Send>>;

/// A request's reply: ready, or to await.
pub enum Routed {
    /// The reply.
    Now(Response),
    /// The reply, once the work is done.
    Later(Later),
}

impl Routed {
    /// The reply, awaiting it if it is not ready.
    pub async fn response(self) -> Response {
        match self {
            Self::Now(response) => response,
            Self::Later(later) => later.await,
        }
    }
}
