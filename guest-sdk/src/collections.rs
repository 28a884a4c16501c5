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

/// An ordered list of ids with O(1) push, pop, removal and move-to-back,
/// each carrying a small value (usually the entry's size). The front is the
/// oldest end. One list of an [`IdLists`]: links and value live in a table
/// indexed by the id's slot, 12 bytes plus `T` per entry.
pub struct IdList<T: Copy + Default> {
    list: IdLists<T, 1>,
}

impl<T: Copy + Default> Default for IdList<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Default> IdList<T> {
    /// An empty list.
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An empty list with room for slots below `n` without growing.
    pub fn with_capacity(n: usize) -> Self {
        Self { list: IdLists::with_capacity(n) }
    }

    /// Number of ids in the list.
    pub fn len(&self) -> usize {
        self.list.len(0)
    }

    /// True when the list holds nothing.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty(0)
    }

    /// Whether `id` is in the list.
    pub fn contains(&self, id: EntryId) -> bool {
        self.list.contains(id)
    }

    /// The value stored with `id`.
    pub fn get(&self, id: EntryId) -> Option<T> {
        self.list.get(id).map(|(_, value)| value)
    }

    /// A mutable reference to the value stored with `id`.
    pub fn get_mut(&mut self, id: EntryId) -> Option<&mut T> {
        self.list.get_mut(id)
    }

    /// Appends `id` at the back (newest end). An id already present is
    /// moved to the back and its value replaced; an older id of the same
    /// slot is dropped.
    pub fn push_back(&mut self, id: EntryId, value: T) {
        let _ = self.list.push_back(0, id, value);
    }

    /// Moves `id` to the back; false when absent.
    pub fn move_to_back(&mut self, id: EntryId) -> bool {
        self.list.move_to_back(id)
    }

    /// Removes `id`, returning its value.
    pub fn remove(&mut self, id: EntryId) -> Option<T> {
        self.list.remove(id).map(|(_, value)| value)
    }

    /// The front (oldest) id and its value.
    pub fn front(&self) -> Option<(EntryId, T)> {
        self.list.front(0)
    }

    /// Removes and returns the front (oldest) id and its value.
    pub fn pop_front(&mut self) -> Option<(EntryId, T)> {
        self.list.pop_front(0)
    }

    /// The id after `id` (one step toward the back), if any.
    pub fn next_after(&self, id: EntryId) -> Option<EntryId> {
        self.list.next_after(id)
    }

    /// Ids from front (oldest) to back (newest).
    pub fn iter(&self) -> impl Iterator<Item = (EntryId, T)> + '_ {
        self.list.iter(0)
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

/// No list: the slot is free or its entry has left.
const NO_LIST: u8 = u8::MAX;

#[derive(Clone, Copy, Debug, Default)]
struct SlotNode<T> {
    value: T,
    /// The generation half of the id, so a reused slot is told apart.
    generation: u32,
    prev: u32,
    next: u32,
    list: u8,
}

/// Up to `K` ordered lists of ids sharing one table indexed by slot: each
/// id is in at most one list, and its links live in its slot. That is what
/// a policy of several queues (S3-FIFO, 2Q, ARC) needs at 12 bytes plus `T`
/// per entry, where an [`IdList`] per queue costs a node, an index entry and
/// a free-list place in each, and no hashing either way.
#[derive(Clone, Debug)]
pub struct IdLists<T: Copy + Default, const K: usize> {
    nodes: Vec<SlotNode<T>>,
    heads: [u32; K],
    tails: [u32; K],
    lens: [usize; K],
}

impl<T: Copy + Default, const K: usize> IdLists<T, K> {
    /// Empty lists with room for slots below `n` without growing.
    pub fn with_capacity(n: usize) -> Self {
        assert!(K < usize::from(NO_LIST), "at most 254 lists");
        Self { nodes: Vec::with_capacity(n), heads: [NIL; K], tails: [NIL; K], lens: [0; K] }
    }

