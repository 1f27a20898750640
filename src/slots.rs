//! Generation-checked slots: the shared-memory heart of the registry, with no actix inside, so
//! that `loom-tests` can model-check it.
//!
//! Each key (an event id) has at most one live slot, stamped with a generation number that is
//! never reused. `get_or_create` decides under the key's lock whether to create, so two first
//! requests racing for a new key get the same slot. `remove_if_generation` removes a slot only if
//! it still carries the caller's generation, so an actor that exits late never removes the
//! successor that replaced it.
//!
//! The normal build keeps the slots in a `DashMap` (sharded locks, reads that do not contend);
//! the loom build in a `crate::sync::Mutex<HashMap>`, whose every interleaving loom explores. The
//! two are the same contract: one lock around "look, then maybe insert" per key.

use crate::sync::{AtomicU64, Ordering};

/// A live value with the generation it was created under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot<V> {
    pub generation: u64,
    pub value: V,
}

pub struct Slots<V> {
    #[cfg(not(ticketd_loom))]
    map: dashmap::DashMap<i64, Slot<V>>,
    #[cfg(ticketd_loom)]
    map: crate::sync::Mutex<std::collections::HashMap<i64, Slot<V>>>,
    next_generation: AtomicU64,
}

impl<V: Clone> Default for Slots<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Clone> Slots<V> {
    pub fn new() -> Self {
        Slots {
            map: Default::default(),
            next_generation: AtomicU64::new(1),
        }
    }

    /// The live slot of `key`, created with `make(generation)` if there is none. `make` runs
    /// under the key's lock: keep it short and non-blocking.
    pub fn get_or_create(&self, key: i64, make: impl FnOnce(u64) -> V) -> Slot<V> {
        #[cfg(not(ticketd_loom))]
        {
            if let Some(s) = self.map.get(&key) {
                return s.clone();
            }
            self.map
                .entry(key)
                .or_insert_with(|| self.fresh(make))
                .clone()
        }
        #[cfg(ticketd_loom)]
        {
            let mut map = crate::sync::lock(&self.map);
            map.entry(key).or_insert_with(|| self.fresh(make)).clone()
        }
    }

    /// A new slot under a generation never used before.
    fn fresh(&self, make: impl FnOnce(u64) -> V) -> Slot<V> {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        Slot {
            generation,
            value: make(generation),
        }
    }

    /// Removes the slot of `key` if it still carries `generation`; true if it did.
    pub fn remove_if_generation(&self, key: i64, generation: u64) -> bool {
        #[cfg(not(ticketd_loom))]
        {
            self.map
                .remove_if(&key, |_, s| s.generation == generation)
                .is_some()
        }
        #[cfg(ticketd_loom)]
        {
            let mut map = crate::sync::lock(&self.map);
            if map.get(&key).is_some_and(|s| s.generation == generation) {
                map.remove(&key);
                true
            } else {
                false
            }
        }
    }

    pub fn get(&self, key: i64) -> Option<Slot<V>> {
        #[cfg(not(ticketd_loom))]
        {
            self.map.get(&key).map(|s| s.clone())
        }
        #[cfg(ticketd_loom)]
        {
            crate::sync::lock(&self.map).get(&key).cloned()
        }
    }

    pub fn len(&self) -> usize {
        #[cfg(not(ticketd_loom))]
        {
            self.map.len()
        }
        #[cfg(ticketd_loom)]
        {
            crate::sync::lock(&self.map).len()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The sold-out flag of an event, set by its actor once the committed count reaches capacity and
/// read by routes to answer 409 without a message. Cleared when a cancellation brings seats back
/// (by the actor that committed it, or, on other replicas, by the "seats returned" notice).
/// Release/Acquire makes whatever the actor knew when it set it visible to a reader that sees it.
#[derive(Debug, Default)]
pub struct SoldOut(crate::sync::AtomicBool);

impl SoldOut {
    pub fn new() -> Self {
        SoldOut(crate::sync::AtomicBool::new(false))
    }

    pub fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Seats came back: requests go to the actor again.
    pub fn clear(&self) {
        self.0.store(false, Ordering::Release);
    }

    pub fn is_sold_out(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[cfg(all(test, not(ticketd_loom)))]
mod tests {
    use super::*;

    #[test]
    fn generations_guard_removal() {
        let s: Slots<&str> = Slots::new();
        let a = s.get_or_create(1, |_| "a");
        assert_eq!(
            s.get_or_create(1, |_| "b"),
            a,
            "an existing slot is returned"
        );
        assert!(!s.remove_if_generation(1, a.generation + 1));
        assert!(s.remove_if_generation(1, a.generation));
        let b = s.get_or_create(1, |_| "b");
        assert!(b.generation > a.generation);
        assert!(
            !s.remove_if_generation(1, a.generation),
            "a late exit keeps the successor"
        );
        assert_eq!(s.get(1), Some(b));
    }
}
