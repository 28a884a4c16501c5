//! Policies across a cluster: how a member follows the metadata log's
//! policy entries, and what it needs from the node's policy control plane
//! to do so.
//!
//! The log records which modules are stored (by content hash), which one
//! is active (or in a canary, on which members) and which one is in
//! shadow. Each member keeps a [`PolicyFollower`], a sans-IO state
//! machine: given the log's state and which modules the node holds, it
//! says which modules to fetch from which members and when to make the
//! node run the log's target; the shell does that through
//! [`PolicyHost`], on a blocking thread (a swap locks every shard in turn;
//! installing a fetched module compiles it), and reports back. Every
//! module the log stores is fetched, not only the active one, so `cachet
//! policy load` through one member stores the module on every member and
//! a later `activate` waits for no transfer. A member lacking a module's
//! bytes asks the member that stored it and one other serving member in
//! turn, checks the hash against the log's, and installs them through the
//! same validation as `cachet policy load`.
//!
//! A starting member serves only once its [`StartGate`] opens: a no-op it
//! proposed has applied (so it has every entry committed before it
//! started) and it runs the log's policy. The simulator in `meta::sim`
//! drives the same two state machines under faults and checks that every
//! serving member runs the log's module.

use super::meta::entry::{ActivePolicy, MemberState, StoredModule};
use super::meta::state::MetaState;
use super::replica::NodeIx;
use std::collections::{BTreeMap, BTreeSet};

/// A module's bytes are asked for again after this long without them.
pub const ASK_AGAIN_MS: u64 = 1_000;

/// How long a starting member waits to run the log's active policy before
/// it serves anyway (the module's bytes may be nowhere it can reach; a
/// cache without its policy beats a member that never serves).
pub const POLICY_WAIT_MS: u64 = 10_000;

/// The node's side: its registry and its shards.
pub trait PolicyHost: Send + Sync {
    /// Whether the registry holds the component with this hash.
    fn has_module(&self, sha256: &str) -> bool;
    /// The component's bytes, to send a member that lacks them.
    fn module_bytes(&self, sha256: &str) -> Option<Vec<u8>>;
    /// Stores a fetched component (validated and checked for conformance,
    /// as `cachet policy load` does).
    fn install(&self, module: &StoredModule, bytes: &[u8]) -> Result<String, String>;
    /// Makes the node run `active` (when the log names one) and shadow
    /// `shadow`, changing only what differs; says what it did.
    fn apply(&self, active: Option<&ActivePolicy>, shadow: Option<&str>) -> Result<String, String>;
    /// Cache hits and misses so far (the leader judges canaries by them).
    fn hit_counts(&self) -> (u64, u64);
}

/// What the log asks a member to run: its active policy (the canary's on
/// a canary member) and the module in shadow.
pub type Target = (Option<ActivePolicy>, Option<String>);

/// What a [`PolicyFollower`] asks its shell to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyStep {
    /// Ask these members for a module's bytes; hand what arrives to
    /// [`PolicyFollower::offered`].
    Want {
        /// The module's hash.
        sha256: String,
        /// Whom to ask.
        from: Vec<NodeIx>,
    },
    /// Make the node run `target`, the log's as of `index`; report the
    /// result with [`PolicyFollower::applied`].
    Apply {
        /// What to run.
        target: Target,
        /// The log index it is the target of.
        index: u64,
    },
}

/// One member's progress towards the log's policy.
#[derive(Debug, Default)]
pub struct PolicyFollower {
    /// The target last applied (or given up on: a failure is logged and
    /// shown, not retried until the log changes).
    applied: Option<Target>,
    /// An apply runs.
    busy: bool,
    /// Modules asked for, by hash: when to ask again.
    wanted: BTreeMap<String, u64>,
    /// Modules being installed.
    installing: BTreeSet<String>,
    /// Modules whose install failed here: not fetched again while no
    /// target needs them (each install compiles the module).
    refused: BTreeSet<String>,
    /// The hashes the target needs, as of the last look.
    target_shas: BTreeSet<String>,
    /// The last failure.
    last_error: Option<String>,
    /// The log index up to which the member runs the log's policy.
    runs_through: u64,
    /// The last look at which modules the node lacks: not taken again
    /// until the log moves, an install ends, or it is due (a member that
    /// holds every module looks again only when the log moves).
    scan: Option<Scan>,
}