    fn slot(&self, id: EntryId) -> Option<usize> {
        let slot = slot_of(id);
        let node = self.nodes.get(slot)?;
        (node.list != NO_LIST && node.generation == (id >> 32) as u32).then_some(slot)
    }

    /// The list `id` is in, with its value.
    pub fn get(&self, id: EntryId) -> Option<(usize, T)> {
        self.slot(id).map(|s| (usize::from(self.nodes[s].list), self.nodes[s].value))
    }

    /// The value of `id`, mutably.
    pub fn get_mut(&mut self, id: EntryId) -> Option<&mut T> {
        let slot = self.slot(id)?;
        Some(&mut self.nodes[slot].value)
    }

    /// Whether `id` is in any list.
    pub fn contains(&self, id: EntryId) -> bool {
        self.slot(id).is_some()
    }

    /// Number of ids in `list`.
    pub fn len(&self, list: usize) -> usize {
        self.lens[list]
    }

    /// True when `list` is empty.
    pub fn is_empty(&self, list: usize) -> bool {
        self.lens[list] == 0
    }

    /// Appends `id` to the back (newest end) of `list`, taking it out of
    /// whichever list held it. An older id of the same slot is dropped.
    /// Returns the list and value of what the slot held before (`id`
    /// itself or the older id), so a policy can take back what it charged.
    pub fn push_back(&mut self, list: usize, id: EntryId, value: T) -> Option<(usize, T)> {
        let slot = slot_of(id);
        if slot >= self.nodes.len() {
            self.nodes.resize(slot + 1, SlotNode { list: NO_LIST, ..SlotNode::default() });
        }
        let held = self.nodes[slot];
        let displaced = (held.list != NO_LIST).then(|| (usize::from(held.list), held.value));
        if displaced.is_some() {
            self.unlink(slot as u32);
        }
        self.nodes[slot] = SlotNode { value, generation: (id >> 32) as u32, prev: NIL, next: NIL, list: list as u8 };
        self.link_back(list, slot as u32);
        displaced
    }

    /// Moves `id` to the back of its own list; false when absent.
    pub fn move_to_back(&mut self, id: EntryId) -> bool {
        let Some(slot) = self.slot(id) else { return false };
        let list = usize::from(self.nodes[slot].list);
        self.unlink(slot as u32);
        self.link_back(list, slot as u32);
        true
    }

    /// Takes `id` out of its list, returning the list and the value.
    pub fn remove(&mut self, id: EntryId) -> Option<(usize, T)> {
        let slot = self.slot(id)?;
        let list = usize::from(self.nodes[slot].list);
        self.unlink(slot as u32);
        self.nodes[slot].list = NO_LIST;
        Some((list, self.nodes[slot].value))
    }

    /// The front (oldest) id of `list` and its value.
    pub fn front(&self, list: usize) -> Option<(EntryId, T)> {
        let head = self.heads[list];
        (head != NIL).then(|| (self.id_at(head), self.nodes[head as usize].value))
    }

    /// The id after `id` in its list (one step toward the back), if any.
    pub fn next_after(&self, id: EntryId) -> Option<EntryId> {
        let next = self.nodes[self.slot(id)?].next;
        (next != NIL).then(|| self.id_at(next))
    }

    /// Removes and returns the front (oldest) id of `list` and its value.
    pub fn pop_front(&mut self, list: usize) -> Option<(EntryId, T)> {
        let (id, value) = self.front(list)?;
        self.remove(id);
        Some((id, value))
    }

    /// The ids of `list`, front (oldest) to back (newest), with values.
    pub fn iter(&self, list: usize) -> impl Iterator<Item = (EntryId, T)> + '_ {
        let mut at = self.heads[list];
        std::iter::from_fn(move || {
            if at == NIL {
                return None;
            }
            let node = &self.nodes[at as usize];
            let item = (self.id_at(at), node.value);
            at = node.next;
            Some(item)
        })
    }

    fn id_at(&self, slot: u32) -> EntryId {
        (u64::from(self.nodes[slot as usize].generation) << 32) | u64::from(slot)
    }

    fn unlink(&mut self, slot: u32) {
        let SlotNode { prev, next, list, .. } = self.nodes[slot as usize];
        let list = usize::from(list);
        if prev == NIL {
            self.heads[list] = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tails[list] = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
        self.lens[list] -= 1;
    }

    fn link_back(&mut self, list: usize, slot: u32) {
        let tail = self.tails[list];
        let node = &mut self.nodes[slot as usize];
        node.prev = tail;
        node.next = NIL;
        if tail == NIL {
            self.heads[list] = slot;
        } else {
            self.nodes[tail as usize].next = slot;
        }
        self.tails[list] = slot;
        self.lens[list] += 1;
    }
}

