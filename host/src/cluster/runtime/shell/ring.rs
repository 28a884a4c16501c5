//! The serving ring: the members that serve (this node and those up,
//! while it sees a majority; held-out members only once readmitted), and
//! the replica built on it and told of its changes.

use super::Shell;
use crate::cluster::replica::{Message, NodeIx, Replica};
use crate::cluster::runtime::persist::save_members;
use crate::cluster::transport::PeerFrame;
use cachet_proto::{Member, Ring};
use std::net::SocketAddr;
use std::sync::Arc;

/// How often a `Readmit` is resent until the member answers.
const READMIT_EVERY_MS: u64 = 200;

/// The members of the serving ring, and whether this node sees a strict
/// majority of the known members up. The ring holds this node and every
/// known member that is up (and not held out, waiting to be readmitted),
/// as long as that is a majority. A node that sees only a minority may be
/// the one cut off: if it dropped the others from its ring it would own
/// every key alone. So it keeps every known member instead, and counts
/// for nothing ([`Replica::set_quorate`]).
fn serving(
    me: NodeIx,
    known: impl Iterator<Item = NodeIx>,
    alive: &std::collections::BTreeMap<NodeIx, bool>,
    held_out: &std::collections::BTreeMap<NodeIx, u64>,
) -> (Vec<NodeIx>, bool) {
    let known: Vec<NodeIx> = known.collect();
    // A member held out is not counted for the majority either: a node
    // whose only company is members it has not readmitted yet is still
    // alone (it would otherwise own every key on a ring of itself).
    let serves = |i: NodeIx| i == me || (alive.get(&i).copied().unwrap_or(false) && !held_out.contains_key(&i));
    let up: Vec<NodeIx> = known.iter().copied().filter(|&i| serves(i)).collect();
    if up.len() * 2 > known.len() { (up, true) } else { (known, false) }
}

impl Shell {
    /// The members that serve (see [`serving`]).
    fn serving_members(&self) -> Vec<NodeIx> {
        serving(self.me, self.peers.keys().copied(), &self.alive, &self.held_out).0
    }

    /// The serving ring. Its epoch is the known member count (members are
    /// never forgotten, so nodes that know the same members agree on it);
    /// who serves is in the stats' `alive`.
    fn ring(&self) -> Option<Arc<Ring>> {
        let members = self
            .serving_members()
            .into_iter()
            .filter_map(|i| self.peers.get(&i).map(|a| Member { id: i.to_string(), addr: a.to_string(), weight: 1 }))
            .collect::<Vec<_>>();
        match Ring::new(self.peers.len() as u64, members, cachet_proto::DEFAULT_VNODES) {
            Ok(ring) => Some(Arc::new(ring)),
            Err(err) => {
                tracing::error!(%err, "cannot build the ring");
                None
            }
        }
    }

    /// Starts the replica, empty and re-syncing from every known member.
    pub(super) fn build_replica(&mut self, now: u64) {
        let (Some(ring), Some(store)) = (self.ring(), self.store.take()) else { return };
        let nodes = self.peers.keys().max().map_or(1, |m| m + 1);
        let (serving, quorate) = serving(self.me, self.peers.keys().copied(), &self.alive, &self.held_out);
        self.serving = serving;
        if let Ok(mut shared) = self.shared_ring.lock() {
            *shared = Some(ring.clone());
        }
        let mut replica = Replica::with_store(self.me, nodes, ring, self.config, self.boot, store);
        replica.join(now, self.boot);
        replica.set_quorate(now, quorate);
        for (&node, &up) in &self.alive {
            if node != self.me {
                replica.set_alive(now, node, up);
            }
        }
        tracing::info!(members = self.peers.len(), "replica started; re-syncing");
        self.replica = Some(replica);
    }

    /// A member this node did not know joined: it takes its share of the
    /// ring at once.
    pub(super) fn learn(&mut self, now: u64, node: NodeIx, addr: SocketAddr) {
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
        self.changed_at = now;
        save_members(&self.members_file, &self.peers);
        tracing::info!(node, %addr, members = self.peers.len(), "member joined the ring");
        self.refresh_ring(now);
    }

