//! Read-modify-writes and read-through loads at a key's primary owner:
//! one update of a key at a time, each a read at the request's consistency,
//! then (for a load of a missing key) the node's loader, then a write, and
//! the answer. Members that are not the primary forward their clients'
//! updates here (and coalesce their loads of one key into one forward).

use super::{
    Consistency, Effect, INTERNAL, LoadKind, LoadRequest, LoadResult, MAX_QUEUED_UPDATES, Message, Op, OpError, Origin,
    Outcome, Pending, Queued, RefreshOf, Replica, Reply, Step, StoreResult, Update, entry, update,
};
use bytes::Bytes;

/// The longest an origin write may take at a primary (a namespace's
/// timeout is capped by it), for the forwarding member's deadline.
pub const MAX_STORE_WAIT_MS: u64 = 120_000;

impl Replica {
    /// Joins a load of `key` this node already forwarded to its primary: one
    /// message and one answer for every GET of a cold key here.
    pub(super) fn join_load(&mut self, key: &Bytes, client_req: u64) -> bool {
        let Some(&req) = self.forwarded_loads.get(key) else { return false };
        match self.pending.get_mut(&req) {
            Some(Pending::Forward { also, .. }) => {
                also.push(client_req);
                true
            }
            _ => {
                self.forwarded_loads.remove(key);
                false
            }
        }
    }

    /// Answers a forwarded update's client and those that joined it.
    pub(super) fn answer_forward(&mut self, req: u64, result: Result<Outcome, OpError>) {
        let Some(Pending::Forward { client_req, also, load, .. }) = self.pending.remove(&req) else { return };
        if let Some(key) = load
            && self.forwarded_loads.get(&key) == Some(&req)
        {
            self.forwarded_loads.remove(&key);
        }
        for client_req in std::iter::once(client_req).chain(also) {
            self.replies.push_back(Reply { client_req, result: result.clone() });
        }
    }

    /// Queues an update of `key`, which this node is primary for, and
    /// starts it if none of the key's is running.
    pub(super) fn enqueue_update(&mut self, now: u64, origin: Origin, key: Bytes, update: Update, level: Consistency) {
        if self.updates_queued >= MAX_QUEUED_UPDATES {
            self.answer_update(origin, Err(OpError::Unavailable));
            return;
        }
        if self.refreshing.contains_key(&key) && !self.refresh_yields(now, &key, &update) {
            let value = self.refreshing.get(&key).cloned();
            self.answer_update(origin, Ok(Effect::Value(value)));
            return;
        }
        self.updates_queued += 1;
        let queue = self.updates.entry(key.clone()).or_default();
        queue.push_back(Queued { origin, update, level, attempts: 0 });
        if queue.len() == 1 {
            self.start_update(now, key);
        }
    }

    /// `update` arrives while `key`'s value is refreshed in the background.
    /// A read-through GET is served the value being refreshed (false: not
    /// queued). Anything else is queued (true) and ends the stale serving,
    /// so reads after it wait for it; a refresh still waiting for the
    /// origin is abandoned (its answer, read before this write, must not
    /// install over it; the single node's lease, broken by a write).
    fn refresh_yields(&mut self, now: u64, key: &Bytes, update: &Update) -> bool {
        if matches!(update, Update::Load { .. }) {
            return false;
        }
        self.refreshing.remove(key);
        let loading: Vec<u64> = self
            .steps
            .iter()
            .filter(|(_, (k, step))| k == key && matches!(step, Step::Load))
            .map(|(&id, _)| id)
            .collect();
        if !loading.is_empty() {
            for id in loading {
                self.steps.remove(&id);
            }
            self.finish_update(now, key, Ok(Effect::Value(None)));
        }
        true
    }

