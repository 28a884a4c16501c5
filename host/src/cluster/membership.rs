//! Membership and failure detection: SWIM (with suspicion and
//! infection-style dissemination) from the `foca` crate, kept sans-IO like
//! the rest of the core. Datagrams in and out, timers as deadlines, and
//! up/down events for the replicas' failure-detector input
//! ([`super::replica::Replica::set_alive`]) and for rebuilding the ring.
//!
//! A node's identity carries an incarnation, renewed when it restarts, so a
//! node that comes back is a new member the others learn about rather than
//! a ghost of the old one.

use bytes::Bytes;
use foca::{AccumulatingRuntime, Config, Foca, Identity, NoCustomBroadcast, OwnedNotification, PostcardCodec, Timer};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

/// A member as the gossip sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Peer {
    /// Stable node id (`--node-id`).
    pub node: String,
    /// Where its node-to-node transport listens.
    pub addr: String,
    /// Bumped on every restart.
    pub incarnation: u64,
    /// Where it serves clients (`cachet/1`), so clients can learn every
    /// member's address from any one of them.
    #[serde(default)]
    pub client: String,
}

impl Identity for Peer {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(Self { incarnation: self.incarnation + 1, ..self.clone() })
    }

    /// Members are told apart by where they listen: a joining node knows
    /// its seeds only by address (foca accepts an announcement addressed
    /// to any identity at its address), and a node restarted on the same
    /// address replaces its old self by its higher incarnation.
    fn addr(&self) -> String {
        self.addr.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}

/// A change in who is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A member joined or came back.
    Up(Peer),
    /// A member was declared down.
    Down(Peer),
    /// The others had declared this node down; it rejoined under a renewed
    /// identity (they stopped sending it writes meanwhile).
    Rejoined,
}

/// Failure-detection timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MembershipConfig {
    /// A dead member is declared down within about this long.
    pub detect_within_ms: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self { detect_within_ms: 2_000 }
    }
}

impl MembershipConfig {
    /// SWIM timing that detects a dead member within `detect_within_ms`:
    /// every member is probed within a couple of periods (foca walks a
    /// shuffled member list), a failed probe (round trip plus the indirect
    /// probes) makes it suspect, and suspicion turns to down after 30% of
    /// the budget, leaving room for message delays.
    fn foca(&self) -> Config {
        let budget = self.detect_within_ms.max(400);
        let period = Duration::from_millis(budget / 8);
        let mut config = Config::simple();
        config.probe_period = period;
        config.probe_rtt = period / 3;
        config.num_indirect_probes = NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN);
        config.max_transmissions = NonZeroU8::new(8).unwrap_or(NonZeroU8::MIN);
        config.suspect_to_down_after = Duration::from_millis(budget * 3 / 10);
        config.periodic_gossip = Some(foca::PeriodicParams {
            frequency: period / 2,
            num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
        });
        // A member wrongly declared down (a burst of loss, a partition, a
        // slow start) is told so when it next speaks and rejoins under a
        // renewed identity; members declared down are still announced to
        // now and then, so both sides of a healed partition find each
        // other again. Without these a false "down" is forever.
        config.notify_down_members = true;
        config.periodic_announce_to_down_members =
            Some(foca::PeriodicParams { frequency: period * 4, num_members: NonZeroUsize::MIN });
        config.periodic_announce = Some(foca::PeriodicParams { frequency: period * 4, num_members: NonZeroUsize::MIN });
        config
    }
}

/// Why membership input was refused.
#[derive(Debug, thiserror::Error)]
#[error("membership: {0}")]
pub struct MembershipError(String);

/// One node's view of the cluster.
pub struct Membership {
    foca: Foca<Peer, PostcardCodec, SmallRng, NoCustomBroadcast>,
    runtime: AccumulatingRuntime<Peer>,
    timers: BTreeMap<(u64, u64), Timer<Peer>>,
    seq: u64,
    events: VecDeque<MembershipEvent>,
    /// Who to announce to while this node knows nobody (an announcement
    /// can be lost, and gossip cannot reach a node no one knows).
    seeds: Vec<Peer>,
    next_announce: u64,
    retry_ms: u64,
}

