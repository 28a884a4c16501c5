//! Read-through loaders across a cluster: the loader configuration is a
//! cluster-wide setting in the metadata log ([`MetaEntry::SetLoaders`]),
//! and every member builds its loaders from the log's, not from a file of
//! its own, so a key's primary loads it the same way whichever member that
//! is, and one `cachet cluster loaders FILE` through any member changes
//! them all.
//!
//! The log holds the configuration's text with each module named by hash;
//! the modules' bytes travel beside the log as policy modules' do (asked
//! for from the member that set the configuration, or another serving
//! member, and checked against the hash), and each member keeps them in
//! its data directory. A [`LoaderFollower`], sans-IO like the policy
//! follower, says which modules to fetch and when to build the loaders;
//! the shell does the work through [`LoaderHost`] and reports back. A
//! member serves only once it runs the log's loaders (the start gate asks
//! [`LoaderFollower::ready`]), or after the gate's wait if they cannot be
//! built.
//!
//! [`MetaEntry::SetLoaders`]: super::meta::entry::MetaEntry::SetLoaders

use super::meta::entry::LoaderSetting;
use super::meta::state::MetaState;
use super::policy::ask;
use super::replica::NodeIx;
use std::collections::{BTreeMap, BTreeSet};

/// The first wait before a configuration that failed to build is tried
/// again.
pub const RETRY_MIN_MS: u64 = 2_000;
/// The longest wait between tries.
pub const RETRY_MAX_MS: u64 = 60_000;

/// The node's side: builds loaders from a configuration and puts them in
/// place of the ones it runs.
pub trait LoaderHost: Send + Sync {
    /// Builds loaders from `setting` (its modules' bytes from `module`, by
    /// hash) and makes the node run them, or drops the node's loaders for
    /// `None`; says what it did.
    fn apply_loaders(
        &self,
        setting: Option<&LoaderSetting>,
        module: &dyn Fn(&str) -> Option<std::sync::Arc<Vec<u8>>>,
    ) -> Result<String, String>;
}

/// What a [`LoaderFollower`] asks its shell to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoaderStep {
    /// Ask these members for a module's bytes; hand what arrives to
    /// [`LoaderFollower::offered`].
    Want {
        /// The module's hash.
        sha256: String,
        /// Whom to ask.
        from: Vec<NodeIx>,
    },
    /// Build the loaders of `setting` (the log's as of `index`) and run
    /// them; report with [`LoaderFollower::applied`].
    Apply {
        /// The configuration, or none.
        setting: Option<LoaderSetting>,
        /// The log index it is the configuration of.
        index: u64,
    },
}

/// One member's progress towards the log's loader configuration.
#[derive(Debug, Default)]
pub struct LoaderFollower {
    /// What the node runs: `None` until the first apply (a member starts
    /// without loaders), then the configuration last applied.
    runs: Option<Option<LoaderSetting>>,
    /// The configuration last tried, whatever came of it.
    tried: Option<Option<LoaderSetting>>,
    /// After a failure, when to try the same configuration again (the
    /// failure may pass: the node not ready yet, a disk that refused a
    /// write); the wait doubles up to [`RETRY_MAX_MS`].
    retry_at: u64,
    /// The next wait after a failure.
    backoff: u64,
    /// An apply runs.
    busy: bool,
    /// Modules asked for, by hash: when to ask again.
    wanted: BTreeMap<String, u64>,
    /// Modules being stored.
    storing: BTreeSet<String>,
    /// The last failure.
    last_error: Option<String>,
}

