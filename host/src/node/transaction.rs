//! MULTI/EXEC and WATCH on a node: the dispatcher's checks for each
//! queued command, then the store runs them as one transaction
//! (`store::transaction`). Where a transaction cannot be atomic it is
//! refused whole at queue time, never run piecemeal: on a cluster (a
//! transaction's keys live on different members, written through their own
//! owners) and for keys a loader fills (a load or an origin write would
//! have to join the transaction).

use super::Node;
use crate::store::transaction::Watched;
use bytes::Bytes;
use cachet_proto::{ErrorCode, ErrorReply, Request, Response};
use std::time::Instant;

impl Node {
    /// Why `request` cannot be part of a transaction here, if it cannot.
    pub fn transaction_refusal(&self, request: &Request) -> Option<String> {
        if self.cluster().is_some() {
            return Some(
                "MULTI/EXEC is not supported on a Cachet cluster yet: a transaction's keys live on different \
                 members (use pipelines without MULTI)"
                    .into(),
            );
        }
        if request.walks_keys() {
            return Some(format!("{} cannot be in a transaction", request.name().to_ascii_uppercase()));
        }
        let loaders = self.loaders()?;
        if matches!(request, Request::FlushAll | Request::DbSize) {
            return Some(format!("{} cannot be in a transaction on a node with loaders", request.name()));
        }
        let key = request.keys().into_iter().find(|key| loaders.covers(key))?;
        Some(format!(
            "`{}` is in a loader namespace: its loads and origin writes cannot be part of a transaction",
            String::from_utf8_lossy(key)
        ))
    }

    /// WATCH `keys`: refused as [`Node::transaction_refusal`] refuses a
    /// command on them.
    pub fn watch(&self, keys: &[Bytes], watched: &mut Watched) -> Result<(), String> {
        let probe = Request::Exists { keys: keys.to_vec() };
        if let Some(why) = self.transaction_refusal(&probe) {
            return Err(why.replace("MULTI/EXEC", "WATCH"));
        }
        self.store.watch(keys, watched);
        Ok(())
    }

    /// EXEC: each request checked as the dispatcher checks it (a refusal
    /// is that command's error reply in the result, as a Redis runtime
    /// error is: the others still run), the rest run as one transaction.
    /// `None` when a watched key changed: nothing ran.
    pub fn transaction(&self, requests: Vec<Request>, watched: &Watched) -> Option<Vec<Response>> {
        let started = Instant::now();
        let now = self.store.now_ms_at(started);
        let mut replies: Vec<Option<Response>> = Vec::with_capacity(requests.len());
        let mut runnable = Vec::with_capacity(requests.len());
        let mut commands = Vec::with_capacity(requests.len());
        for request in requests {
            commands.push(crate::metrics::command_index(&request));
            match self.refuse_invalid(&request) {
                Some(refused) => replies.push(Some(refused)),
                None => {
                    self.observe(now, &request);
                    replies.push(None);
                    runnable.push(request);
                }
            }
        }
        let mut ran = self.store.transaction(now, runnable, watched)?.into_iter();
        let missing = || Response::Error(ErrorReply::new(ErrorCode::Internal, "a transaction's reply is missing"));
        let replies: Vec<Response> =
            replies.into_iter().map(|r| r.or_else(|| ran.next()).unwrap_or_else(missing)).collect();
        let took = started.elapsed();
        for (command, reply) in commands.into_iter().zip(&replies) {
            self.metrics.record(command, took, super::dispatch::is_error(reply));
        }
        Some(replies)
    }
}
