//! Batch writes: an MSET whose keys share their owners, written as one.
//!
//! Each owner applies the whole batch in one message, under one version,
//! so no replica ever holds some of its keys and not the others, and a
//! reader never sees half of it on one replica. The write is the single
//! key's in two rounds (ABD): first the highest version a read quorum
//! holds of any of the keys (`Versions`), then the batch stored at a
//! version above it (`PutBatch`), acknowledged by the level's count of
//! owners. Like a single write, a batch that is not acknowledged may
//! still have reached some owners, whole.

use super::{
    Consistency, Message, NodeIx, OpError, Outcome, PeerMessageError, Pending, Record, Replica, Reply, Version,
};
use bytes::Bytes;
use std::collections::BTreeSet;

/// Keys in one batch, at most (a peer's longer batch is refused).
pub const MAX_BATCH_KEYS: usize = 1 << 16;

/// One key of a batch write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchEntry {
    /// The key.
    pub key: Bytes,
    /// The value (`None` deletes).
    pub value: Option<Bytes>,
    /// Expiry, in Unix milliseconds.
    pub expires_at: Option<u64>,
    /// The policy hint stored with it.
    pub hint: u32,
}

/// A batch write in progress at its coordinator.
pub(super) struct BatchWrite {
    pub(super) client_req: u64,
    pub(super) deadline: u64,
    entries: Vec<BatchEntry>,
    owners: Vec<NodeIx>,
    required: usize,
    phase: BatchPhase,
}

enum BatchPhase {
    /// Owners that answered, how many of them count, how many must, and the
    /// highest version heard.
    Query { answered: BTreeSet<NodeIx>, counted: usize, needed: usize, highest: Version },
    /// The version written, and the owners that acknowledged it.
    Store { version: Version, acked: BTreeSet<NodeIx>, counted: usize },
}

impl BatchWrite {
    /// The key the batch's owners are placed by (every key has the same).
    pub(super) fn first_key(&self) -> Option<&Bytes> {
        self.entries.first().map(|e| &e.key)
    }
}

impl Replica {
    /// Starts a batch write of `entries` at `consistency` for `client_req`.
    /// Refused (`Unavailable`) unless every key has the same owners on this
    /// node's ring: the caller checks it first, so only a ring that changed
    /// since does.
    pub(super) fn write_batch(
        &mut self,
        now: u64,
        client_req: u64,
        entries: Vec<BatchEntry>,
        consistency: Consistency,
    ) {
        let refuse = |this: &mut Self| this.replies.push_back(Reply { client_req, result: Err(OpError::Unavailable) });
        let Some(first) = entries.first() else {
            self.replies.push_back(Reply { client_req, result: Ok(Outcome::Written(Version::default())) });
            return;
        };
        let owners = self.owners(&first.key);
        // Written to the members taking the slot over too, each of whom
        // must acknowledge (as a single write is).
        let targets = self.write_targets(&first.key);
        let set = |owners: &[NodeIx]| owners.iter().copied().collect::<BTreeSet<_>>();
        let same = entries.iter().all(|e| set(&self.write_targets(&e.key)) == set(&targets));
        let extra = targets.len() - owners.len();
        let required = consistency.required(owners.len()) + extra;
        if !same || entries.len() > MAX_BATCH_KEYS || required == extra || self.live(&targets) < required {
            refuse(self);
            return;
        }
        let req = self.request_id();
        let deadline = now + self.config.request_timeout_ms;
        let needed = Consistency::Quorum.required(owners.len());
        let owners = targets;
        let phase = BatchPhase::Query { answered: BTreeSet::new(), counted: 0, needed, highest: Version::default() };
        let keys: Vec<Bytes> = entries.iter().map(|e| e.key.clone()).collect();
        self.pending.insert(req, Pending::Batch(BatchWrite { client_req, deadline, entries, owners, required, phase }));
        let owners = match self.pending.get(&req) {
            Some(Pending::Batch(batch)) => batch.owners.clone(),
            _ => return,
        };
        for owner in owners {
            if owner == self.me {
                let (highest, counted) = self.local_versions(&keys);
                self.versions_answered(now, req, owner, highest, counted);
            } else if self.is_alive(owner) {
                self.send(owner, Message::Versions { req, keys: keys.clone() });
            }
        }
        self.batch_progress(now, req);
    }

    /// The highest version this replica holds of any of `keys` (deletions
    /// included), and whether its copies of all of them count.
    fn local_versions(&self, keys: &[Bytes]) -> (Version, bool) {
        let highest = keys.iter().filter_map(|k| self.store.get(k, false)).map(|r| r.version).max();
        (highest.unwrap_or_default(), keys.iter().all(|k| self.counted_for(k)))
    }

    /// Answers a peer's [`Message::Versions`].
    /// `current`: the asker is on this replica's table or a newer one.
    pub(super) fn answer_versions(&mut self, from: NodeIx, req: u64, keys: &[Bytes], current: bool) {
        let (highest, counted) = self.local_versions(keys);
        let counted = counted && current;
        self.send(from, Message::VersionsReply { req, highest, counted });
    }

