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

#[cfg(test)]
mod map_tests {
    use super::*;

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
