//! A policy that behaves like LRU until told, by its `mode` config, to
//! misbehave in one way. The sandbox tests load it as a component and check
//! that each misbehaviour becomes a counted fault and a fallback, never a
//! crash or a lost entry.
//!
//! Modes: `lru` (behave), `loop` (spin forever when asked for victims),
//! `grow` (allocate without bound on events), `panic` (panic on events),
//! `bogus-ids` (return ids that were never inserted), `fail-create`
//! (refuse to start). `after=N` delays the misbehaviour until N events
//! have been seen.
//!
//! Two well-behaved extras exercise optional hooks: `idle-ms=N` expires
//! entries not touched for N ms through `next-deadline` / `expired`, and
//! `admit=none` declines every new entry through `admit`.

use cachet_policy_sdk::collections::{IdList, IdMap, id_map};
use cachet_policy_sdk::{
    Capacity, Config, ConfigError, Entry, EntryId, Event, Need, Policy, PolicyInfo, RemovalCause, collect_victims,
    export_policy,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Lru,
    Loop,
    Grow,
    Panic,
    BogusIds,
}

/// The misbehaving policy.
pub struct Hostile {
    mode: Mode,
    after: u64,
    seen: u64,
    recency: IdList<u64>,
    hoard: Vec<Vec<u8>>,
    idle_ms: Option<u64>,
    touched: IdMap<u64>,
    admit_none: bool,
}

impl Hostile {
    fn armed(&self) -> bool {
        self.seen >= self.after
    }
}

impl Policy for Hostile {
    fn info() -> PolicyInfo {
        PolicyInfo::new("hostile", "0.0.1").with_access_events().with_admission()
    }

    fn create(_: Capacity, _: u64, config: &Config) -> Result<Self, ConfigError> {
        config.reject_unknown(&["mode", "after", "idle-ms", "admit"])?;
        let mode = match config.get("mode").unwrap_or("lru") {
            "lru" => Mode::Lru,
            "loop" => Mode::Loop,
            "grow" => Mode::Grow,
            "panic" => Mode::Panic,
            "bogus-ids" => Mode::BogusIds,
            "fail-create" => return Err(ConfigError("refusing to start, as asked".into())),
            other => return Err(ConfigError(format!("unknown mode `{other}`"))),
        };
        let after = config.parse_or("after", 0u64)?;
        let idle_ms = config.get("idle-ms").map(|_| config.parse_or("idle-ms", 0u64)).transpose()?;
        let admit_none = match config.get("admit").unwrap_or("all") {
            "all" => false,
            "none" => true,
            other => return Err(ConfigError(format!("admit: expected all or none, got `{other}`"))),
        };
        Ok(Self {
            mode,
            after,
            seen: 0,
            recency: IdList::new(),
            hoard: Vec::new(),
            idle_ms,
            touched: id_map(),
            admit_none,
        })
    }

    fn on_events(&mut self, now: u64, events: &[Event]) {
        self.seen += events.len() as u64;
        if self.armed() {
            match self.mode {
                Mode::Grow => grow_forever(&mut self.hoard),
                Mode::Panic => panic!("hostile guest panics, as asked"),
                _ => {}
            }
        }
        for event in events {
            match event {
                Event::Inserted(e) => self.on_inserted(now, e),
                Event::Accessed(id) => self.on_accessed(now, *id),
                Event::Updated(e) => self.on_updated(now, e),
                Event::Removed(id, cause) => self.on_removed(now, *id, *cause),
                Event::Missed(_) => {}
            }
        }
    }

    fn on_inserted(&mut self, now: u64, entry: &Entry) {
        self.recency.push_back(entry.id, entry.size);
        self.touched.insert(entry.id, now);
    }

    fn on_accessed(&mut self, now: u64, id: EntryId) {
        if self.recency.move_to_back(id) {
            self.touched.insert(id, now);
        }
    }

    fn on_removed(&mut self, _: u64, id: EntryId, _: RemovalCause) {
        self.recency.remove(id);
        self.touched.remove(&id);
    }

    fn admit(&mut self, _: u64, _: &Entry) -> bool {
        !self.admit_none
    }

    fn next_deadline(&self) -> Option<u64> {
        let idle = self.idle_ms?;
        let (oldest, _) = self.recency.front()?;
        self.touched.get(&oldest).map(|&t| t + idle)
    }

    fn expired(&mut self, now: u64, out: &mut Vec<EntryId>) {
        while self.next_deadline().is_some_and(|at| at <= now) {
            let Some((id, _)) = self.recency.pop_front() else { break };
            self.touched.remove(&id);
            out.push(id);
        }
    }

    fn pick_victims(&mut self, _: u64, need: Need, out: &mut Vec<EntryId>) {
        if self.armed() {
            match self.mode {
                Mode::Loop => {
                    let mut spin = 0u64;
                    while std::hint::black_box(spin) != u64::MAX {
                        spin = spin.wrapping_add(1) % (u64::MAX - 1);
                    }
                }
                Mode::BogusIds => {
                    out.extend([u64::MAX, u64::MAX - 1, 0xdead_beef]);
                    return;
                }
                _ => {}
            }
        }
        collect_victims(need, out, || {
            let (id, size) = self.recency.pop_front()?;
            self.touched.remove(&id);
            Some((id, size))
        });
    }

    fn export_order(&self, out: &mut Vec<EntryId>) {
        out.extend(self.recency.iter().map(|(id, _)| id));
    }
}

/// Grows linear memory a megabyte at a time until the host refuses, then
/// fails the way an out-of-memory guest does.
#[cfg(target_arch = "wasm32")]
fn grow_forever(_: &mut Vec<Vec<u8>>) {
    loop {
        if core::arch::wasm32::memory_grow(0, 16) == usize::MAX {
            panic!("out of memory");
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn grow_forever(hoard: &mut Vec<Vec<u8>>) {
    loop {
        hoard.push(vec![1u8; 1 << 20]);
    }
}

export_policy!(Hostile);