    /// Hands the replica the serving ring when its members changed.
    pub(super) fn refresh_ring(&mut self, now: u64) {
        if self.replica.is_none() {
            return;
        }
        let (serving, quorate) = serving(self.me, self.peers.keys().copied(), &self.alive, &self.held_out);
        // Dropped: left a ring that had a majority for one that still has
        // one (losing the majority keeps every member in the ring, and
        // drops nobody).
        let was_quorate = self.replica.as_ref().is_some_and(Replica::quorate);
        if quorate && was_quorate {
            let gone: Vec<NodeIx> = self.serving.iter().copied().filter(|n| !serving.contains(n)).collect();
            self.dropped.extend(gone);
        }
        if !quorate {
            self.owe_pull.extend(self.dropped.iter().copied());
        }
        if let Some(replica) = self.replica.as_mut() {
            if replica.counted() != quorate && !quorate {
                tracing::warn!("this node sees a minority of the members up; it counts for nothing");
            }
            replica.set_quorate(now, quorate);
        }
        if serving == self.serving {
            return;
        }
        let Some(ring) = self.ring() else { return };
        tracing::info!(serving = ?serving, was = ?self.serving, "serving ring changed");
        self.serving = serving;
        if let Ok(mut shared) = self.shared_ring.lock() {
            *shared = Some(ring.clone());
        }
        if let Some(replica) = self.replica.as_mut() {
            replica.set_ring(now, ring);
        }
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
        self.refresh_ring(now);
    }

    /// Asks every held-out member again to re-sync and answer.
    pub(super) fn readmit(&mut self, now: u64) {
        if self.held_out.is_empty() || now < self.readmit_at {
            return;
        }
        self.readmit_at = now + READMIT_EVERY_MS;
        let asks: Vec<(SocketAddr, u64)> =
            self.held_out.iter().filter_map(|(ix, &nonce)| self.peers.get(ix).map(|&a| (a, nonce))).collect();
        for (addr, nonce) in asks {
            self.send_to(addr, PeerFrame::Replica(Message::Readmit { nonce }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::serving;
    use std::collections::BTreeMap;

    fn alive(up: &[(u32, bool)]) -> BTreeMap<u32, bool> {
        up.iter().copied().collect()
    }

    /// Members declared down leave the serving ring only while this node
    /// sees a strict majority up; a node on the minority side keeps every
    /// member and is not quorate (it counts for nothing). A member held out
    /// for readmission stays out while quorate.
    #[test]
    fn the_serving_ring_shrinks_only_with_a_majority_up() {
        let none = BTreeMap::new();
        let ring = |known: std::ops::Range<u32>, up: &[(u32, bool)]| serving(0, known, &alive(up), &none);
        assert_eq!(ring(0..3, &[(1, true), (2, true)]), (vec![0, 1, 2], true));
        assert_eq!(ring(0..3, &[(1, true), (2, false)]), (vec![0, 1], true));
        assert_eq!(ring(0..3, &[(1, false), (2, false)]), (vec![0, 1, 2], false));
        // Two of four is no majority; three of five is.
        assert_eq!(ring(0..4, &[(1, true), (2, false), (3, false)]), (vec![0, 1, 2, 3], false));
        assert_eq!(ring(0..5, &[(1, true), (2, true), (3, false), (4, false)]), (vec![0, 1, 2], true));
        // A member never heard of counts as down.
        assert_eq!(ring(0..3, &[(1, true)]), (vec![0, 1], true));
        // Alone in a one-member cluster.
        assert_eq!(ring(0..1, &[]), (vec![0], true));
        // Back up, but not yet readmitted.
        let held: BTreeMap<u32, u64> = [(2, 7)].into_iter().collect();
        assert_eq!(serving(0, 0..3, &alive(&[(1, true), (2, true)]), &held), (vec![0, 1], true));
        // Company that is only held out is no majority.
        let held: BTreeMap<u32, u64> = [(1, 7), (2, 8)].into_iter().collect();
        assert_eq!(serving(0, 0..3, &alive(&[(1, true), (2, true)]), &held), (vec![0, 1, 2], false));
    }
}
