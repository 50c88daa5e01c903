//! What the disk said a moment ago, so that hits on small things (manifests, tag records) need
//! no disk: a bounded, short-lived cache of the disk, which stays the truth.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long a remembered value answers before the disk is read again: a change made by another
/// process (a `cache rm`) shows within this time.
pub const FRESH_FOR: Duration = Duration::from_secs(1);

/// Values by key, each for [`FRESH_FOR`] after it was read, `max` at most.
pub struct Memo<K, V> {
    max: usize,
    map: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Memo<K, V> {
    /// An empty memo of `max` entries at most.
    pub fn new(max: usize) -> Memo<K, V> {
        Memo {
            max,
            map: Mutex::default(),
        }
    }

    /// The value read less than [`FRESH_FOR`] ago.
    pub fn get(&self, key: &K) -> Option<V> {
        let map = self.map.lock();
        let (value, read) = map.get(key)?;
        (read.elapsed() < FRESH_FOR).then(|| value.clone())
    }

    /// Remembers what the disk holds for `key` now.
    pub fn put(&self, key: K, value: V) {
        let mut map = self.map.lock();
        if map.len() >= self.max && !map.contains_key(&key) {
            map.retain(|_, (_, read)| read.elapsed() < FRESH_FOR);
            if map.len() >= self.max {
                map.clear();
            }
        }
        map.insert(key, (value, Instant::now()));
    }

    /// Forgets everything (the index was rewritten).
    pub fn clear(&self) {
        self.map.lock().clear();
    }

    /// Forgets `key` (it changed, or is gone).
    pub fn remove(&self, key: &K) {
        self.map.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_forgets() {
        let memo = Memo::new(2);
        memo.put(1, "a");
        memo.put(2, "b");
        assert_eq!(memo.get(&1), Some("a"));
        memo.put(3, "c"); // full of fresh entries: starts over rather than grow
        assert_eq!(memo.get(&1), None);
        assert_eq!(memo.get(&3), Some("c"));
        memo.remove(&3);
        assert_eq!(memo.get(&3), None);
    }
}