impl LoaderFollower {
    /// Brings the member towards the log's loader configuration: asks for
    /// the modules it lacks, and once they are all here asks for the
    /// loaders to be built (one apply at a time).
    pub fn reconcile(
        &mut self,
        me: NodeIx,
        now: u64,
        state: &MetaState,
        has_module: &dyn Fn(&str) -> bool,
    ) -> Vec<LoaderStep> {
        let target = state.loaders.as_ref().map(|r| r.setting.clone());
        let settled = self.tried.as_ref() == Some(&target) && (self.last_error.is_none() || now < self.retry_at);
        if self.busy || settled || (self.runs.is_none() && target.is_none()) {
            return Vec::new();
        }
        let mut steps = Vec::new();
        if let Some(record) = &state.loaders {
            for (sha, _) in &record.setting.modules {
                if has_module(sha) {
                    self.wanted.remove(sha);
                    continue;
                }
                if !self.storing.contains(sha)
                    && let Some(from) = ask(&mut self.wanted, me, now, state, sha, record.origin)
                {
                    steps.push(LoaderStep::Want { sha256: sha.clone(), from });
                }
            }
        }
        if steps.is_empty() && target.iter().flat_map(|s| &s.modules).all(|(sha, _)| has_module(sha)) {
            self.busy = true;
            steps.push(LoaderStep::Apply { setting: target, index: state.applied });
        }
        steps
    }

    /// An apply finished at `now`.
    pub fn applied(&mut self, now: u64, setting: Option<LoaderSetting>, result: &Result<String, String>) {
        self.busy = false;
        match result {
            Ok(_) => {
                self.runs = Some(setting.clone());
                self.last_error = None;
                self.backoff = 0;
            }
            Err(err) => {
                self.last_error = Some(err.clone());
                self.backoff = (self.backoff * 2).clamp(RETRY_MIN_MS, RETRY_MAX_MS);
                self.retry_at = now + self.backoff;
            }
        }
        self.tried = Some(setting);
    }

    /// A module's bytes arrived (their hash already checked): whether to
    /// store them (this member asked for them and is not storing them).
    pub fn offered(&mut self, state: &MetaState, sha256: &str) -> bool {
        if !self.wanted.contains_key(sha256) || self.storing.contains(sha256) || !Self::shares(state, sha256) {
            return false;
        }
        self.storing.insert(sha256.to_string());
        true
    }

    /// Storing a module finished.
    pub fn stored(&mut self, sha256: &str, result: &Result<(), String>) {
        self.storing.remove(sha256);
        if let Err(err) = result {
            self.last_error = Some(format!("cannot keep loader module {sha256}: {err}"));
        }
    }

    /// Whether a member asking for `sha256` gets it: only the modules of
    /// the log's configuration are handed out.
    pub fn shares(state: &MetaState, sha256: &str) -> bool {
        state.loaders.as_ref().is_some_and(|r| r.setting.modules.iter().any(|(sha, _)| sha == sha256))
    }

    /// Whether this member runs the log's loader configuration.
    pub fn ready(&self, state: &MetaState) -> bool {
        let target = state.loaders.as_ref().map(|r| &r.setting);
        match &self.runs {
            None => target.is_none(),
            Some(runs) => runs.as_ref() == target,
        }
    }

    /// The last failure to fetch, keep or build, if any since the last
    /// success.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::meta::entry::{MetaEntry, Proposal};
    use crate::cluster::meta::state::testing::founded;
    use std::cell::RefCell;

    fn set(state: &mut MetaState, index: u64, setting: Option<LoaderSetting>) {
        let entry = MetaEntry::SetLoaders { setting, if_none: false };
        state.apply(index, Some(&Proposal { proposer: 2, nonce: 100 + index, entry }));
    }

    fn setting(config: &str, shas: &[&str]) -> LoaderSetting {
        LoaderSetting { config: config.into(), modules: shas.iter().map(|s| (s.repeat(32), 1)).collect() }
    }

