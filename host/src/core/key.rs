//! Keys as a shard stores them: short keys (most cache keys are a prefix
//! and an id) live inside the slot, so they cost no allocation of their own
//! and comparing one during a lookup reads no other cache line.

/// Longest key kept inline; with the tag and length the type is 24 bytes,
/// the size of a boxed slice plus its tag.
const INLINE: usize = 22;

/// A stored key. See the module docs.
#[derive(Clone, Debug)]
pub enum Key {
    /// Up to [`INLINE`] bytes, in place.
    Inline {
        /// Bytes used in `bytes`.
        len: u8,
        /// The key, zero-padded.
        bytes: [u8; INLINE],
    },
    /// Longer keys, on the heap.
    Heap(Box<[u8]>),
}

impl Key {
    /// Stores `key`, inline when it fits.
    pub fn new(key: &[u8]) -> Self {
        if key.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..key.len()].copy_from_slice(key);
            Self::Inline { len: key.len() as u8, bytes }
        } else {
            Self::Heap(key.into())
        }
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Heap(bytes) => bytes,
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether it is the empty key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_inline_and_every_key_round_trips() {
        assert_eq!(size_of::<Key>(), 24);
        for len in [0usize, 1, 21, 22, 23, 64, 1000] {
            let key: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let stored = Key::new(&key);
            assert_eq!(stored.as_bytes(), &key[..]);
            assert_eq!(stored.len(), len);
            assert_eq!(matches!(stored, Key::Inline { .. }), len <= INLINE, "len {len}");
        }
    }
}