    /// An owner's highest version for the batch `req`.
    pub(super) fn versions_answered(&mut self, now: u64, req: u64, from: NodeIx, highest: Version, counted: bool) {
        self.clock.observe(highest);
        if let Some(Pending::Batch(batch)) = self.pending.get_mut(&req)
            && batch.owners.contains(&from)
            && let BatchPhase::Query { answered, counted: n, highest: top, .. } = &mut batch.phase
            && answered.insert(from)
        {
            *n += usize::from(counted);
            *top = (*top).max(highest);
        }
        self.batch_progress(now, req);
    }

    /// Applies a peer's [`Message::PutBatch`] whole; whether every record
    /// is held and counts.
    pub(super) fn apply_batch(&mut self, now: u64, entries: &[(Bytes, Record)]) -> bool {
        let mut all = true;
        for (key, record) in entries {
            all &= self.apply(now, key, record) && (self.counted_for(key) || self.pending_here(key));
        }
        all
    }

    /// An owner's acknowledgement of the batch `req`.
    pub(super) fn batch_acked(&mut self, now: u64, req: u64, from: NodeIx, counted: bool) {
        if let Some(Pending::Batch(batch)) = self.pending.get_mut(&req)
            && batch.owners.contains(&from)
            && let BatchPhase::Store { acked, counted: n, .. } = &mut batch.phase
            && acked.insert(from)
        {
            *n += usize::from(counted);
        }
        self.batch_progress(now, req);
    }

    /// Moves the batch `req` on as far as its answers allow.
    fn batch_progress(&mut self, now: u64, req: u64) {
        let Some(Pending::Batch(batch)) = self.pending.get_mut(&req) else { return };
        match &batch.phase {
            // Its query answered only past the deadline (this process was
            // paused, or starved): its client has given up, and writes
            // made since would lose to the version this write would take.
            BatchPhase::Query { counted, needed, .. } if counted >= needed && now >= batch.deadline => {
                let client_req = batch.client_req;
                self.pending.remove(&req);
                self.replies.push_back(Reply { client_req, result: Err(OpError::Timeout) });
            }
            BatchPhase::Query { counted, needed, highest, .. } if counted >= needed => {
                self.clock.observe(*highest);
                let version = self.clock.tick(self.me);
                let Some(Pending::Batch(batch)) = self.pending.get_mut(&req) else { return };
                batch.phase = BatchPhase::Store { version, acked: BTreeSet::new(), counted: 0 };
                let records: Vec<(Bytes, Record)> = batch
                    .entries
                    .iter()
                    .map(|e| {
                        (
                            e.key.clone(),
                            Record { version, value: e.value.clone(), expires_at: e.expires_at, hint: e.hint },
                        )
                    })
                    .collect();
                let owners = batch.owners.clone();
                for &owner in &owners {
                    if owner == self.me {
                        let counted = self.apply_batch(now, &records);
                        self.batch_acked(now, req, owner, counted);
                    } else if self.is_alive(owner) {
                        self.send(owner, Message::PutBatch { req, entries: records.clone() });
                    } else if records.first().is_some_and(|(key, _)| self.owners(key).contains(&owner)) {
                        // Hints per key for a down owner, as single writes.
                        for (key, record) in &records {
                            match self.hint_holder(key, &owners) {
                                Some(holder) if holder == self.me => {
                                    self.keep_hint(now, owner, key.clone(), record.clone())
                                }
                                Some(holder) => self.send(
                                    holder,
                                    Message::Put {
                                        req: 0,
                                        key: key.clone(),
                                        record: record.clone(),
                                        hint_for: Some(owner),
                                    },
                                ),
                                None => {}
                            }
                        }
                    }
                }
            }
            BatchPhase::Store { version, counted, .. } if *counted >= batch.required => {
                let reply = Reply { client_req: batch.client_req, result: Ok(Outcome::Written(*version)) };
                self.pending.remove(&req);
                self.replies.push_back(reply);
            }
            _ => {}
        }
    }

    /// Checks a batch message's sizes and versions.
    pub(super) fn check_batch(
        &self,
        message: &Message,
        key_ok: impl Fn(&Bytes) -> Result<(), PeerMessageError>,
        record_ok: impl Fn(&Record) -> Result<(), PeerMessageError>,
        wall_ms: u64,
    ) -> Result<(), PeerMessageError> {
        let too_many = |count: usize| PeerMessageError::TooMany { what: "keys", count, limit: MAX_BATCH_KEYS };
        match message {
            Message::Versions { keys, .. } => {
                if keys.len() > MAX_BATCH_KEYS {
                    return Err(too_many(keys.len()));
                }
                keys.iter().try_for_each(key_ok)
            }
            Message::VersionsReply { highest, .. } => Ok(super::version::check(*highest, wall_ms)?),
            Message::PutBatch { entries, .. } => {
                if entries.len() > MAX_BATCH_KEYS {
                    return Err(too_many(entries.len()));
                }
                entries.iter().try_for_each(|(key, record)| key_ok(key).and_then(|()| record_ok(record)))
            }
            _ => Ok(()),
        }
    }
}