    /// Updates of keys this node no longer takes itself for the primary of
    /// (the table moved, or an owner before it is up again) are handed
    /// back: those queued behind the running one, and the running one too
    /// if it has not written yet, are refused as unavailable (their
    /// coordinators' clients retry, and reach the new primary). Left
    /// running, they would read and write beside the new primary's own
    /// updates of the key, and two increments could answer the same count.
    /// One that is writing finishes: it cannot be called back.
    pub(super) fn shed_moved_updates(&mut self, now: u64) {
        let keys: Vec<Bytes> = self.updates.keys().cloned().collect();
        for key in keys {
            let owners = self.owners(&key);
            if owners.iter().copied().find(|&n| n == self.me || self.is_alive(n)) == Some(self.me) {
                continue;
            }
            let Some(queue) = self.updates.get_mut(&key) else { continue };
            let shed: Vec<Origin> = queue.drain(1..).map(|q| q.origin).collect();
            self.updates_queued = self.updates_queued.saturating_sub(shed.len());
            for origin in shed {
                self.answer_update(origin, Err(OpError::Unavailable));
            }
            let reading: Vec<u64> = self
                .steps
                .iter()
                .filter(|(_, (k, step))| *k == key && matches!(step, Step::Read))
                .map(|(&id, _)| id)
                .collect();
            if !reading.is_empty() {
                for id in reading {
                    self.steps.remove(&id);
                }
                self.finish_update(now, &key, Err(OpError::Unavailable));
            }
        }
    }

    /// Writes this replica stored for other coordinators' client requests.
    pub fn peer_writes(&self) -> u64 {
        self.peer_writes
    }

    /// Updates (read-modify-writes, loads) run here as a key's primary.
    pub fn updates_run(&self) -> u64 {
        self.updates_run
    }

    /// Starts the queue head of `key`: its read, at its consistency.
    fn start_update(&mut self, now: u64, key: Bytes) {
        let Some(level) = self.updates.get(&key).and_then(|q| q.front()).map(|q| q.level) else { return };
        self.updates_run += 1;
        let id = self.internal_id();
        self.steps.insert(id, (key.clone(), Step::Read));
        self.coordinate(now, id, Op::Get { key }, level);
    }

    pub(super) fn internal_id(&mut self) -> u64 {
        self.next_internal += 1;
        INTERNAL | self.next_internal
    }

    /// Moves running updates on with the replies to their internal
    /// requests. Called at the end of every input; re-entry (a step that
    /// completes at once) is left to the outer loop.
    pub(super) fn pump_updates(&mut self, now: u64) {
        if self.pumping {
            return;
        }
        self.pumping = true;
        while let Some(at) = self.replies.iter().position(|r| r.client_req & INTERNAL != 0) {
            let Some(reply) = self.replies.remove(at) else { break };
            self.update_step(now, reply.client_req, reply.result);
        }
        self.pumping = false;
    }

