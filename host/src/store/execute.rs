//! Which path a data command takes: one shard locked at a time (the
//! ordinary path), or every shard of its keys held at once for the
//! commands that must apply whole across keys (MSETNX, RENAME, COPY),
//! through the transaction path.

use super::Store;
use super::commands::execute_on;
use super::shards::Locking;
use cachet_proto::{ErrorCode, ErrorReply, Request, Response};

impl Store {
    /// Runs a data command at `now`.
    pub fn execute(&self, now: u64, request: Request) -> Response {
        if request.spans_keys() {
            return self.execute_spanning(now, request);
        }
        execute_on(&mut Locking(self), now, request)
    }

    /// Runs a request that must apply whole across its keys' shards
    /// (MSETNX, RENAME, COPY) with all of them held.
    fn execute_spanning(&self, now: u64, request: Request) -> Response {
        let watched = super::transaction::Watched::default();
        match self.transaction(now, vec![request], &watched).and_then(|mut replies| replies.pop()) {
            Some(response) => response,
            None => Response::Error(ErrorReply::new(ErrorCode::Internal, "a multi-key command ran without a reply")),
        }
    }
}
