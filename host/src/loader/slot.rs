//! The loaders a node runs now: attached once on a single node, replaced
//! whole on a cluster member when the cluster's loader configuration
//! changes (`cluster::loaders`). Every request looks here, so a node
//! without loaders pays one relaxed load.

use super::Loaders;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// A replaceable reference to the node's loaders.
#[derive(Default)]
pub struct LoaderSlot {
    present: AtomicBool,
    current: RwLock<Option<Arc<Loaders>>>,
}

impl LoaderSlot {
    /// The loaders now, if any.
    pub fn get(&self) -> Option<Arc<Loaders>> {
        if !self.present.load(Ordering::Acquire) {
            return None;
        }
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Puts `new` in place; the loaders it replaces.
    pub fn replace(&self, new: Option<Arc<Loaders>>) -> Option<Arc<Loaders>> {
        let mut current = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.present.store(new.is_some(), Ordering::Release);
        std::mem::replace(&mut *current, new)
    }

    /// Puts `new` in place if the slot is empty; `new` back otherwise.
    pub fn set_once(&self, new: Arc<Loaders>) -> Result<(), Arc<Loaders>> {
        let mut current = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.is_some() {
            return Err(new);
        }
        *current = Some(new);
        self.present.store(true, Ordering::Release);
        Ok(())
    }
}
