//! The outbox's delivery side: how committed booking ids reach the finalizers.
//!
//! Bookings are the outbox: a PENDING row is the durable record that a ticket is owed, and the
//! sweeper re-queues PENDING bookings that are not on their way. The queues here may therefore be
//! bounded and lossy: a push that does not fit is dropped and found again by the sweeper.
//!
//! Embedded mode uses `LocalQueue` (in-process lanes, one per finalizer actor); cluster mode a
//! Redis Stream (`super::stream`). `Outbox` is what the writer pushes to after each commit.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;
use tracing::warn;

use super::stream::StreamPusher;
use crate::ticket::TicketFacts;

/// A booking owed a ticket, as queued: with the facts its ticket vouches for when the writer
/// pushed it at commit (the finalizer then signs without reading the booking back), with its id
/// only when the sweeper or a replay found it (the finalizer reads those, many in one query).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owed {
    pub booking_id: i64,
    pub facts: Option<TicketFacts>,
}

impl Owed {
    pub fn id(booking_id: i64) -> Self {
        Owed {
            booking_id,
            facts: None,
        }
    }
}

impl From<TicketFacts> for Owed {
    fn from(facts: TicketFacts) -> Self {
        Owed {
            booking_id: facts.booking_id,
            facts: Some(facts),
        }
    }
}

/// Where the writer sends committed bookings.
#[derive(Clone)]
pub enum Outbox {
    Local(LocalQueue),
    Stream(StreamPusher),
}

impl Outbox {
    /// Never blocks: callable from the writer thread.
    pub fn push(&self, committed: Vec<TicketFacts>) {
        match self {
            Outbox::Local(q) => committed.into_iter().for_each(|f| q.push(f.into())),
            Outbox::Stream(p) => p.push(committed),
        }
    }
}

/// The in-process queue of the embedded mode, with its own dead letters: a booking whose
/// issuance failed `max_deliveries` times is parked (not swept again) until replayed.
#[derive(Clone)]
pub struct LocalQueue {
    lanes: Arc<Vec<mpsc::Sender<Owed>>>,
    book: Arc<Mutex<Bookkeeping>>,
    max_deliveries: usize,
    dropped: Arc<AtomicUsize>,
}

/// What the queue knows of the bookings it was handed, behind one lock: the writer takes it once
/// per booking it pushes, the finalizers once per booking they close.
#[derive(Default)]
struct Bookkeeping {
    /// Ids queued or being issued, so the sweeper does not queue them twice.
    tracked: IdSet,
    failures: HashMap<i64, usize>,
    dead: HashSet<i64>,
}