/// What [`PolicyFollower`] saw when it last looked at the modules.
#[derive(Clone, Copy, Debug)]
struct Scan {
    /// The log index it looked at.
    index: u64,
    /// When to look again.
    due: u64,
    /// Whether the target's modules were missing.
    target_missing: bool,
}

impl PolicyFollower {
    /// Brings the member towards the log's policy: asks for the modules it
    /// lacks (every stored one, the target's first), and once the target's
    /// are here, asks for the target to be applied (one apply at a time).
    pub fn reconcile(
        &mut self,
        me: NodeIx,
        now: u64,
        state: &MetaState,
        has_module: &dyn Fn(&str) -> bool,
    ) -> Vec<PolicyStep> {
        let mut steps = Vec::new();
        let target: Target = (state.policy_for(me).cloned(), state.shadow.clone());
        let scan = match self.scan {
            Some(scan) if scan.index == state.applied && now < scan.due => scan,
            _ => {
                let missing = self.fetch(me, now, state, &target, has_module, &mut steps);
                let due = if missing.is_some() { now + ASK_AGAIN_MS } else { u64::MAX };
                let scan = Scan { index: state.applied, due, target_missing: missing == Some(true) };
                self.scan = Some(scan);
                scan
            }
        };
        if scan.target_missing {
            return steps;
        }
        if self.busy {
            return steps;
        }
        if self.applied.as_ref() == Some(&target) {
            // Runs it (unless applying it failed: then a waiting admin
            // command times out and says so).
            if self.last_error.is_none() {
                self.runs_through = self.runs_through.max(state.applied);
            }
            return steps;
        }
        self.busy = true;
        steps.push(PolicyStep::Apply { target, index: state.applied });
        steps
    }

    /// Asks for the modules the node lacks: `None` if it lacks none,
    /// `Some(true)` if the target needs one of them.
    fn fetch(
        &mut self,
        me: NodeIx,
        now: u64,
        state: &MetaState,
        target: &Target,
        has_module: &dyn Fn(&str) -> bool,
        steps: &mut Vec<PolicyStep>,
    ) -> Option<bool> {
        // The target's modules first, with who stored them; then every
        // other module the log stores and has not quarantined.
        let mut needed: Vec<(String, NodeIx, bool)> = Vec::new();
        if let Some(sha) = target.0.as_ref().and_then(|a| a.sha256.clone()) {
            let origin = state.modules.values().find(|m| m.module.sha256 == sha).map_or(me, |m| m.origin);
            needed.push((sha, origin, true));
        }
        if let Some(m) = target.1.as_ref().and_then(|l| state.modules.get(l)) {
            needed.push((m.module.sha256.clone(), m.origin, true));
        }
        let first: BTreeSet<String> = needed.iter().map(|(sha, ..)| sha.clone()).collect();
        for (label, m) in &state.modules {
            let sha = &m.module.sha256;
            if !state.quarantined.contains_key(label) && !first.contains(sha) && !self.refused.contains(sha) {
                needed.push((sha.clone(), m.origin, false));
            }
        }
        self.target_shas = first;
        let mut missing = None;
        for (sha, origin, for_target) in needed {
            if has_module(&sha) {
                self.wanted.remove(&sha);
                continue;
            }
            missing = Some(missing == Some(true) || for_target);
            if self.installing.contains(&sha) {
                continue;
            }
            if let Some(from) = ask(&mut self.wanted, me, now, state, &sha, origin) {
                steps.push(PolicyStep::Want { sha256: sha, from });
            }
        }
        missing
    }

    /// An apply finished.
    pub fn applied(&mut self, target: Target, index: u64, result: &Result<String, String>) {
        self.busy = false;
        match result {
            Ok(_) => {
                self.runs_through = self.runs_through.max(index);
                self.last_error = None;
            }
            Err(err) => self.last_error = Some(err.clone()),
        }
        self.applied = Some(target);
    }

