//! A cluster member's loaders come from the metadata log's loader
//! configuration (`cluster::loaders`), not from its own file: the node is
//! the cluster runtime's [`LoaderHost`], which builds loaders from the
//! log's configuration and puts them in place of the ones it ran, and
//! `cachet cluster loaders` changes the configuration through any member.

use super::Node;
use crate::cluster::loaders::LoaderHost;
use crate::cluster::meta::entry::LoaderSetting;
use crate::loader::Loaders;
use crate::loader::shared::{MODULE_SCHEME, SharedLoaders};
use cachet_proto::SentModule;
use std::sync::Arc;
use std::time::Duration;

/// How long replaced loaders may take to store their queued write-behind
/// writes before they are dropped (each write retries with back-off
/// within its namespace's `write-attempts`).
const RETIRE_WAIT: Duration = Duration::from_secs(120);

impl LoaderHost for Node {
    fn apply_loaders(
        &self,
        setting: Option<&LoaderSetting>,
        module: &dyn Fn(&str) -> Option<Arc<Vec<u8>>>,
    ) -> Result<String, String> {
        let cluster = self.cluster().ok_or("this node is not a cluster member")?.clone();
        let new = match setting {
            None => None,
            Some(setting) => Some(self.build_loaders(setting, module)?),
        };
        cluster.attach_loaders(new.as_ref())?;
        let done = match &new {
            Some(loaders) => format!("loaders for {}", loaders.prefixes().join(", ")),
            None => "no loaders".to_string(),
        };
        if let Some(old) = self.swap_loaders(new) {
            // Queued write-behind writes reach the origin before the old
            // loaders go; the new ones' queues wait for them.
            std::thread::spawn(move || {
                if !old.retire(RETIRE_WAIT) {
                    tracing::error!(
                        queued = old.write_queue_depth(),
                        "replaced loaders did not store their queued writes in time; dropped"
                    );
                }
            });
        }
        Ok(done)
    }
}

impl Node {
    /// Loaders from the log's configuration: the ones built at start from
    /// this member's `--loaders` when the log took that configuration,
    /// else built now from the modules held here.
    fn build_loaders(
        &self,
        setting: &LoaderSetting,
        module: &dyn Fn(&str) -> Option<Arc<Vec<u8>>>,
    ) -> Result<Arc<Loaders>, String> {
        let mut prebuilt = self.prebuilt_loaders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((text, loaders)) = prebuilt.take()
            && text == setting.config
        {
            return Ok(loaders);
        }
        drop(prebuilt);
        let (config, _) = crate::loader::shared::parse(&setting.config).map_err(|e| e.to_string())?;
        let read = |path: &std::path::Path| {
            let sha = path.to_str().and_then(|p| p.strip_prefix(MODULE_SCHEME));
            sha.and_then(module)
                .map(|bytes| bytes.to_vec())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "not held on this member"))
        };
        Loaders::with_modules(&config, &read).map_err(|e| e.to_string())
    }

    /// Keeps loaders built at start from `--loaders` for when the log takes
    /// their configuration (`shared`), so their modules compile once.
    pub(super) fn keep_prebuilt_loaders(&self, shared: &SharedLoaders, loaders: Arc<Loaders>) {
        *self.prebuilt_loaders.lock().unwrap_or_else(|p| p.into_inner()) = Some((shared.config.clone(), loaders));
    }

    /// `cachet cluster loaders`: the configuration and modules an admin
    /// client sent (modules too large for a frame taken from their
    /// uploads), each module checked against its hash; `None` for no
    /// loaders.
    pub(super) fn shared_loaders(
        &self,
        config: Option<String>,
        modules: Vec<SentModule>,
    ) -> Result<Option<SharedLoaders>, String> {
        let Some(config) = config else { return Ok(None) };
        let mut held = Vec::new();
        for module in modules {
            let bytes = match module.upload {
                Some(id) => self.control.uploads_take(id).map_err(|e| e.to_string())?,
                None => module.bytes,
            };
            if crate::registry::sha256_hex(&bytes) != module.sha256 {
                return Err(format!("the bytes sent as loader module {} do not match that hash", module.sha256));
            }
            held.push((module.sha256, bytes.to_vec()));
        }
        Ok(Some(SharedLoaders { config, modules: held }))
    }
}