    fn update_step(&mut self, now: u64, id: u64, result: Result<Outcome, OpError>) {
        let Some((key, step)) = self.steps.remove(&id) else { return };
        let Some(head) = self.updates.get(&key).and_then(|q| q.front()) else { return };
        let wall_ms = self.config.wall_epoch_ms.saturating_add(now);
        match (step, result) {
            (Step::Read, Ok(Outcome::Read(record)))
                if matches!(head.update, Update::Load { .. })
                    && update::live(entry(record.clone()), wall_ms).is_none() =>
            {
                let id = self.internal_id();
                self.steps.insert(id, (key.clone(), Step::Load));
                self.loads.push_back(LoadRequest { id, key, kind: LoadKind::Load });
            }
            // A write to the origin first: whether the key held a value is
            // a DEL's answer.
            (Step::Read, Ok(Outcome::Read(record))) if matches!(head.update, Update::Store { .. }) => {
                let existed = update::live(entry(record), wall_ms).is_some();
                let Update::Store { value, ttl_ms, .. } = head.update.clone() else { return };
                let id = self.internal_id();
                self.steps.insert(id, (key.clone(), Step::Store(existed)));
                self.loads.push_back(LoadRequest { id, key, kind: LoadKind::Store { value, ttl_ms } });
            }
            (Step::Read, Ok(Outcome::Read(record))) => {
                let base = record.as_ref().map(|r| r.version).unwrap_or_default();
                let current = update::live(entry(record), wall_ms);
                // A live value due for a refresh, with only read-through
                // GETs waiting behind: served now, refreshed meanwhile.
                let queue_only_loads = |this: &Self| {
                    this.updates
                        .get(&key)
                        .is_some_and(|q| q.iter().skip(1).all(|u| matches!(u.update, Update::Load { .. })))
                };
                if let (Update::Load { fresh: Some(rule), .. }, Some(live)) = (&head.update, &current)
                    && rule.refresh(live, wall_ms)
                    && queue_only_loads(self)
                    && let (Some(value), Some(expires_at)) = (live.value.clone(), live.expires_at)
                {
                    let stale = wall_ms >= expires_at.saturating_sub(rule.grace_ms);
                    self.serve_and_refresh(&key, value, RefreshOf { current: Bytes::new(), stale, expires_at });
                    return;
                }
                let (write, effect) = update::apply(&head.update, current.as_ref(), wall_ms, self.config.max_value_len);
                let level = head.level;
                match write {
                    None => self.finish_update(now, &key, Ok(effect)),
                    Some(write) => {
                        let id = self.internal_id();
                        self.steps.insert(id, (key.clone(), Step::Write(effect)));
                        let put = Op::Put { key, value: write.value, expires_at: write.expires_at, hint: write.hint };
                        self.coordinate_with(now, id, put, level, Some(base));
                    }
                }
            }
            (Step::Write(effect), Ok(Outcome::Written(_))) => self.finish_update(now, &key, Ok(effect)),
            // Nothing was written: run it again from a fresh read, a few
            // times (another primary's updates of the key are racing this
            // one's until the views of who is up agree again).
            (Step::Write(_), Err(OpError::Conflict)) => {
                let retry = self.updates.get_mut(&key).and_then(|q| q.front_mut()).filter(|head| head.attempts < 3);
                match retry {
                    Some(head) => {
                        head.attempts += 1;
                        self.start_update(now, key);
                    }
                    None => self.finish_update(now, &key, Err(OpError::Conflict)),
                }
            }
            (_, Err(err)) => self.finish_update(now, &key, Err(err)),
            (_, Ok(_)) => self.finish_update(now, &key, Err(OpError::Unavailable)),
        }
    }

    /// Answers the running read-through GET of `key`, and the ones queued
    /// behind it, with `value`, and keeps the queue's head as a background
    /// refresh ([`Origin::Refresh`]); GETs arriving meanwhile get `value`
    /// at once ([`Replica::enqueue_update`]).
    fn serve_and_refresh(&mut self, key: &Bytes, value: Bytes, mut refresh: RefreshOf) {
        let Some(queue) = self.updates.get_mut(key) else { return };
        let Some(head) = queue.front_mut() else { return };
        let mut answered = vec![std::mem::replace(&mut head.origin, Origin::Refresh)];
        answered.extend(queue.drain(1..).map(|q| q.origin));
        self.updates_queued = self.updates_queued.saturating_sub(answered.len() - 1);
        for origin in answered {
            self.answer_update(origin, Ok(Effect::Value(Some(value.clone()))));
        }
        self.refreshing.insert(key.clone(), value.clone());
        refresh.current = value;
        let id = self.internal_id();
        self.steps.insert(id, (key.clone(), Step::Load));
        self.loads.push_back(LoadRequest { id, key: key.clone(), kind: LoadKind::Refresh(refresh) });
    }

    /// A load the node's loader was asked for ([`Replica::poll_load`]).
    pub fn poll_load(&mut self) -> Option<LoadRequest> {
        self.loads.pop_front()
    }

