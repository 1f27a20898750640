//! The in-process finalization queue of the embedded mode.
//!
//! Bookings are the outbox: a PENDING row is the durable record that a ticket is owed, and the
//! sweeper re-queues any PENDING booking that is not in flight. This queue is therefore allowed
//! to be small and lossy: when it is full a push is dropped (and found again by the sweeper)
//! instead of growing without bound. `tracked` holds the ids queued or being issued, so the
//! sweeper does not queue what is already on its way.

use dashmap::DashSet;
use tokio::sync::mpsc;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The producer side, shared by the writer (after each commit) and the sweeper.
#[derive(Clone)]
pub struct FinalizeQueue {
    lanes: Arc<Vec<mpsc::Sender<i64>>>,
    tracked: Arc<DashSet<i64>>,
    dropped: Arc<AtomicUsize>,
}

impl FinalizeQueue {
    /// A queue with `lanes` consumers (one per finalizer actor), each holding up to `per_lane`.
    pub fn new(lanes: usize, per_lane: usize) -> (Self, Vec<mpsc::Receiver<i64>>) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..lanes.max(1))
            .map(|_| mpsc::channel(per_lane.max(1)))
            .unzip();
        let q = FinalizeQueue {
            lanes: Arc::new(txs),
            tracked: Arc::new(DashSet::new()),
            dropped: Arc::new(AtomicUsize::new(0)),
        };
        (q, rxs)
    }

    /// Queues a booking for issuance unless it is already queued or in flight. Never blocks:
    /// callable from the writer thread.
    pub fn push(&self, booking_id: i64) {
        if !self.tracked.insert(booking_id) {
            return;
        }
        let lane = &self.lanes[(booking_id.unsigned_abs() % self.lanes.len() as u64) as usize];
        if lane.try_send(booking_id).is_err() {
            self.tracked.remove(&booking_id);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The booking left the pipeline (issued, or failed and left for the sweeper).
    pub fn done(&self, booking_id: i64) {
        self.tracked.remove(&booking_id);
    }

    pub fn is_tracked(&self, booking_id: i64) -> bool {
        self.tracked.contains(&booking_id)
    }

    /// Bookings queued or being issued right now.
    pub fn in_flight(&self) -> usize {
        self.tracked.len()
    }

    /// Pushes dropped because a lane was full (the sweeper picks them up).
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::Relaxed)
    }
}
