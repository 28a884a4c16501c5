//! Id-keyed structures that most policies are built from.
//!
//! Host ids are dense: the low 32 bits are a slot number below the shard's
//! peak resident count (see [`slot_of`]). So the maps here are vectors
//! indexed by slot: no hashing, and no rehash, which in a hash table is an
//! O(n) pause that can blow a call's budget at the worst moment.

use crate::types::EntryId;

/// The slot part of an id: an index below the shard's peak resident count,
/// reused once the entry leaves (the high 32 bits tell reuses apart).
pub fn slot_of(id: EntryId) -> usize {
    (id & u64::from(u32::MAX)) as usize
}

/// A map from live entry ids to `V`, stored by slot.
#[derive(Clone, Debug)]
pub struct IdMap<V> {
    slots: Vec<Option<(EntryId, V)>>,
    len: usize,
}

impl<V> Default for IdMap<V> {
    fn default() -> Self {
        Self { slots: Vec::new(), len: 0 }
    }
}

impl<V> IdMap<V> {
    /// A map with room for slots below `n` without growing.
    pub fn with_capacity(n: usize) -> Self {
        Self { slots: Vec::with_capacity(n), len: 0 }
    }

    /// Number of ids held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no id is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maps `id` to `value`, returning the value it replaces. An older id of
    /// the same slot is replaced too.
    pub fn insert(&mut self, id: EntryId, value: V) -> Option<V> {
        let slot = slot_of(id);
        if slot >= self.slots.len() {
            self.slots.resize_with(slot + 1, || None);
        }
        let old = self.slots[slot].replace((id, value));
        match old {
            Some((old_id, v)) if old_id == id => Some(v),
            Some(_) => None,
            None => {
                self.len += 1;
                None
            }
        }
    }

    /// The value of `id`.
    pub fn get(&self, id: &EntryId) -> Option<&V> {
        match self.slots.get(slot_of(*id)) {
            Some(Some((held, v))) if held == id => Some(v),
            _ => None,
        }
    }

    /// The value of `id`, mutably.
    pub fn get_mut(&mut self, id: &EntryId) -> Option<&mut V> {
        match self.slots.get_mut(slot_of(*id)) {
            Some(Some((held, v))) if held == id => Some(v),
            _ => None,
        }
    }

    /// Whether `id` is held.
    pub fn contains_key(&self, id: &EntryId) -> bool {
        self.get(id).is_some()
    }

    /// Removes `id`, returning its value.
    pub fn remove(&mut self, id: &EntryId) -> Option<V> {
        let cell = self.slots.get_mut(slot_of(*id))?;
        match cell {
            Some((held, _)) if held == id => {
                self.len -= 1;
                cell.take().map(|(_, v)| v)
            }
            _ => None,
        }
    }
}

/// A new, empty [`IdMap`].
pub fn id_map<V>() -> IdMap<V> {
    IdMap::default()
}

/// An [`IdMap`] with room for `n` entries without growing.
pub fn id_map_for<V>(n: usize) -> IdMap<V> {
    IdMap::with_capacity(n)
}

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Node<T> {
    id: EntryId,
    value: T,
    prev: u32,
    next: u32,
}

/// An ordered list of ids with O(1) push, pop, removal and move-to-back,
/// each carrying a small value (usually the entry's size). The front is the
/// oldest end.
pub struct IdList<T: Copy> {
    nodes: Vec<Node<T>>,
    free: Vec<u32>,
    index: IdMap<u32>,
    head: u32,
    tail: u32,
}

impl<T: Copy> Default for IdList<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy> IdList<T> {
    /// An empty list.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty list with room for `n` ids without growing.
    pub fn with_capacity(n: usize) -> Self {
        Self { nodes: Vec::with_capacity(n), free: Vec::new(), index: id_map_for(n), head: NIL, tail: NIL }
    }