    /// What the node's loader found for load `id`: the value is written to
    /// the key's replicas, then every read-through waiting on the key is
    /// answered.
    pub fn loaded(&mut self, now: u64, id: u64, result: LoadResult) {
        if !matches!(self.steps.get(&id), Some((_, Step::Load))) {
            return;
        }
        let Some((key, _)) = self.steps.remove(&id) else { return };
        let Some(head) = self.updates.get(&key).and_then(|q| q.front()) else { return };
        let level = head.level;
        let refreshing = matches!(head.origin, Origin::Refresh);
        match result {
            Ok(Some((value, ttl_ms, hint))) => {
                let wall_ms = self.config.wall_epoch_ms.saturating_add(now);
                let id = self.internal_id();
                self.steps.insert(id, (key.clone(), Step::Write(Effect::Value(Some(value.clone())))));
                let expires_at = Some(wall_ms.saturating_add(ttl_ms.max(1)));
                let put = Op::Put { key, value: Some(value), expires_at, hint };
                self.coordinate(now, id, put, level);
            }
            // The origin no longer has a value being refreshed: deleted
            // everywhere, as the single node drops it.
            Ok(None) if refreshing => {
                let id = self.internal_id();
                self.steps.insert(id, (key.clone(), Step::Write(Effect::Value(None))));
                self.coordinate(now, id, Op::Put { key, value: None, expires_at: None, hint: 0 }, level);
            }
            Ok(None) => self.finish_update(now, &key, Ok(Effect::Value(None))),
            // A failed refresh leaves the value to its hard expiry.
            Err(effect) => self.finish_update(now, &key, Ok(effect)),
        }
        self.pump_updates(now);
    }

    /// What the node's loader did with store `id`: the write goes to the
    /// replicas (the value with its TTL, or a delete) and the client is
    /// answered; a failed store deletes the key everywhere (the origin may
    /// or may not have the write, so the next read loads what it has) and
    /// answers the error.
    pub fn stored(&mut self, now: u64, id: u64, result: StoreResult) {
        let Some((key, Step::Store(existed))) = self.steps.get(&id).cloned() else { return };
        self.steps.remove(&id);
        let Some(head) = self.updates.get(&key).and_then(|q| q.front()) else { return };
        let (level, value) = match &head.update {
            Update::Store { value, .. } => (head.level, value.clone()),
            _ => return,
        };
        let wall_ms = self.config.wall_epoch_ms.saturating_add(now);
        let (put, effect) = match (result, value) {
            (Ok(Some(ttl_ms)), Some(value)) => {
                let expires_at = Some(wall_ms.saturating_add(ttl_ms.max(1)));
                (Op::Put { key: key.clone(), value: Some(value), expires_at, hint: 0 }, Effect::Ok)
            }
            (Ok(_), _) => {
                (Op::Put { key: key.clone(), value: None, expires_at: None, hint: 0 }, Effect::Applied(existed))
            }
            (Err(effect), _) => (Op::Put { key: key.clone(), value: None, expires_at: None, hint: 0 }, effect),
        };
        let id = self.internal_id();
        self.steps.insert(id, (key, Step::Write(effect)));
        self.coordinate(now, id, put, level);
        self.pump_updates(now);
    }

    /// Answers the running update of `key` and starts the next one. Loads
    /// queued right behind a finished load get its answer too: they asked
    /// for the same key at the same time, and one load serves them all.
    fn finish_update(&mut self, now: u64, key: &Bytes, result: Result<Effect, OpError>) {
        let Some(queue) = self.updates.get_mut(key) else { return };
        let Some(done) = queue.pop_front() else { return };
        if matches!(done.origin, Origin::Refresh) {
            self.refreshing.remove(key);
        }
        let mut answered = vec![done.origin];
        if matches!(done.update, Update::Load { .. }) && result.is_ok() {
            while queue.front().is_some_and(|q| matches!(q.update, Update::Load { .. })) {
                if let Some(next) = queue.pop_front() {
                    answered.push(next.origin);
                }
            }
        }
        let more = !queue.is_empty();
        if !more {
            self.updates.remove(key);
        }
        self.updates_queued = self.updates_queued.saturating_sub(answered.len());
        for origin in answered {
            self.answer_update(origin, result.clone());
        }
        if more {
            self.start_update(now, key.clone());
        }
    }

    pub(super) fn answer_update(&mut self, origin: Origin, result: Result<Effect, OpError>) {
        match origin {
            Origin::Client(client_req) => {
                self.replies.push_back(Reply { client_req, result: result.map(Outcome::Updated) });
            }
            Origin::Peer { from, req } => self.send(from, Message::UpdateReply { req, result }),
            Origin::Refresh => {}
        }
    }
}