    fn wants(steps: &[LoaderStep]) -> Vec<(String, Vec<NodeIx>)> {
        steps
            .iter()
            .filter_map(|s| match s {
                LoaderStep::Want { sha256, from } => Some((sha256.clone(), from.clone())),
                LoaderStep::Apply { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_member_fetches_the_modules_then_builds_and_follows_each_change() {
        let mut state = founded();
        let mut follower = LoaderFollower::default();
        let held = RefCell::new(BTreeSet::<String>::new());
        let has = |sha: &str| held.borrow().contains(sha);
        assert!(follower.reconcile(0, 0, &state, &has).is_empty(), "no configuration, none to run");
        assert!(follower.ready(&state));

        set(&mut state, 2, Some(setting("a", &["aa", "bb"])));
        assert!(!follower.ready(&state));
        let steps = follower.reconcile(0, 0, &state, &has);
        let asked = wants(&steps);
        assert_eq!(asked.len(), 2, "both modules: {steps:?}");
        assert!(asked.iter().all(|(_, from)| from.contains(&2)), "from the member that set it: {asked:?}");
        assert!(follower.reconcile(0, 10, &state, &has).is_empty(), "not asked again at once");
        assert!(!follower.offered(&state, &"cc".repeat(32)), "a module not asked for is not kept");
        for sha in ["aa", "bb"] {
            assert!(follower.offered(&state, &sha.repeat(32)));
            held.borrow_mut().insert(sha.repeat(32));
            follower.stored(&sha.repeat(32), &Ok(()));
        }
        let steps = follower.reconcile(0, 20, &state, &has);
        let [LoaderStep::Apply { setting: Some(s), index: 2 }] = steps.as_slice() else { panic!("{steps:?}") };
        assert_eq!(s.config, "a");
        assert!(follower.reconcile(0, 30, &state, &has).is_empty(), "one apply at a time");
        follower.applied(30, Some(s.clone()), &Ok("built".into()));
        assert!(follower.ready(&state));

        // A configuration that does not build is tried again after a
        // growing wait, and the member keeps running the last one that
        // did, not ready.
        set(&mut state, 3, Some(setting("b", &["aa"])));
        let steps = follower.reconcile(0, 40, &state, &has);
        let [LoaderStep::Apply { setting, .. }] = steps.as_slice() else { panic!("{steps:?}") };
        follower.applied(40, setting.clone(), &Err("does not compile".into()));
        assert!(!follower.ready(&state));
        assert!(follower.reconcile(0, 40 + RETRY_MIN_MS - 1, &state, &has).is_empty(), "not at once");
        assert_eq!(follower.last_error(), Some("does not compile"));
        let again = follower.reconcile(0, 40 + RETRY_MIN_MS, &state, &has);
        assert!(matches!(again.as_slice(), [LoaderStep::Apply { .. }]), "tried again: {again:?}");
        follower.applied(2_100, setting.clone(), &Err("does not compile".into()));
        assert!(follower.reconcile(0, 2_100 + RETRY_MIN_MS, &state, &has).is_empty(), "the wait doubles");

        // Cleared: the loaders go.
        set(&mut state, 4, None);
        let steps = follower.reconcile(0, 6_000, &state, &has);
        assert_eq!(steps, vec![LoaderStep::Apply { setting: None, index: 4 }]);
        follower.applied(6_000, None, &Ok("dropped".into()));
        assert!(follower.ready(&state));
        assert!(follower.last_error().is_none());
    }

    #[test]
    fn a_missing_module_is_asked_for_again_from_another_member() {
        let mut state = founded();
        set(&mut state, 2, Some(setting("a", &["aa"])));
        let mut follower = LoaderFollower::default();
        let has = |_: &str| false;
        let first = wants(&follower.reconcile(1, 0, &state, &has));
        let again = wants(&follower.reconcile(1, crate::cluster::policy::ASK_AGAIN_MS, &state, &has));
        assert_eq!(first.len(), 1);
        assert_eq!(again.len(), 1, "asked again once due");
        let askers: BTreeSet<NodeIx> = first.iter().chain(&again).flat_map(|(_, from)| from.clone()).collect();
        assert!(askers.contains(&2) && askers.contains(&0), "the origin and, in turn, the others: {askers:?}");
        assert!(!askers.contains(&1), "never itself");
    }
}