    /// Number of ids in the list.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when the list holds nothing.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether `id` is in the list.
    pub fn contains(&self, id: EntryId) -> bool {
        self.index.contains_key(&id)
    }

    /// The value stored with `id`.
    pub fn get(&self, id: EntryId) -> Option<T> {
        self.index.get(&id).map(|&i| self.nodes[i as usize].value)
    }

    /// A mutable reference to the value stored with `id`.
    pub fn get_mut(&mut self, id: EntryId) -> Option<&mut T> {
        let i = *self.index.get(&id)?;
        Some(&mut self.nodes[i as usize].value)
    }

    /// Appends `id` at the back (newest end). An id already present is
    /// moved to the back and its value replaced.
    pub fn push_back(&mut self, id: EntryId, value: T) {
        if let Some(&i) = self.index.get(&id) {
            self.nodes[i as usize].value = value;
            self.unlink(i);
            self.link_back(i);
            return;
        }
        let node = Node { id, value, prev: NIL, next: NIL };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                u32::try_from(self.nodes.len() - 1).unwrap_or(NIL)
            }
        };
        self.index.insert(id, i);
        self.link_back(i);
    }

    /// Moves `id` to the back; false when absent.
    pub fn move_to_back(&mut self, id: EntryId) -> bool {
        let Some(&i) = self.index.get(&id) else {
            return false;
        };
        if self.tail != i {
            self.unlink(i);
            self.link_back(i);
        }
        true
    }

    /// Removes `id`, returning its value.
    pub fn remove(&mut self, id: EntryId) -> Option<T> {
        let i = self.index.remove(&id)?;
        self.unlink(i);
        self.free.push(i);
        Some(self.nodes[i as usize].value)
    }

    /// The front (oldest) id and its value.
    pub fn front(&self) -> Option<(EntryId, T)> {
        (self.head != NIL).then(|| {
            let n = &self.nodes[self.head as usize];
            (n.id, n.value)
        })
    }

    /// Removes and returns the front (oldest) id and its value.
    pub fn pop_front(&mut self) -> Option<(EntryId, T)> {
        let (id, value) = self.front()?;
        self.remove(id);
        Some((id, value))
    }

    /// The id after `id` (one step toward the back), if any.
    pub fn next_after(&self, id: EntryId) -> Option<EntryId> {
        let &i = self.index.get(&id)?;
        let next = self.nodes[i as usize].next;
        (next != NIL).then(|| self.nodes[next as usize].id)
    }

    /// Ids from front (oldest) to back (newest).
    pub fn iter(&self) -> impl Iterator<Item = (EntryId, T)> + '_ {
        let mut at = self.head;
        std::iter::from_fn(move || {
            if at == NIL {
                return None;
            }
            let n = &self.nodes[at as usize];
            at = n.next;
            Some((n.id, n.value))
        })
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn link_back(&mut self, i: u32) {
        let node = &mut self.nodes[i as usize];
        node.prev = self.tail;
        node.next = NIL;
        if self.tail == NIL {
            self.head = i;
        } else {
            self.nodes[self.tail as usize].next = i;
        }
        self.tail = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_keeps_order_through_moves_and_removals() {
        let mut list = IdList::new();
        for id in 1..=5u64 {
            list.push_back(id, id * 10);
        }
        assert!(list.move_to_back(2));
        assert_eq!(list.remove(4), Some(40));
        assert!(!list.move_to_back(4));
        let order: Vec<_> = list.iter().map(|(id, _)| id).collect();
        assert_eq!(order, vec![1, 3, 5, 2]);
        assert_eq!(list.pop_front(), Some((1, 10)));
        list.push_back(6, 60);
        let order: Vec<_> = list.iter().map(|(id, _)| id).collect();
        assert_eq!(order, vec![3, 5, 2, 6]);
        assert_eq!(list.len(), 4);
    }
}