    /// A module's bytes arrived (their hash already checked against
    /// `sha256`): the log's record to install them as, if this member
    /// asked for them and is not installing them already.
    pub fn offered(&mut self, state: &MetaState, sha256: &str) -> Option<StoredModule> {
        if !self.wanted.contains_key(sha256) || self.installing.contains(sha256) {
            return None;
        }
        let record = state.modules.values().find(|m| m.module.sha256 == sha256)?;
        self.installing.insert(sha256.to_string());
        Some(record.module.clone())
    }

    /// An install finished.
    pub fn installed(&mut self, sha256: &str, result: &Result<String, String>) {
        self.installing.remove(sha256);
        self.scan = None;
        if let Err(err) = result {
            // Only a module the member is to run holds its policy back; a
            // stored one it fails to install is not asked for again until
            // a target needs it.
            self.refused.insert(sha256.to_string());
            if self.target_shas.contains(sha256) {
                self.last_error = Some(err.clone());
            }
        }
    }

    /// Whether a member asking for `sha256` gets it: only modules the log
    /// stores are handed out.
    pub fn shares(state: &MetaState, sha256: &str) -> bool {
        state.modules.values().any(|m| m.module.sha256 == sha256)
    }

    /// Whether this member runs the policy the log asks of it (or the log
    /// asks none).
    pub fn ready(&self, me: NodeIx, state: &MetaState) -> bool {
        let wanted = state.policy_for(me);
        match &self.applied {
            // Nothing applied since it started: it runs the policy it was
            // started with.
            None => wanted.is_none(),
            // A member that ran a canary (or a module since quarantined)
            // and is to return to its own policy is not ready until it has
            // (simulator seed 1357).
            Some((active, _)) => self.last_error.is_none() && active.as_ref() == wanted,
        }
    }

    /// The log index up to which this member runs the log's policy.
    pub fn runs_through(&self) -> u64 {
        self.runs_through
    }

    /// The last failure to fetch, install or apply, if the log has not
    /// changed since.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

/// Whom to ask for the bytes of `sha` now, if they are due to be asked
/// for (never asked, or asked [`ASK_AGAIN_MS`] ago): the member that
/// stored them, and one other serving member in turn (the one that stored
/// them may be down). Notes the ask in `wanted`.
pub(crate) fn ask(
    wanted: &mut BTreeMap<String, u64>,
    me: NodeIx,
    now: u64,
    state: &MetaState,
    sha: &str,
    origin: NodeIx,
) -> Option<Vec<NodeIx>> {
    if wanted.get(sha).is_some_and(|at| now < *at) {
        return None;
    }
    wanted.insert(sha.to_string(), now + ASK_AGAIN_MS);
    let serving: Vec<NodeIx> =
        state.members.values().filter(|m| m.state == MemberState::Serving && m.node != me).map(|m| m.node).collect();
    let other = serving.get((now / ASK_AGAIN_MS) as usize % serving.len().max(1)).copied();
    let from: BTreeSet<NodeIx> = [Some(origin), other].into_iter().flatten().filter(|n| *n != me).collect();
    (!from.is_empty()).then(|| from.into_iter().collect())
}

/// Where a starting member's barrier stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Barrier {
    /// Not proposed yet, or its proposal failed.
    #[default]
    Due,
    /// Proposed with this nonce.
    Proposed(u64),
    /// Applied here.
    Passed,
}

/// What a [`StartGate`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Propose a no-op and report its nonce with [`StartGate::proposed`].
    Propose,
    /// Not yet.
    Wait,
    /// Serve: caught up with the log, and running its policy.
    Serve,
    /// Serve without the log's policy: it could not be installed within
    /// [`POLICY_WAIT_MS`].
    ServeWithoutPolicy,
}

/// When a starting member may serve: once a no-op it proposed has applied
/// here (so has every entry committed before it started: an `activate`
/// made while it was down, a table change) and it runs the log's policy,
/// or [`POLICY_WAIT_MS`] after it caught up if the policy cannot be
/// installed.
#[derive(Debug, Default)]
pub struct StartGate {
    barrier: Barrier,
    serve_by: Option<u64>,
}