impl Membership {
    /// `me`, alone until it joins someone. `seed` makes the gossip's
    /// random choices replayable.
    pub fn new(me: Peer, config: MembershipConfig, seed: u64) -> Self {
        let foca = Foca::new(me, config.foca(), SmallRng::seed_from_u64(seed), PostcardCodec);
        Self {
            foca,
            runtime: AccumulatingRuntime::new(),
            timers: BTreeMap::new(),
            seq: 0,
            events: VecDeque::new(),
            seeds: Vec::new(),
            next_announce: 0,
            retry_ms: (config.detect_within_ms / 8).max(50),
        }
    }

    /// Who this node is.
    pub fn me(&self) -> &Peer {
        self.foca.identity()
    }

    /// The members currently up (not counting this node).
    pub fn members(&self) -> Vec<Peer> {
        let mut out: Vec<Peer> = self.foca.iter_members().map(|m| m.id().clone()).collect();
        out.sort();
        out
    }

    fn drain(&mut self, now: u64) {
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.seq += 1;
            self.timers.insert((now + after.as_millis() as u64, self.seq), timer);
        }
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::MemberUp(peer) => self.events.push_back(MembershipEvent::Up(peer)),
                OwnedNotification::MemberDown(peer) => self.events.push_back(MembershipEvent::Down(peer)),
                OwnedNotification::Rejoin(_) => self.events.push_back(MembershipEvent::Rejoined),
                _ => {}
            }
        }
    }

    /// Announces this node to `seed` (a member it was told about), again
    /// every probe period for as long as it knows no member.
    pub fn join(&mut self, now: u64, seed: Peer) -> Result<(), MembershipError> {
        self.foca.announce(seed.clone(), &mut self.runtime).map_err(|e| MembershipError(e.to_string()))?;
        self.seeds.push(seed);
        self.next_announce = now + self.retry_ms;
        self.drain(now);
        Ok(())
    }

    /// Leaves the cluster: tells a few members this node is down (they
    /// spread it), so they take it out of their rings at once instead of
    /// after the failure detector's budget. Nothing more is sent or
    /// answered after it; a node that comes back joins under a renewed
    /// identity, as after a crash.
    pub fn leave(&mut self, now: u64) -> Result<(), MembershipError> {
        let result = self.foca.leave_cluster(&mut self.runtime).map_err(|e| MembershipError(e.to_string()));
        self.drain(now);
        result
    }

    /// The member that sent `data`, as the datagram's header names it, and
    /// the members its updates speak of, without handling it: for holding
    /// the sender to the identity its certificate gives it, and checking
    /// what it relays of others, before the gossip is believed.
    pub fn read(data: &[u8]) -> Result<(Peer, Vec<Peer>), MembershipError> {
        use bytes::Buf as _;
        use foca::Codec as _;
        let bad = |e: &dyn std::fmt::Display| MembershipError(e.to_string());
        let mut rest = data;
        let header: foca::Header<Peer> = PostcardCodec.decode_header(&mut rest).map_err(|e| bad(&e))?;
        let mut relayed = Vec::new();
        // The layout foca writes: after the header, unless the message is a
        // custom broadcast, a count of updates and the updates.
        if rest.remaining() >= 2 && header.message != foca::Message::Broadcast {
            let count = rest.get_u16();
            for _ in 0..count {
                let member: foca::Member<Peer> = PostcardCodec.decode_member(&mut rest).map_err(|e| bad(&e))?;
                relayed.push(member.id().clone());
            }
        }
        Ok((header.src, relayed))
    }

    /// A datagram from another member. Garbage is refused, not fatal.
    pub fn handle_data(&mut self, now: u64, data: &[u8]) -> Result<(), MembershipError> {
        let result = self.foca.handle_data(data, &mut self.runtime).map_err(|e| MembershipError(e.to_string()));
        self.drain(now);
        result
    }

    /// Fires every timer due at `now`.
    pub fn tick(&mut self, now: u64) {
        if self.foca.num_members() == 0 && !self.seeds.is_empty() && now >= self.next_announce {
            self.next_announce = now + self.retry_ms;
            for seed in self.seeds.clone() {
                if let Err(err) = self.foca.announce(seed, &mut self.runtime) {
                    tracing::debug!(%err, "membership announce");
                }
            }
            self.drain(now);
        }
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let timer = entry.remove();
            if let Err(err) = self.foca.handle_timer(timer, &mut self.runtime) {
                tracing::debug!(%err, "membership timer");
            }
            self.drain(now);
        }
    }

    /// The next datagram to send, and to whom.
    pub fn poll_transmit(&mut self) -> Option<(Peer, Bytes)> {
        self.runtime.to_send()
    }

    /// The next membership change.
    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    /// When [`Membership::tick`] next has work.
    pub fn poll_timeout(&self) -> Option<u64> {
        let announce = (self.foca.num_members() == 0 && !self.seeds.is_empty()).then_some(self.next_announce);
        self.timers.keys().next().map(|&(at, _)| at).into_iter().chain(announce).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(i: usize, incarnation: u64) -> Peer {
        Peer { node: format!("n{i}"), addr: format!("127.0.0.{}:7071", i + 1), incarnation, client: String::new() }
    }

    /// Three members on a lossy in-memory network.
    struct Net {
        nodes: Vec<Option<Membership>>,
        wire: BTreeMap<(u64, u64), (usize, Bytes)>,
        seq: u64,
        now: u64,
        rng: u64,
        events: Vec<(u64, usize, MembershipEvent)>,
        /// A node cut off from the others: everything to or from it is lost.
        cut: Option<usize>,
    }

    impl Net {
        fn new(seed: u64) -> Self {
            let nodes = (0..3).map(|i| Some(Membership::new(peer(i, 0), MembershipConfig::default(), seed + i as u64)));
            Self {
                nodes: nodes.collect(),
                wire: BTreeMap::new(),
                seq: 0,
                now: 0,
                rng: seed,
                events: Vec::new(),
                cut: None,
            }
        }

        fn random(&mut self) -> u64 {
            self.rng = self.rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            self.rng >> 33
        }

        fn pump(&mut self) {
            for i in 0..self.nodes.len() {
                while let Some(node) = self.nodes[i].as_mut() {
                    let Some((to, data)) = node.poll_transmit() else { break };
                    while let Some(event) = node.poll_event() {
                        self.events.push((self.now, i, event));
                    }
                    let target = to.node.trim_start_matches('n').parse::<usize>().unwrap_or(usize::MAX);
                    if self.random() % 100 < 5 || self.cut.is_some_and(|c| c == i || c == target) {
                        continue; // lost
                    }
                    let at = self.now + 1 + self.random() % 5;
                    self.seq += 1;
                    self.wire.insert((at, self.seq), (target, data));
                }
                if let Some(node) = self.nodes[i].as_mut() {
                    while let Some(event) = node.poll_event() {
                        self.events.push((self.now, i, event));
                    }
                }
            }
        }

        /// Three members that have found each other (node 0 is the seed).
        fn formed(seed: u64) -> Self {
            let mut net = Self::new(seed);
            for i in 1..3 {
                if let Some(node) = net.nodes[i].as_mut() {
                    node.join(0, peer(0, 0)).expect("announce");
                }
            }
            net.pump();
            net.run_until(3_000);
            net
        }

        /// When `observer` first saw n2 down at or after `since`.
        fn n2_down_for(&self, observer: usize, since: u64) -> Option<u64> {
            self.events
                .iter()
                .find(|(at, who, e)| {
                    *at >= since && *who == observer && matches!(e, MembershipEvent::Down(p) if p.node == "n2")
                })
                .map(|(at, _, _)| *at)
        }

        /// Starts n2 again under a new incarnation, joining through node 0,
        /// and runs 3 s; returns when it started.
        fn restart_n2(&mut self, seed: u64) -> u64 {
            let mut back = Membership::new(peer(2, 1), MembershipConfig::default(), seed);
            back.join(self.now, peer(0, 0)).expect("announce");
            self.nodes[2] = Some(back);
            let restarted = self.now;
            self.pump();
            self.run_until(restarted + 3_000);
            restarted
        }

        fn run_until(&mut self, until: u64) {
            while self.now < until {
                self.now += 1;
                while let Some(entry) = self.wire.first_entry() {
                    if entry.key().0 > self.now {
                        break;
                    }
                    let (to, data) = entry.remove();
                    if let Some(Some(node)) = self.nodes.get_mut(to) {
                        let _ = node.handle_data(self.now, &data);
                    }
                }
                for node in self.nodes.iter_mut().flatten() {
                    node.tick(self.now);
                }
                self.pump();
            }
        }
    }

    #[test]
    fn members_find_each_other_and_a_dead_one_is_down_within_two_seconds() {
        let mut slowest = 0;
        for seed in 1..=100u64 {
            let mut net = Net::formed(seed * 1_000);
            for node in net.nodes.iter().flatten() {
                assert_eq!(node.members().len(), 2, "seed {seed}: {:?} sees {:?}", node.me(), node.members());
            }
            // SIGKILL node 2: it stops answering.
            net.nodes[2] = None;
            let killed = net.now;
            net.run_until(killed + 4_000);
            for observer in 0..2 {
                let Some(at) = net.n2_down_for(observer, killed) else {
                    panic!("seed {seed}: node {observer} never saw n2 down")
                };
                assert!(at - killed <= 2_000, "seed {seed}: node {observer} took {} ms", at - killed);
                slowest = slowest.max(at - killed);
            }
            // It restarts with a new incarnation and is up again for both
            // (under a later one if it was wrongly declared down meanwhile
            // and renewed itself).
            let restarted = net.restart_n2(seed + 99);
            for observer in 0..2 {
                let up = net.events.iter().any(|(at, who, e)| {
                    *at >= restarted
                        && *who == observer
                        && matches!(e, MembershipEvent::Up(p) if p.node == "n2" && p.incarnation >= 1)
                });
                if !up {
                    let after: Vec<_> = net.events.iter().filter(|(at, _, _)| *at >= killed).collect();
                    let views: Vec<_> = net.nodes.iter().flatten().map(|n| (n.me().clone(), n.members())).collect();
                    panic!("seed {seed}: node {observer} never saw n2 back: {after:?}; views {views:?}");
                }
            }
        }
        eprintln!("slowest detection over 100 seeds: {slowest} ms");
    }

    /// A member that leaves is down for the others within a gossip round
    /// or two, far inside the failure detector's budget; it comes back
    /// under a renewed identity. With 5% of datagrams lost, both farewells
    /// are lost now and then (0.25% of runs), and detection takes over.
    #[test]
    fn a_member_that_leaves_is_down_at_once_and_can_come_back() {
        let mut slowest = 0;
        let mut prompt = 0;
        for seed in 1..=100u64 {
            let mut net = Net::formed(seed * 4_099);
            let left = net.now;
            net.nodes[2].as_mut().expect("n2").leave(left).expect("leave");
            net.pump();
            // Its process is gone after the farewell.
            net.nodes[2] = None;
            net.run_until(left + 2_000);
            let mut took = 0;
            for observer in 0..2 {
                let Some(at) = net.n2_down_for(observer, left) else {
                    panic!("seed {seed}: node {observer} never saw n2 leave")
                };
                assert!(at - left <= 2_000, "seed {seed}: node {observer} took {} ms", at - left);
                took = took.max(at - left);
            }
            slowest = slowest.max(took);
            if took <= 100 {
                prompt += 1;
            }
            net.restart_n2(seed + 99);
            for node in net.nodes.iter().flatten() {
                assert_eq!(node.members().len(), 2, "seed {seed}: {:?} sees {:?}", node.me(), node.members());
            }
        }
        eprintln!("departure seen by both within 100 ms in {prompt} of 100 seeds; slowest {slowest} ms");
        // Detection alone takes several hundred milliseconds at the least.
        assert!(prompt >= 95, "only {prompt} of 100 departures were seen at once");
    }

    /// A partition long enough for both sides to declare each other down:
    /// the cut-off member finds itself alone, renews its identity and
    /// rejoins once the partition heals (the others would ignore its old,
    /// down identity for good).
    #[test]
    fn a_member_cut_off_until_declared_down_rejoins_when_the_partition_heals() {
        for seed in 1..=50u64 {
            let mut net = Net::formed(seed * 7_919);
            net.cut = Some(2);
            let cut = net.now;
            net.run_until(cut + 4_000);
            assert!(
                net.n2_down_for(0, cut).is_some() && net.n2_down_for(1, cut).is_some(),
                "seed {seed}: n2 was not declared down during the partition"
            );
            assert!(net.nodes[2].as_ref().is_some_and(|n| n.members().is_empty()), "seed {seed}: n2 not alone");
            net.cut = None;
            let healed = net.now;
            net.run_until(healed + 4_000);
            for observer in 0..2 {
                let back = net.events.iter().any(|(at, who, e)| {
                    *at >= healed
                        && *who == observer
                        && matches!(e, MembershipEvent::Up(p) if p.node == "n2" && p.incarnation >= 1)
                });
                assert!(back, "seed {seed}: node {observer} never saw n2 rejoin");
            }
            for node in net.nodes.iter().flatten() {
                let after: Vec<_> = net.events.iter().filter(|(at, _, _)| *at >= healed).collect();
                assert_eq!(
                    node.members().len(),
                    2,
                    "seed {seed}: {:?} sees {:?}; {after:?}",
                    node.me(),
                    node.members()
                );
            }
        }
    }

    /// A datagram's header names its sender, which the runtime holds to
    /// the node its certificate names before the gossip is believed; its
    /// updates name the members it relays news of, which the runtime
    /// checks too.
    #[test]
    fn a_datagrams_sender_and_relayed_members_are_read() {
        let mut node = Membership::new(peer(1, 4), MembershipConfig::default(), 1);
        node.join(0, peer(0, 0)).expect("announce");
        let (to, data) = node.poll_transmit().expect("an announcement");
        assert_eq!(to, peer(0, 0));
        assert_eq!(Membership::read(&data).expect("a header"), (peer(1, 4), Vec::new()));
        assert!(Membership::read(b"\xff\x00garbage").is_err());
        // Member 0 knows member 2; its answer to member 1's announcement
        // relays news of it.
        let mut seed = Membership::new(peer(0, 0), MembershipConfig::default(), 2);
        let mut other = Membership::new(peer(2, 0), MembershipConfig::default(), 3);
        other.join(0, peer(0, 0)).expect("announce");
        let (_, hello) = other.poll_transmit().expect("an announcement");
        seed.handle_data(0, &hello).expect("accepted");
        while seed.poll_transmit().is_some() {}
        seed.handle_data(0, &data).expect("accepted");
        let (to, feed) = seed.poll_transmit().expect("an answer");
        assert_eq!(to, peer(1, 4));
        let (sender, relayed) = Membership::read(&feed).expect("readable");
        assert_eq!(sender, peer(0, 0));
        assert!(relayed.contains(&peer(2, 0)), "{relayed:?}");
    }

    #[test]
    fn garbage_datagrams_are_refused() {
        let mut node = Membership::new(peer(0, 0), MembershipConfig::default(), 1);
        assert!(node.handle_data(0, b"\xff\x00garbage").is_err());
        assert!(node.members().is_empty());
    }
}