#[cfg(test)]
mod lists_tests {
    use super::*;

    #[test]
    fn lists_share_a_table_and_match_a_model_through_churn() {
        // A model: one VecDeque per list, ids unique across lists.
        let mut lists = IdLists::<u64, 3>::with_capacity(4);
        let mut model: [std::collections::VecDeque<(EntryId, u64)>; 3] = Default::default();
        let mut rng = crate::rng::SplitMix64::new(7);
        let mut generation = [0u64; 16];
        for step in 0..20_000u64 {
            let slot = rng.below(16);
            let id = (generation[slot as usize] << 32) | slot;
            let list = rng.below(3) as usize;
            match rng.below(5) {
                0 | 1 => {
                    let held = model.iter_mut().enumerate().find_map(|(l, q)| {
                        let at = q.iter().position(|&(i, _)| i == id)?;
                        q.remove(at).map(|(_, v)| (l, v))
                    });
                    model[list].push_back((id, step));
                    assert_eq!(lists.push_back(list, id, step), held);
                }
                2 => {
                    let expected = model.iter_mut().enumerate().find_map(|(l, q)| {
                        let at = q.iter().position(|&(i, _)| i == id)?;
                        q.remove(at).map(|(_, v)| (l, v))
                    });
                    assert_eq!(lists.remove(id), expected);
                    // The slot's next entry gets a new generation.
                    generation[slot as usize] += 1;
                    let stale = ((generation[slot as usize] - 1) << 32) | slot;
                    assert!(!lists.contains(stale));
                }
                3 => assert_eq!(lists.pop_front(list), model[list].pop_front()),
                _ => {
                    let at = model[list].iter().position(|&(i, _)| i == id);
                    assert_eq!(lists.move_to_back(id), model.iter().any(|q| q.iter().any(|&(i, _)| i == id)));
                    if let Some(at) = at {
                        let item = model[list].remove(at).expect("present");
                        model[list].push_back(item);
                    } else if let Some(l) = model.iter().position(|q| q.iter().any(|&(i, _)| i == id)) {
                        let at = model[l].iter().position(|&(i, _)| i == id).expect("present");
                        let item = model[l].remove(at).expect("present");
                        model[l].push_back(item);
                    }
                }
            }
            for (l, q) in model.iter().enumerate() {
                assert_eq!(lists.len(l), q.len());
                assert!(lists.iter(l).eq(q.iter().copied()), "list {l} at step {step}");
            }
        }
    }

    #[test]
    fn links_cost_12_bytes_and_a_list_tag() {
        // A 12-byte value aligned to 4 (S3-FIFO's) makes a 28-byte entry.
        assert_eq!(size_of::<SlotNode<[u32; 3]>>(), 28);
        assert_eq!(size_of::<SlotNode<u64>>(), 24);
    }

    #[test]
    fn a_stale_id_of_a_reused_slot_is_not_found() {
        let mut lists = IdLists::<u8, 2>::with_capacity(0);
        let old = 5u64;
        let new = (1u64 << 32) | 5;
        assert_eq!(lists.push_back(0, old, 1), None);
        assert_eq!(lists.remove(new), None);
        assert_eq!(lists.push_back(1, new, 2), Some((0, 1)), "the older id is handed back");
        assert!(!lists.contains(old));
        assert!(lists.is_empty(0), "the old id left its list with its slot");
        assert_eq!(lists.get(new), Some((1, 2)));
        assert!(lists.is_empty(0));
        assert_eq!(lists.len(1), 1);
    }
}