impl StartGate {
    /// Whether the member may serve now, given whether it runs the log's
    /// policy.
    pub fn poll(&mut self, now: u64, policy_ready: bool) -> Gate {
        match self.barrier {
            Barrier::Due => return Gate::Propose,
            Barrier::Proposed(_) => return Gate::Wait,
            Barrier::Passed => {}
        }
        if policy_ready {
            return Gate::Serve;
        }
        if now < *self.serve_by.get_or_insert(now + POLICY_WAIT_MS) { Gate::Wait } else { Gate::ServeWithoutPolicy }
    }

    /// The barrier's no-op was proposed.
    pub fn proposed(&mut self, nonce: u64) {
        self.barrier = Barrier::Proposed(nonce);
    }

    /// A proposal of this member's was decided: whether it was the
    /// barrier's (applied, or to be proposed again).
    pub fn decided(&mut self, nonce: u64, applied: bool) -> bool {
        if self.barrier != Barrier::Proposed(nonce) {
            return false;
        }
        self.barrier = if applied { Barrier::Passed } else { Barrier::Due };
        true
    }

    /// Whether the barrier has passed.
    pub fn caught_up(&self) -> bool {
        self.barrier == Barrier::Passed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::meta::entry::{MetaEntry, Proposal};
    use crate::cluster::meta::state::testing::{founded, stored};

    fn state_with(entries: Vec<MetaEntry>) -> MetaState {
        let mut state = founded();
        for (i, entry) in entries.into_iter().enumerate() {
            state.apply(2 + i as u64, Some(&Proposal { proposer: 0, nonce: 10 + i as u64, entry }));
        }
        state
    }

    #[test]
    fn every_stored_module_is_fetched_and_one_refused_here_holds_nothing_back() {
        let activate = MetaEntry::Activate { label: "a@1".into(), config: None, bundled: false };
        let state = state_with(vec![stored("a@1", "aa"), stored("b@1", "bb"), activate]);
        let mut follower = PolicyFollower::default();
        let held = std::cell::RefCell::new(BTreeSet::<String>::new());
        let has = |sha: &str| held.borrow().contains(sha);
        let steps = follower.reconcile(1, 0, &state, &has);
        let wanted: Vec<&str> = steps
            .iter()
            .filter_map(|s| match s {
                PolicyStep::Want { sha256, .. } => Some(sha256.as_str()),
                PolicyStep::Apply { .. } => None,
            })
            .collect();
        assert_eq!(wanted, ["aa", "bb"], "the target's first, then every other stored module");
        // The other module is refused here; the target's arrives.
        assert!(follower.offered(&state, "bb").is_some());
        follower.installed("bb", &Err("refused by this build".into()));
        assert!(follower.offered(&state, "aa").is_some());
        held.borrow_mut().insert("aa".into());
        follower.installed("aa", &Ok(String::new()));
        let steps = follower.reconcile(1, 10, &state, &has);
        let Some(PolicyStep::Apply { target, index }) =
            steps.into_iter().find(|s| matches!(s, PolicyStep::Apply { .. }))
        else {
            panic!("the target's module is here: apply it")
        };
        follower.applied(target, index, &Ok(String::new()));
        assert!(follower.ready(1, &state), "a refused module the member does not run holds nothing back");
        assert!(follower.last_error().is_none());
        let later = follower.reconcile(1, 10 + 5 * ASK_AGAIN_MS, &state, &has);
        assert!(later.is_empty(), "the refused module is not asked for again: {later:?}");
    }

    #[test]
    fn the_gate_waits_for_its_barrier_then_for_the_policy_then_gives_up() {
        let mut gate = StartGate::default();
        assert_eq!(gate.poll(0, true), Gate::Propose);
        gate.proposed(7);
        assert_eq!(gate.poll(1, true), Gate::Wait);
        assert!(!gate.decided(8, true), "another proposal's fate");
        assert!(gate.decided(7, false));
        assert_eq!(gate.poll(2, true), Gate::Propose, "a failed barrier is proposed again");
        gate.proposed(9);
        assert!(gate.decided(9, true));
        assert_eq!(gate.poll(10, false), Gate::Wait);
        assert_eq!(gate.poll(10 + POLICY_WAIT_MS - 1, false), Gate::Wait);
        assert_eq!(gate.poll(10 + POLICY_WAIT_MS, false), Gate::ServeWithoutPolicy);
        assert_eq!(gate.poll(10 + POLICY_WAIT_MS, true), Gate::Serve);
    }
}
