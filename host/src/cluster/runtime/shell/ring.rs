//! The ring from the metadata log: the slot table the log's state holds,
//! with every member it names, handed to the replica whenever the log
//! applies a new table. Owners do not follow the failure detector's
//! verdicts here: the log's leader decides when slots move (see
//! `meta::member`), and every member applies the same tables in the same
//! order, so no two members serve a key under disagreeing rings.

use super::Shell;
use crate::cluster::meta::entry::MemberState;
use crate::cluster::meta::member::MetaMember;
use crate::cluster::replica::{NodeIx, Replica};
use cachet_proto::{Member, Ring};
use std::net::SocketAddr;
use std::sync::Arc;

impl Shell {
    /// The ring the metadata log's state describes, if this node has a
    /// state (a joiner has none until it has caught up).
    fn ring_from_log(&self) -> Option<Arc<Ring>> {
        let state = self.meta.as_ref()?.state()?;
        let members = state
            .members
            .values()
            .filter(|m| m.state != MemberState::Removed)
            .map(|m| Member {
                id: m.node.to_string(),
                addr: m.client.unwrap_or(m.peer).to_string(),
                weight: m.weight.max(1),
            })
            .collect();
        match Ring::new(members, state.slots.clone()) {
            Ok(ring) => Some(Arc::new(ring)),
            Err(err) => {
                tracing::error!(%err, epoch = state.slots.epoch(), "the log's slot table cannot be used");
                None
            }
        }
    }

    /// Follows the log: learns the members it names, starts the replica on
    /// the first table, and hands it each newer one.
    pub(super) fn follow_log(&mut self, now: u64) {
        let (members, resp): (Vec<(NodeIx, SocketAddr)>, _) = match self.meta.as_ref().and_then(|m| m.state()) {
            Some(state) => (
                state
                    .members
                    .values()
                    .filter(|m| m.state != MemberState::Removed && m.node != self.me)
                    .map(|m| (m.node, m.peer))
                    .collect(),
                state
                    .members
                    .values()
                    .filter(|m| m.state != MemberState::Removed)
                    .filter_map(|m| Some((m.node, m.resp?)))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            ),
            None => return,
        };
        if let Ok(mut shared) = self.resp_addrs.lock() {
            *shared = resp;
        }
        // The log's address wins: a member replaced by a new process
        // (same id, new address) is reached there.
        for (node, addr) in members {
            self.learn(now, node, addr);
        }
        let newer = match &self.replica {
            Some(replica) => {
                self.meta.as_ref().and_then(|m| m.state()).is_some_and(|s| s.slots.epoch() > replica.epoch())
            }
            None => true,
        };
        if !newer {
            return;
        }
        // A member starts serving once it has caught up with the log and
        // runs its active policy (fetched from a peer if need be); after
        // `POLICY_WAIT_MS` if the policy cannot be installed, rather than
        // never.
        if self.replica.is_none() && !self.may_serve(now) {
            return;
        }
        let Some(ring) = self.ring_from_log() else { return };
        if let Ok(mut shared) = self.shared_ring.lock() {
            *shared = Some(ring.clone());
        }
        match self.replica.as_mut() {
            Some(replica) => {
                tracing::info!(epoch = ring.epoch(), was = replica.epoch(), "slot table changed");
                replica.set_ring(now, ring);
            }
            None => self.build_replica(now, ring),
        }
    }

    /// Starts the replica on `ring`, empty and re-syncing from every other
    /// owner; or counted at once in a cluster this process founded, where
    /// nothing was ever written (an absent founder does not hold the
    /// others back).
    fn build_replica(&mut self, now: u64, ring: Arc<Ring>) {
        let Some(store) = self.store.take() else { return };
        let nodes = self.peers.keys().max().map_or(1, |m| m + 1);
        let epoch = ring.epoch();
        let mut replica = Replica::with_store(self.me, nodes, ring, self.config, self.boot, store);
        if !self.meta.as_ref().is_some_and(MetaMember::founded_here) {
            replica.join(now, self.boot);
        }
        for (&node, &up) in &self.alive {
            if node != self.me {
                replica.set_alive(now, node, up);
            }
        }
        tracing::info!(members = self.peers.len(), epoch, "replica started; re-syncing");
        self.replica = Some(replica);
    }

    /// A member this node did not know: its address is taken in (from the
    /// log, or from gossip the member confirmed itself).
    pub(super) fn learn(&mut self, _now: u64, node: NodeIx, addr: SocketAddr) {
        if self.peers.get(&node) == Some(&addr) {
            return;
        }
        if let Some(old) = self.peers.insert(node, addr) {
            self.by_addr.remove(&old);
        }
        self.by_addr.insert(addr, node);
        // Its sender dials expecting the member known there when it started
        // (see `send_to`): a new one starts with the new expectation.
        self.senders.remove(&addr);
        crate::cluster::runtime::persist::save_members(&self.members_file, &self.peers);
        tracing::info!(node, %addr, members = self.peers.len(), "member known");
    }

    /// Members never heard from since this node started count as down
    /// once the grace period is over (a restarted node must not wait for
    /// a member that died while it was away; if that member is up after
    /// all, its gossip brings it back).
    pub(super) fn end_grace(&mut self, now: u64) {
        if now < self.grace_until || self.grace_until == 0 {
            return;
        }
        self.grace_until = 0;
        let silent: Vec<NodeIx> =
            self.peers.keys().copied().filter(|i| *i != self.me && !self.heard.contains(i)).collect();
        for node in silent {
            tracing::warn!(node, "member not heard from since start; counted as down");
            self.alive.insert(node, false);
            if let Some(replica) = self.replica.as_mut() {
                replica.set_alive(now, node, false);
            }
        }
    }
}
