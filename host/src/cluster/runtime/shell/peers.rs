//! What the peers send: gossip, taken only from the member its
//! certificate names and refused when its incarnations run ahead of the
//! clock; replica messages, with their sender's table epoch; and the
//! member events the gossip yields.

use super::Shell;
use crate::cluster::membership::{Membership, Peer};
use crate::cluster::meta::MetaError;
use crate::cluster::meta::member::MetaFrame;
use crate::cluster::replica::{self, NodeIx};
use crate::cluster::runtime::unix_ms;
use crate::cluster::transport::{Incoming, PeerFrame};
use std::net::SocketAddr;

/// The first identity in a gossip datagram (its sender, then the members
/// it relays news of) whose incarnation is over `ceiling`: incarnations
/// start at the wall clock and grow by one per renewal, so one far ahead of
/// it is forged (and would leave its member no higher one to refute it).
fn forged_incarnation<'a>(sender: &'a Peer, relayed: &'a [Peer], ceiling: u64) -> Option<&'a Peer> {
    std::iter::once(sender).chain(relayed).find(|p| p.incarnation > ceiling)
}

/// Whether news that a member is up at `addr` is believed: it is where
/// this node knows the member (`known`), or where the member itself last
/// spoke from (`verified`). Otherwise it is news relayed by others of a
/// joiner or a move, which waits until the member speaks from there.
fn up_believed(known: Option<&SocketAddr>, verified: Option<&SocketAddr>, addr: &SocketAddr) -> bool {
    known == Some(addr) || verified == Some(addr)
}

impl Shell {
    /// Drops a frame whose sender claims to be another member than its
    /// certificate names (`claimed` says whom): counted in the stats, and
    /// logged at most once a second, naming both.
    fn refuse_impostor(&mut self, now: u64, from: SocketAddr, certified: u32, claimed: &str) {
        self.impostor_frames += 1;
        if let Some(suppressed) = self.impostor_log.check(now) {
            tracing::error!(
                %from,
                certified,
                suppressed,
                total = self.impostor_frames,
                "peer frame dropped: the sender's certificate names node {certified} but it claims to be {claimed}"
            );
        }
    }

    /// A member up or down, as the gossip tells. A member up at an address
    /// this node does not know it at (a joiner, or one that moved) is taken
    /// in only once it has spoken from there itself: news relayed by a
    /// member holding a valid certificate could otherwise point another
    /// member's traffic at an address that cannot serve it.
    pub(super) fn member_event(&mut self, now: u64, peer: Peer, up: bool) {
        let (Ok(ix), Ok(addr)) = (peer.node.parse::<NodeIx>(), peer.addr.parse::<SocketAddr>()) else { return };
        if ix > replica::MAX_NODE_ID {
            tracing::warn!(node = ix, "a member with an id over the limit; ignored");
            return;
        }
        if ix == self.me {
            return;
        }
        // The last news of an address the member has left (it restarted
        // elsewhere) says nothing about the member.
        if !up && self.peers.get(&ix).is_some_and(|known| *known != addr) {
            self.unconfirmed.remove(&ix);
            return;
        }
        if up && !up_believed(self.peers.get(&ix), self.verified.get(&ix), &addr) {
            tracing::debug!(node = ix, %addr, "member relayed up at a new address; waiting to hear from it there");
            self.unconfirmed.insert(ix, peer);
            return;
        }
        self.unconfirmed.remove(&ix);
        if up {
            tracing::info!(node = ix, "member up");
            self.heard.insert(ix);
            self.learn(now, ix, addr);
            if !peer.client.is_empty() {
                self.clients.insert(ix, peer.client.clone());
            }
        } else {
            tracing::warn!(node = ix, "member down");
        }
        self.alive.insert(ix, up);
        if let Some(replica) = self.replica.as_mut() {
            replica.set_alive(now, ix, up);
        }
        if let Some(meta) = self.meta.as_mut() {
            meta.verdict(ix, up);
        }
    }

    /// `node` spoke from `addr` itself: news of it there held back
    /// ([`Shell::member_event`]) is taken in now.
    fn confirm(&mut self, now: u64, node: NodeIx, addr: SocketAddr) {
        if self.unconfirmed.get(&node).is_some_and(|p| p.addr.parse::<SocketAddr>().ok() == Some(addr))
            && let Some(peer) = self.unconfirmed.remove(&node)
        {
            self.member_event(now, peer, true);
        }
    }