/// A map from 64-bit keys (key hashes) to small values, for state that
/// outlives entries (ghost lists, frequency tables). Open addressing with
/// linear probing and backward-shift deletion: no tombstones, so it never
/// rehashes in place, and it grows only past the size it was made for.
///
/// Keys and values are kept in two arrays, with key 0 marking a free slot
/// (the key 0 itself is held aside): a probe reads 8 bytes a slot, and a
/// slot costs `8 + size_of::<V>()` bytes (two slots per key the table was
/// sized for), where a slot of `Option<(u64, V)>` would cost 8 more.
#[derive(Clone, Debug)]
pub struct KeyMap<V: Copy + Default> {
    keys: Vec<u64>,
    values: Vec<V>,
    /// The value of key 0, which cannot live in the table.
    zero: Option<V>,
    len: usize,
}

impl<V: Copy + Default> KeyMap<V> {
    /// A map with room for `n` keys at under 50% load.
    pub fn with_capacity(n: usize) -> Self {
        let size = (n.max(4) * 2).next_power_of_two();
        Self { keys: vec![0; size], values: vec![V::default(); size], zero: None, len: 0 }
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
        (mixed >> 32) as usize & (self.keys.len() - 1)
    }

    /// The table position of a non-zero `key`.
    fn position(&self, key: u64) -> Option<usize> {
        let mask = self.keys.len() - 1;
        let mut i = self.home(key);
        loop {
            match self.keys[i] {
                0 => return None,
                k if k == key => return Some(i),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: u64) -> Option<V> {
        if key == 0 {
            return self.zero;
        }
        self.position(key).map(|i| self.values[i])
    }

    /// Whether `key` is held.
    pub fn contains(&self, key: u64) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`, returning the old value.
    pub fn insert(&mut self, key: u64, value: V) -> Option<V> {
        if key == 0 {
            let old = self.zero.replace(value);
            self.len += usize::from(old.is_none());
            return old;
        }
        if let Some(i) = self.position(key) {
            return Some(std::mem::replace(&mut self.values[i], value));
        }
        if (self.len + 1) * 2 > self.keys.len() {
            self.grow();
        }
        let mask = self.keys.len() - 1;
        let mut i = self.home(key);
        while self.keys[i] != 0 {
            i = (i + 1) & mask;
        }
        self.keys[i] = key;
        self.values[i] = value;
        self.len += 1;
        None
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: u64) -> Option<V> {
        if key == 0 {
            let old = self.zero.take();
            self.len -= usize::from(old.is_some());
            return old;
        }
        let mut hole = self.position(key)?;
        let removed = self.values[hole];
        self.keys[hole] = 0;
        self.len -= 1;
        // Shift later members of the probe run back into the hole.
        let mask = self.keys.len() - 1;
        let mut i = (hole + 1) & mask;
        while self.keys[i] != 0 {
            let k = self.keys[i];
            let home = self.home(k);
            // Move k if its home is not in the cyclic range (hole, i].
            let in_range = if hole <= i { hole < home && home <= i } else { hole < home || home <= i };
            if !in_range {
                self.keys[hole] = k;
                self.values[hole] = self.values[i];
                self.keys[i] = 0;
                hole = i;
            }
            i = (i + 1) & mask;
        }
        Some(removed)
    }

    fn grow(&mut self) {
        let keys = std::mem::take(&mut self.keys);
        let values = std::mem::take(&mut self.values);
        self.keys = vec![0; keys.len() * 2];
        self.values = vec![V::default(); keys.len() * 2];
        self.len = usize::from(self.zero.is_some());
        for (k, v) in keys.into_iter().zip(values).filter(|&(k, _)| k != 0) {
            self.insert(k, v);
        }
    }
}

/// A key's place in a [`Ghost`]: 8 bytes, so a slot of the ghost's table
/// costs 16 (32 per key it has room for).
#[derive(Clone, Copy, Debug, Default)]
struct Remembered {
    /// Tells the key's live queue entry from leftovers of earlier visits;
    /// wraps, which would need four billion inserts while a leftover waits.
    seq: u32,
    /// The weight the ghost was charged (saturated; refunded alike).
    weight: u32,
}

/// A bounded FIFO of key hashes with weights: the ghost list of S3-FIFO,
/// 2Q and ARC. Remembers keys recently evicted; the oldest are forgotten
/// once the total weight passes the limit.
#[derive(Clone, Debug)]
pub struct Ghost {
    /// `(key, sequence)` in insertion order; entries whose sequence no longer
    /// matches `members` were removed and are skipped.
    queue: std::collections::VecDeque<(u64, u32)>,
    /// Live keys: their sequence and weight.
    members: KeyMap<Remembered>,
    weight: u64,
    limit: u64,
    /// Also a bound on the number of keys: with byte weights a ghost of
    /// small entries could otherwise outgrow the table sized for it.
    max_keys: usize,
    next_seq: u32,
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
            Some(held) => {
                self.weight -= u64::from(held.weight);
                true
            }
            None => false,
        }
    }

    /// The live entry of `key` in the queue is `(key, seq)`.
    fn is_live(&self, key: u64, seq: u32) -> bool {
        self.members.get(key).is_some_and(|held| held.seq == seq)
    }

    /// Remembers `key` (no-op if already remembered), forgetting the oldest
    /// keys while over the limit.
    pub fn insert(&mut self, key: u64, weight: u64) {
        if self.members.contains(key) {
            return;
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let weight = u32::try_from(weight).unwrap_or(u32::MAX);
        // Make room first: one key over the table's size would double it
        // (a rehash of every key inside one call) for a moment's need.
        while self.members.len() >= self.max_keys {
            if self.pop_oldest().is_none() {
                break;
            }
        }
        self.members.insert(key, Remembered { seq, weight });
        self.queue.push_back((key, seq));
        self.weight += u64::from(weight);
        while self.weight > self.limit || self.members.len() > self.max_keys {
            if self.pop_oldest().is_none() {
                break;
            }
        }
        // Drop removed keys' leftovers as they reach the front: a little work
        // per insert.
        while let Some(&(front, seq)) = self.queue.front() {
            if self.is_live(front, seq) {
                break;
            }
            self.queue.pop_front();
        }
        // Leftovers behind a long-lived front key would pile up without
        // bound; past twice the live keys, one pass drops them. It runs at
        // most once per `max_keys` inserts, inside an eviction call, whose
        // budget scales with the capacity.
        if self.queue.len() > 2 * self.max_keys + 64 {
            let Self { queue, members, .. } = self;
            queue.retain(|&(key, seq)| members.get(key).is_some_and(|held| held.seq == seq));
        }
    }

    /// Forgets the oldest key, returning it and its weight.
    pub fn pop_oldest(&mut self) -> Option<(u64, u64)> {
        while let Some((key, seq)) = self.queue.pop_front() {
            if self.is_live(key, seq) {
                let held = self.members.remove(key)?;
                self.weight -= u64::from(held.weight);
                return Some((key, u64::from(held.weight)));
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
    fn ghost_queue_stays_bounded_behind_a_long_lived_key() {
        let mut ghost = Ghost::new(u64::MAX, 8);
        ghost.insert(1, 1);
        for key in 2..100_000 {
            ghost.insert(key, 1);
            assert!(ghost.remove(key));
            assert!(ghost.queue.len() <= 2 * 8 + 65, "{} queued at {key}", ghost.queue.len());
        }
        assert!(ghost.contains(1) && ghost.len() == 1);
    }

    #[test]
    fn a_full_ghost_makes_room_before_it_inserts_and_never_grows_its_table() {
        let mut ghost = Ghost::new(u64::MAX, 1024);
        let slots = ghost.members.keys.len();
        for key in 1..10_000 {
            ghost.insert(key, 1);
        }
        assert_eq!(ghost.len(), 1024);
        assert_eq!(ghost.members.keys.len(), slots);
        assert!(ghost.contains(9_999) && !ghost.contains(8_975));
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