/// A map from 64-bit keys (key hashes) to small values, for state that
/// outlives entries (ghost lists, frequency tables). Open addressing with
/// linear probing and backward-shift deletion: no tombstones, so it never
/// rehashes in place, and it grows only past the size it was made for.
#[derive(Clone, Debug)]
pub struct KeyMap<V: Copy> {
    slots: Vec<Option<(u64, V)>>,
    len: usize,
}

impl<V: Copy> KeyMap<V> {
    /// A map with room for `n` keys at under 50% load.
    pub fn with_capacity(n: usize) -> Self {
        let size = (n.max(4) * 2).next_power_of_two();
        Self { slots: vec![None; size], len: 0 }
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn home(&self, key: u64) -> usize {
        let mixed = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        (mixed >> 32) as usize & (self.slots.len() - 1)
    }

    fn position(&self, key: u64) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            match self.slots[i] {
                None => return None,
                Some((k, _)) if k == key => return Some(i),
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: u64) -> Option<V> {
        self.position(key).and_then(|i| self.slots[i].map(|(_, v)| v))
    }

    /// Whether `key` is held.
    pub fn contains(&self, key: u64) -> bool {
        self.position(key).is_some()
    }

    /// Sets `key` to `value`, returning the old value.
    pub fn insert(&mut self, key: u64, value: V) -> Option<V> {
        if let Some(i) = self.position(key) {
            return self.slots[i].replace((key, value)).map(|(_, v)| v);
        }
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        while self.slots[i].is_some() {
            i = (i + 1) & mask;
        }
        self.slots[i] = Some((key, value));
        self.len += 1;
        None
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: u64) -> Option<V> {
        let mut hole = self.position(key)?;
        let removed = self.slots[hole].take().map(|(_, v)| v);
        self.len -= 1;
        // Shift later members of the probe run back into the hole.
        let mask = self.slots.len() - 1;
        let mut i = (hole + 1) & mask;
        while let Some((k, _)) = self.slots[i] {
            let home = self.home(k);
            // Move k if its home is not in the cyclic range (hole, i].
            let in_range = if hole <= i { hole < home && home <= i } else { hole < home || home <= i };
            if !in_range {
                self.slots[hole] = self.slots[i].take();
                hole = i;
            }
            i = (i + 1) & mask;
        }
        removed
    }

    fn grow(&mut self) {
        let old = std::mem::take(&mut self.slots);
        self.slots = vec![None; old.len() * 2];
        self.len = 0;
        for (k, v) in old.into_iter().flatten() {
            self.insert(k, v);
        }
    }
}

/// A bounded FIFO of key hashes with weights: the ghost list of S3-FIFO,
/// 2Q and ARC. Remembers keys recently evicted; the oldest are forgotten
/// once the total weight passes the limit.
#[derive(Clone, Debug)]
pub struct Ghost {
    /// `(key, sequence)` in insertion order; entries whose sequence no longer
    /// matches `members` were removed and are skipped.
    queue: std::collections::VecDeque<(u64, u64)>,
    /// Live keys: their sequence and weight.
    members: KeyMap<(u64, u64)>,
    weight: u64,
    limit: u64,
    /// Also a bound on the number of keys: with byte weights a ghost of
    /// small entries could otherwise outgrow the table sized for it.
    max_keys: usize,
    next_seq: u64,
}

impl Ghost {
    /// A ghost holding up to `limit` weight and at most `n` keys.
    pub fn new(limit: u64, n: usize) -> Self {
        Self {
            queue: std::collections::VecDeque::with_capacity(n),
            members: KeyMap::with_capacity(n),
            weight: 0,
            limit,
            max_keys: n.max(1),
            next_seq: 0,
        }
    }

    /// Whether `key` is remembered.
    pub fn contains(&self, key: u64) -> bool {
        self.members.contains(key)
    }

    /// Forgets `key`; true if it was remembered.
    pub fn remove(&mut self, key: u64) -> bool {
        match self.members.remove(key) {
            Some((_, w)) => {
                self.weight -= w;
                true
            }
            None => false,
        }
    }

