//! Leases per event with fencing tokens.
//!
//! A lease says who may allocate seats of an event right now; its token says in which order the
//! holders came. The store keeps the highest token that wrote to an event and refuses lower ones
//! (see `store::queries::apply_fenced_batch`), so a holder that lost its lease (paused, expired)
//! cannot commit, whatever it believes. The lease is an optimisation against wasted work; the
//! fence is what makes it safe (Kleppmann, "How to do distributed locking").

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::sync::{lock, Arc, Mutex};

/// A fencing token: strictly increasing per event across all holders.
pub type Token = i64;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    /// The coordinator cannot be reached; allocation must stop (never guess).
    #[error("lease coordinator unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, Default)]
struct Slot {
    /// Owner and expiry (milliseconds on the table's clock) of the current lease, if any.
    holder: Option<(u64, u64)>,
    /// The last token handed out for this event.
    last: Token,
}

/// The in-process lease table of the embedded mode.
///
/// Time is passed in (`now_ms`) rather than read, so the loom models can drive expiry by hand.
#[derive(Debug, Default)]
pub struct LeaseTable {
    slots: Mutex<HashMap<i64, Slot>>,
}

impl LeaseTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the lease of `event` for `owner` unless another live holder has it. The token is
    /// above every token handed out before and above `floor` (the highest token the database has
    /// seen, which survives restarts where this table does not).
    pub fn acquire(
        &self,
        event: i64,
        owner: u64,
        floor: Token,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Option<Token> {
        let mut slots = lock(&self.slots);
        let slot = slots.entry(event).or_default();
        if let Some((holder, expires)) = slot.holder {
            if holder != owner && expires > now_ms {
                return None;
            }
        }
        let token = slot.last.max(floor) + 1;
        slot.last = token;
        slot.holder = Some((owner, now_ms.saturating_add(ttl_ms)));
        Some(token)
    }

    /// Gives the lease back if `owner` still holds it under `token` (compare-and-delete).
    pub fn release(&self, event: i64, owner: u64, token: Token) -> bool {
        let mut slots = lock(&self.slots);
        match slots.get_mut(&event) {
            Some(slot) if slot.holder.map(|h| h.0) == Some(owner) && slot.last == token => {
                slot.holder = None;
                true
            }
            _ => false,
        }
    }

    /// The holder of `event`'s lease, if it is still live at `now_ms`.
    pub fn holder(&self, event: i64, now_ms: u64) -> Option<u64> {
        let slots = lock(&self.slots);
        slots
            .get(&event)
            .and_then(|s| s.holder)
            .filter(|(_, exp)| *exp > now_ms)
            .map(|(o, _)| o)
    }
}

/// The lease an event actor talks to: in-process (embedded mode) or on Redis (cluster mode).
#[derive(Clone)]
pub enum Lease {
    InProcess {
        table: Arc<LeaseTable>,
        epoch: Instant,
        ttl: Duration,
    },
    Redis {
        lease: std::sync::Arc<super::redis::RedisLease>,
        replica: std::sync::Arc<str>,
    },
}

impl Lease {
    pub fn in_process(ttl: Duration) -> Self {
        Lease::InProcess {
            table: Arc::new(LeaseTable::new()),
            epoch: Instant::now(),
            ttl,
        }
    }

    /// `replica` makes owners unique across processes (actor generations are per process).
    pub fn redis(lease: super::redis::RedisLease, replica: &str) -> Self {
        // Shared: every event actor holds a clone of its lease handle.
        Lease::Redis {
            lease: std::sync::Arc::new(lease),
            replica: replica.into(),
        }
    }

    /// The in-process lease answers at once, so the event actor takes it without a future and
    /// a trip through its context (one per batch: with bookings spread over many events, every
    /// booking is a batch). `None` on Redis: ask `acquire`.
    pub fn acquire_now(&self, event: i64, owner: u64, floor: Token) -> Option<Option<Token>> {
        match self {
            Lease::InProcess { table, epoch, ttl } => {
                let now = epoch.elapsed().as_millis() as u64;
                Some(table.acquire(event, owner, floor, now, ttl.as_millis() as u64))
            }
            Lease::Redis { .. } => None,
        }
    }

    /// Gives an in-process lease back at once; false on Redis (use `release`).
    pub fn release_now(&self, event: i64, owner: u64, token: Token) -> bool {
        match self {
            Lease::InProcess { table, .. } => {
                table.release(event, owner, token);
                true
            }
            Lease::Redis { .. } => false,
        }
    }

    /// One round trip per batch: take (or renew) the lease, or learn that someone else has it.
    pub async fn acquire(
        &self,
        event: i64,
        owner: u64,
        floor: Token,
    ) -> Result<Option<Token>, LeaseError> {
        match self {
            Lease::InProcess { .. } => Ok(self.acquire_now(event, owner, floor).flatten()),
            Lease::Redis { lease, replica } => {
                lease
                    .acquire(event, &format!("{replica}:{owner}"), floor)
                    .await
            }
        }
    }

    /// Tells the other replicas that a cancellation gave seats of `event` back, so that their
    /// sold-out fast path lets requests through again. A hint: a lost message leaves a replica
    /// answering "sold out" from its flag until its actor for the event passivates (idle) —
    /// never a wrong sale. Nothing to tell in embedded mode.
    pub async fn announce_seats_returned(&self, event: i64) {
        if let Lease::Redis { lease, .. } = self {
            if let Err(e) = lease.announce_seats_returned(event).await {
                tracing::debug!(event_id = event, error = %e, "seats-returned notice not sent");
            }
        }
    }

    pub async fn release(&self, event: i64, owner: u64, token: Token) -> Result<(), LeaseError> {
        match self {
            Lease::InProcess { .. } => {
                self.release_now(event, owner, token);
                Ok(())
            }
            Lease::Redis { lease, replica } => {
                lease.release(event, &format!("{replica}:{owner}")).await
            }
        }
    }
}

#[cfg(all(test, not(ticketd_loom)))]
mod tests {
    use super::*;

    #[test]
    fn one_holder_and_increasing_tokens() {
        let t = LeaseTable::new();
        let a = t.acquire(1, 10, 0, 0, 100).unwrap();
        assert_eq!(t.acquire(1, 20, 0, 50, 100), None, "held by 10");
        assert!(t.release(1, 10, a));
        let b = t.acquire(1, 20, 0, 60, 100).unwrap();
        assert!(b > a);
        // 20 stalls past its expiry: 30 takes over with a higher token; 20 cannot release it.
        let c = t.acquire(1, 30, 0, 200, 100).unwrap();
        assert!(c > b);
        assert!(!t.release(1, 20, b));
        assert_eq!(t.holder(1, 201), Some(30));
    }

    #[test]
    fn floor_from_the_database_wins_after_restart() {
        let t = LeaseTable::new();
        assert_eq!(t.acquire(5, 1, 41, 0, 100), Some(42));
        assert_eq!(
            t.acquire(6, 1, 0, 0, 100),
            Some(1),
            "events are independent"
        );
    }
}