    pub(super) fn handle(&mut self, frame: Incoming) {
        let now = self.now();
        match frame.frame {
            // The certificate names the sender; the metadata log holds each
            // message against it.
            PeerFrame::Meta(module @ (MetaFrame::ModuleWant { .. } | MetaFrame::Module { .. })) => {
                self.module_frame(frame.from, module);
            }
            PeerFrame::Meta(meta_frame) => {
                let Some(meta) = self.meta.as_mut() else { return };
                match meta.handle(now, frame.node, frame.from, meta_frame) {
                    Ok(()) => {}
                    Err(err @ MetaError::Impostor { .. }) => {
                        self.refuse_impostor(now, frame.from, frame.node, &err.to_string())
                    }
                    Err(err) => tracing::debug!(%err, from = %frame.from, "metadata frame refused"),
                }
            }
            // Gossip is how a joiner is first heard of: taken from any
            // member of the cluster's CA, as long as the datagram's sender
            // is the node its certificate names, speaking from the address
            // it gives (what the gossip says of others is relayed news).
            PeerFrame::Gossip(data) => {
                let (sender, relayed) = match Membership::read(&data) {
                    Ok(read) => read,
                    Err(err) => {
                        tracing::debug!(%err, from = %frame.from, "gossip refused");
                        return;
                    }
                };
                let claimed = sender.node.parse::<NodeIx>().ok();
                if claimed != Some(frame.node) || sender.addr.parse::<SocketAddr>().ok() != Some(frame.from) {
                    let claim = format!("node {} at {}", sender.node, sender.addr);
                    self.refuse_impostor(now, frame.from, frame.node, &claim);
                    return;
                }
                // Incarnations start at the wall clock and grow by one per
                // renewal: one far ahead of it is forged, and believing it
                // would leave the member no higher one to refute it with.
                let ceiling = unix_ms().saturating_add(crate::cluster::version::MAX_LEAD_MS);
                if let Some(forged) = forged_incarnation(&sender, &relayed, ceiling) {
                    // Counted with the frames of impostors: a forged
                    // identity either way.
                    self.impostor_frames += 1;
                    if let Some(suppressed) = self.impostor_log.check(now) {
                        tracing::error!(
                            from = %frame.from,
                            node = %forged.node,
                            incarnation = forged.incarnation,
                            suppressed,
                            "gossip dropped: an incarnation far ahead of this node's clock"
                        );
                    }
                    return;
                }
                self.verified.insert(frame.node, frame.from);
                if let Err(err) = self.membership.handle_data(now, &data) {
                    tracing::debug!(%err, from = %frame.from, "gossip refused");
                }
                self.confirm(now, frame.node, frame.from);
            }
            PeerFrame::Replica { epoch, message } => {
                let Some(&from) = self.by_addr.get(&frame.from) else {
                    tracing::debug!(from = %frame.from, "a replica message from an address that is no member yet");
                    return;
                };
                // The address is the member's claim: the certificate must
                // name that member.
                if from != frame.node {
                    self.refuse_impostor(now, frame.from, frame.node, &format!("node {from}"));
                    return;
                }
                let Some(replica) = self.replica.as_mut() else { return };
                if let Err(err) = replica.handle(now, from, epoch, message) {
                    self.refused += 1;
                    let (last, suppressed) = &mut self.refused_log;
                    if last.is_some_and(|t| now < t + 1_000) {
                        *suppressed += 1;
                    } else {
                        *last = Some(now);
                        let suppressed = std::mem::take(suppressed);
                        tracing::warn!(node = from, %err, suppressed, total = self.refused, "peer message refused");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{forged_incarnation, up_believed};
    use crate::cluster::membership::Peer;
    use std::net::SocketAddr;

    /// Relayed news of a member at an address it has not spoken from is
    /// not believed; an incarnation far ahead of the clock is forged.
    #[test]
    fn relayed_news_is_believed_only_when_the_member_confirms_it() {
        let at = |port: u16| -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], port)) };
        assert!(up_believed(Some(&at(1)), None, &at(1)), "where it is known");
        assert!(!up_believed(Some(&at(1)), None, &at(9)), "moved, by hearsay");
        assert!(!up_believed(None, None, &at(9)), "a joiner, by hearsay");
        assert!(!up_believed(None, Some(&at(8)), &at(9)), "it spoke from elsewhere");
        assert!(up_believed(Some(&at(1)), Some(&at(9)), &at(9)), "it spoke from there itself");
        let peer = |node: &str, incarnation: u64| Peer {
            node: node.into(),
            addr: "127.0.0.1:1".into(),
            incarnation,
            client: String::new(),
        };
        let now = 1_700_000_000_000;
        assert_eq!(forged_incarnation(&peer("0", now), &[peer("1", now - 5)], now + 60_000), None);
        let relayed = [peer("1", now), peer("2", u64::MAX - 1)];
        assert_eq!(forged_incarnation(&peer("0", now), &relayed, now + 60_000), Some(&relayed[1]));
        assert_eq!(forged_incarnation(&peer("0", now + 61_000), &[], now + 60_000).map(|p| p.node.as_str()), Some("0"));
    }
}