impl LocalQueue {
    /// A queue with `lanes` consumers (one per finalizer actor), each holding up to `per_lane`.
    pub fn new(
        lanes: usize,
        per_lane: usize,
        max_deliveries: usize,
    ) -> (Self, Vec<mpsc::Receiver<Owed>>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..lanes.max(1))
            .map(|_| mpsc::channel(per_lane.max(1)))
            .unzip();
        let q = LocalQueue {
            lanes: Arc::new(txs),
            book: Arc::default(),
            max_deliveries: max_deliveries.max(1),
            dropped: Arc::default(),
        };
        (q, rxs)
    }

    fn book(&self) -> MutexGuard<'_, Bookkeeping> {
        // Every step under the lock leaves the bookkeeping whole: a panic elsewhere breaks nothing.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a booking for issuance unless it is queued, in flight or dead-lettered.
    pub fn push(&self, owed: Owed) {
        let booking_id = owed.booking_id;
        {
            let mut b = self.book();
            if b.dead.contains(&booking_id) || !b.tracked.insert(booking_id) {
                return;
            }
        }
        let lane = &self.lanes[(booking_id.unsigned_abs() % self.lanes.len() as u64) as usize];
        if lane.try_send(owed).is_err() {
            self.book().tracked.remove(booking_id);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The booking was issued (or needs no issuing).
    pub fn done(&self, booking_id: i64) {
        let mut b = self.book();
        b.failures.remove(&booking_id);
        b.tracked.remove(booking_id);
    }

    /// An issuance failed: the sweeper retries it, unless it failed too often.
    pub fn failed(&self, booking_id: i64) {
        let mut b = self.book();
        let n = {
            let f = b.failures.entry(booking_id).or_insert(0);
            *f += 1;
            *f
        };
        if n >= self.max_deliveries {
            warn!(booking_id, deliveries = n, "booking dead-lettered");
            crate::metrics::handles().dead_lettered.increment(1);
            b.failures.remove(&booking_id);
            b.dead.insert(booking_id);
        }
        b.tracked.remove(booking_id);
    }

    pub fn is_tracked(&self, booking_id: i64) -> bool {
        self.book().tracked.contains(booking_id)
    }

    pub fn in_flight(&self) -> usize {
        self.book().tracked.len()
    }

    pub fn dead_letters(&self) -> u64 {
        self.book().dead.len() as u64
    }

    /// Moves every dead letter back into the queue; returns how many.
    pub fn replay(&self) -> u64 {
        let ids: Vec<i64> = self.book().dead.drain().collect();
        for &id in &ids {
            self.push(Owed::id(id));
        }
        ids.len() as u64
    }

    /// Pushes dropped because a lane was full (the sweeper picks them up).
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A set of booking ids as bits in pages of 4,096 ids. The ids in flight are a few recent ranges
/// (the writer hands them out in order), so an insert touches a page already in cache and a
/// handful of pages hold them all; a hash set of the ~100,000 ids in flight at a 5 s delay took
/// a cache miss per insert (`DashSet::insert`: 0.5 µs of the writer's ~7.5 µs per booking, perf).
#[derive(Default)]
struct IdSet {
    pages: HashMap<i64, Page>,
    len: usize,
}

/// One page: which of its 4,096 ids are in, and how many (an empty page is dropped).
struct Page {
    bits: Box<[u64; 64]>,
    count: u32,
}

impl IdSet {
    const PAGE_BITS: i64 = 4096;

    /// The page of `id` and the word and bit of `id` in it.
    fn at(id: i64) -> (i64, usize, u64) {
        let bit = id.rem_euclid(Self::PAGE_BITS) as usize;
        (id.div_euclid(Self::PAGE_BITS), bit / 64, 1u64 << (bit % 64))
    }

    /// Adds `id`; false if it was already in.
    fn insert(&mut self, id: i64) -> bool {
        let (page, word, mask) = Self::at(id);
        let p = self.pages.entry(page).or_insert_with(|| Page {
            bits: Box::new([0; 64]),
            count: 0,
        });
        if p.bits[word] & mask != 0 {
            return false;
        }
        p.bits[word] |= mask;
        p.count += 1;
        self.len += 1;
        true
    }

    /// Takes `id` out; false if it was not in.
    fn remove(&mut self, id: i64) -> bool {
        let (page, word, mask) = Self::at(id);
        let Some(p) = self.pages.get_mut(&page) else {
            return false;
        };
        if p.bits[word] & mask == 0 {
            return false;
        }
        p.bits[word] &= !mask;
        p.count -= 1;
        self.len -= 1;
        if p.count == 0 {
            self.pages.remove(&page);
        }
        true
    }

    fn contains(&self, id: i64) -> bool {
        let (page, word, mask) = Self::at(id);
        self.pages
            .get(&page)
            .is_some_and(|p| p.bits[word] & mask != 0)
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The set against a plain `HashSet`, over ids at page edges, negative ones and a spread of
    /// others, inserted and removed twice each in a shuffled order.
    #[test]
    fn an_id_set_is_a_set() {
        let mut ids: Vec<i64> = vec![0, 1, 4095, 4096, 4097, -1, -4096, -4097, i64::MAX, i64::MIN];
        ids.extend((0..2_000).map(|i| i * 37 + 1_000_000));
        let mut order: Vec<i64> = ids.iter().chain(ids.iter()).copied().collect();
        // A fixed shuffle: every id's two turns at scattered places.
        order
            .sort_by_key(|&id| (id.wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as i64)).rotate_left(17));
        let (mut set, mut model) = (IdSet::default(), HashSet::new());
        for (turn, &id) in order.iter().enumerate() {
            let inserting = turn % 3 != 2;
            if inserting {
                assert_eq!(set.insert(id), model.insert(id), "insert {id}");
            } else {
                assert_eq!(set.remove(id), model.remove(&id), "remove {id}");
            }
            assert_eq!(set.len(), model.len());
        }
        for &id in &ids {
            assert_eq!(set.contains(id), model.contains(&id), "contains {id}");
            let next = id.wrapping_add(1);
            assert_eq!(set.contains(next), model.contains(&next), "contains {next}");
        }
        for &id in &ids {
            set.remove(id);
        }
        assert_eq!(set.len(), 0);
        assert!(set.pages.is_empty(), "empty pages are dropped");
    }

    /// The queue's bookkeeping: a push is tracked until done; a booking pushed twice is queued
    /// once; failures count up to the dead letter, which a replay queues again.
    #[tokio::test]
    async fn the_local_queue_tracks_each_booking_once() {
        let (q, mut lanes) = LocalQueue::new(1, 16, 2);
        q.push(Owed::id(7));
        q.push(Owed::id(7));
        assert!(q.is_tracked(7));
        assert_eq!(q.in_flight(), 1);
        assert_eq!(lanes[0].try_recv().map(|o| o.booking_id), Ok(7));
        assert!(lanes[0].try_recv().is_err(), "queued once");
        q.failed(7);
        assert!(!q.is_tracked(7), "the sweeper may queue it again");
        q.push(Owed::id(7));
        q.failed(7);
        assert_eq!(q.dead_letters(), 1);
        q.push(Owed::id(7));
        assert!(!q.is_tracked(7), "a dead letter is not queued");
        assert_eq!(q.replay(), 1);
        assert_eq!(q.dead_letters(), 0);
        assert!(q.is_tracked(7));
        q.done(7);
        assert_eq!(q.in_flight(), 0);
    }
}
