//! The outbox's delivery side: how committed booking ids reach the finalizers.
//!
//! Bookings are the outbox: a PENDING row is the durable record that a ticket is owed, and the
//! sweeper re-queues PENDING bookings that are not on their way. The queues here may therefore be
//! bounded and lossy: a push that does not fit is dropped and found again by the sweeper.
//!
//! Embedded mode uses `LocalQueue` (in-process lanes, one per finalizer actor); cluster mode a
//! Redis Stream (`super::stream`). `Outbox` is what the writer pushes to after each commit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::{DashMap, DashSet};
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
    /// Ids queued or being issued, so the sweeper does not queue them twice.
    tracked: Arc<DashSet<i64>>,
    failures: Arc<DashMap<i64, usize>>,
    dead: Arc<DashSet<i64>>,
    max_deliveries: usize,
    dropped: Arc<AtomicUsize>,
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
            tracked: Arc::default(),
            failures: Arc::default(),
            dead: Arc::default(),
            max_deliveries: max_deliveries.max(1),
            dropped: Arc::default(),
        };
        (q, rxs)
    }

    /// Queues a booking for issuance unless it is queued, in flight or dead-lettered.
    pub fn push(&self, owed: Owed) {
        let booking_id = owed.booking_id;
        if self.dead.contains(&booking_id) || !self.tracked.insert(booking_id) {
            return;
        }
        let lane = &self.lanes[(booking_id.unsigned_abs() % self.lanes.len() as u64) as usize];
        if lane.try_send(owed).is_err() {
            self.tracked.remove(&booking_id);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The booking was issued (or needs no issuing).
    pub fn done(&self, booking_id: i64) {
        self.failures.remove(&booking_id);
        self.tracked.remove(&booking_id);
    }

    /// An issuance failed: the sweeper retries it, unless it failed too often.
    pub fn failed(&self, booking_id: i64) {
        let n = {
            let mut f = self.failures.entry(booking_id).or_insert(0);
            *f += 1;
            *f
        };
        if n >= self.max_deliveries {
            warn!(booking_id, deliveries = n, "booking dead-lettered");
            crate::metrics::handles().dead_lettered.increment(1);
            self.failures.remove(&booking_id);
            self.dead.insert(booking_id);
        }
        self.tracked.remove(&booking_id);
    }

    pub fn is_tracked(&self, booking_id: i64) -> bool {
        self.tracked.contains(&booking_id)
    }

    pub fn in_flight(&self) -> usize {
        self.tracked.len()
    }

    pub fn dead_letters(&self) -> u64 {
        self.dead.len() as u64
    }

    /// Moves every dead letter back into the queue; returns how many.
    pub fn replay(&self) -> u64 {
        let ids: Vec<i64> = self.dead.iter().map(|r| *r).collect();
        for id in &ids {
            self.dead.remove(id);
            self.push(Owed::id(*id));
        }
        ids.len() as u64
    }

    /// Pushes dropped because a lane was full (the sweeper picks them up).
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::Relaxed)
    }
}
