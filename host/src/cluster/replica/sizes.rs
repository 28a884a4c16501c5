//! Size probes: how large the values of many keys are, before any value
//! travels.
//!
//! A clustered MGET of many keys could ask the owners for far more bytes
//! than a reply may hold (a few bytes per key can name the same large value
//! a thousand times). The coordinator first asks each live owner for the
//! sizes of its records of the keys, one message per member, and refuses
//! the MGET before a value is copied when the largest size heard for each
//! key adds up past the reply limit. The answer is advisory: values can
//! change between the probe and the reads, so the reads still check the
//! reply's size as values arrive; an owner that does not answer in time
//! leaves its keys at the sizes heard from the others.

use super::{Consistency, Message, NodeIx, Outcome, Pending, Replica, Reply};
use bytes::Bytes;
use std::collections::BTreeMap;

/// Keys in one size probe message, at most: far more than any reply could
/// hold values for.
pub const MAX_PROBE_KEYS: usize = 1 << 20;

/// A size probe waiting for owners' answers.
pub(super) struct SizeProbe {
    pub(super) client_req: u64,
    pub(super) deadline: u64,
    /// The largest size heard so far per key, in the order asked.
    largest: Vec<u64>,
    /// Answers still needed per key before the probe is complete.
    needed: Vec<usize>,
    /// Per member asked and not yet answered: the indices of the keys it
    /// was asked about, in the order sent.
    asked: BTreeMap<NodeIx, Vec<usize>>,
}

impl Replica {
    /// Starts a size probe of `keys` at `consistency` for client request
    /// `client_req`: this node's own records answer at once, each other
    /// live owner gets one [`Message::Sizes`] with its keys.
    pub(super) fn probe_sizes(&mut self, now: u64, client_req: u64, keys: Vec<Bytes>, consistency: Consistency) {
        let mut probe = SizeProbe {
            client_req,
            deadline: now + self.config.request_timeout_ms,
            largest: vec![0; keys.len()],
            needed: vec![0; keys.len()],
            asked: BTreeMap::new(),
        };
        for (i, key) in keys.iter().enumerate() {
            let owners = self.owners(key);
            let live = self.live(&owners);
            probe.needed[i] = consistency.required(owners.len()).min(live);
            for owner in owners {
                if owner == self.me {
                    probe.largest[i] = probe.largest[i].max(self.local_size(key));
                    probe.needed[i] = probe.needed[i].saturating_sub(1);
                } else if self.is_alive(owner) {
                    probe.asked.entry(owner).or_default().push(i);
                }
            }
        }
        if probe.needed.iter().all(|&n| n == 0) {
            self.replies.push_back(Reply { client_req, result: Ok(Outcome::Sizes(probe.largest)) });
            return;
        }
        let req = self.request_id();
        for (&member, indices) in &probe.asked {
            let keys = indices.iter().map(|&i| keys[i].clone()).collect();
            self.send(member, Message::Sizes { req, keys });
        }
        self.pending.insert(req, Pending::Sizes(probe));
    }

    /// The length of this replica's value of `key` (0: none, or deleted).
    fn local_size(&self, key: &[u8]) -> u64 {
        self.store.get(key, false).and_then(|r| r.value).map_or(0, |v| v.len() as u64)
    }

    /// Answers a peer's [`Message::Sizes`].
    pub(super) fn answer_sizes(&mut self, from: NodeIx, req: u64, keys: &[Bytes]) {
        let sizes = keys.iter().map(|key| self.local_size(key)).collect();
        self.send(from, Message::SizesReply { req, sizes });
    }

    /// A member's answer to a probe: counted when it answers for exactly
    /// the keys it was asked about (anything else is ignored).
    pub(super) fn sizes_answered(&mut self, from: NodeIx, req: u64, sizes: &[u64]) {
        let Some(Pending::Sizes(probe)) = self.pending.get_mut(&req) else { return };
        if probe.asked.get(&from).is_none_or(|indices| indices.len() != sizes.len()) {
            return;
        }
        for (i, &size) in probe.asked.remove(&from).unwrap_or_default().into_iter().zip(sizes) {
            probe.largest[i] = probe.largest[i].max(size);
            probe.needed[i] = probe.needed[i].saturating_sub(1);
        }
        if probe.needed.iter().all(|&n| n == 0) || probe.asked.is_empty() {
            self.finish_probe(req);
        }
    }

    /// Answers the probe `req` with the sizes heard so far (also at its
    /// deadline: the reads that follow still bound the reply).
    pub(super) fn finish_probe(&mut self, req: u64) {
        if let Some(Pending::Sizes(probe)) = self.pending.remove(&req) {
            let reply = Reply { client_req: probe.client_req, result: Ok(Outcome::Sizes(probe.largest)) };
            self.replies.push_back(reply);
        }
    }
}