    /// Remembers `key` (no-op if already remembered), forgetting the oldest
    /// keys while over the limit.
    pub fn insert(&mut self, key: u64, weight: u64) {
        if self.members.contains(key) {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.members.insert(key, (seq, weight));
        self.queue.push_back((key, seq));
        self.weight += weight;
        while self.weight > self.limit || self.members.len() > self.max_keys {
            let Some((old, old_seq)) = self.queue.pop_front() else { break };
            if let Some((live_seq, w)) = self.members.get(old)
                && live_seq == old_seq
            {
                self.members.remove(old);
                self.weight -= w;
            }
        }
        // Drop removed keys' leftovers as they reach the front: a little work
        // per insert, never a pass over the whole queue inside one call.
        while let Some(&(front, seq)) = self.queue.front() {
            if self.members.get(front).is_some_and(|(live, _)| live == seq) {
                break;
            }
            self.queue.pop_front();
        }
    }

    /// Forgets the oldest key, returning it and its weight.
    pub fn pop_oldest(&mut self) -> Option<(u64, u64)> {
        while let Some((key, seq)) = self.queue.pop_front() {
            if let Some((live_seq, w)) = self.members.get(key)
                && live_seq == seq
            {
                self.members.remove(key);
                self.weight -= w;
                return Some((key, w));
            }
        }
        None
    }

    /// Total weight remembered.
    pub fn weight(&self) -> u64 {
        self.weight
    }

    /// Number of keys remembered.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

#[cfg(test)]
mod map_tests {
    use super::*;

    #[test]
    fn key_map_survives_churn_with_backward_shift() {
        let mut map = KeyMap::with_capacity(8);
        let mut model = std::collections::HashMap::new();
        let mut rng = crate::rng::SplitMix64::new(1);
        for step in 0..20_000u64 {
            let key = rng.below(64) * 0x1000_0000_0000; // collide on purpose
            if rng.below(2) == 0 {
                assert_eq!(map.insert(key, step), model.insert(key, step));
            } else {
                assert_eq!(map.remove(key), model.remove(&key));
            }
            assert_eq!(map.len(), model.len());
        }
        for (k, v) in model {
            assert_eq!(map.get(k), Some(v));
        }
    }

    #[test]
    fn ghost_holds_at_most_its_key_count_whatever_the_weights() {
        let mut ghost = Ghost::new(u64::MAX, 3);
        for key in 1..=5 {
            ghost.insert(key, 0);
        }
        assert_eq!(ghost.len(), 3);
        assert!(!ghost.contains(2) && ghost.contains(3) && ghost.contains(5));
    }

    #[test]
    fn ghost_forgets_oldest_beyond_its_limit() {
        let mut ghost = Ghost::new(3, 4);
        for key in 1..=4 {
            ghost.insert(key, 1);
        }
        assert!(!ghost.contains(1) && ghost.contains(4));
        assert!(ghost.remove(3));
        ghost.insert(5, 1);
        ghost.insert(6, 1);
        assert!(!ghost.contains(2), "2 is now the oldest beyond the limit");
        assert_eq!(ghost.len(), 3);
        assert!(ghost.contains(4) && ghost.contains(5) && ghost.contains(6));
    }

    #[test]
    fn a_reused_slot_does_not_answer_for_the_old_id() {
        let mut map = IdMap::default();
        let old = 3u64;
        let new = (1u64 << 32) | 3;
        map.insert(old, "old");
        assert_eq!(map.get(&new), None);
        assert_eq!(map.insert(new, "new"), None);
        assert_eq!(map.get(&old), None);
        assert_eq!(map.remove(&old), None);
        assert_eq!(map.len(), 1);
        assert_eq!(map.remove(&new), Some("new"));
        assert!(map.is_empty());
    }
}
