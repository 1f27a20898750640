//! The reads of ticketd, whichever database holds the rows: each takes the read connection
//! `ReadPool::read` lends (`ReadConn`, SQLite's or PostgreSQL's) and runs that backend's
//! statement (`store::sqlite`, `store::postgres::queries`) — one `match`, no allocation, no
//! dynamic dispatch. The routes, actors and finalizers call only these (and use these types), so
//! they do not know which database they talk to.
//!
//! The writes are the persistence actor's (`actors::persistence`), per backend.

use super::postgres::queries as pg;
use super::sqlite as lite;
use super::{ReadConn, StoreError};
use crate::domain::{Booking, KeyScope};
use crate::ticket::TicketFacts;

pub use super::sqlite::{
    db_timestamp, iso_utc, BatchApplied, BookingOutcome, CancelOutcome, EventRow, FencedBatch,
    IssuedTicket, KeyRecord, NewBookingRow, PurgeCursor, Refusal, Report, SeatsSeen, TotalsDelta,
};

/// Runs the same read on whichever backend `$c` is: `read!(c, event(id))`.
macro_rules! read {
    ($c:expr, $f:ident($($arg:expr),*)) => {
        match $c {
            ReadConn::Sqlite(c) => Ok(lite::$f(c, $($arg),*)?),
            ReadConn::Postgres(c) => Ok(pg::$f(&mut **c, $($arg),*)?),
        }
    };
}

pub fn event(c: &mut ReadConn<'_>, id: i64) -> Result<Option<EventRow>, StoreError> {
    read!(c, event(id))
}

/// Up to `limit` events with ids above `after`, in id order (keyset pagination).
pub fn events_after(
    c: &mut ReadConn<'_>,
    after: i64,
    limit: i64,
) -> Result<Vec<EventRow>, StoreError> {
    read!(c, events_after(after, limit))
}

pub fn booking(c: &mut ReadConn<'_>, id: i64) -> Result<Option<Booking>, StoreError> {
    read!(c, booking(id))
}

/// The stored totals of `GET /report`.
pub fn report(c: &mut ReadConn<'_>) -> Result<Report, StoreError> {
    read!(c, report())
}

/// Ids of PENDING bookings after `after`, in id order; with `created_before` (stored format),
/// only those older.
pub fn pending_ids(
    c: &mut ReadConn<'_>,
    after: i64,
    created_before: Option<&str>,
    limit: usize,
) -> Result<Vec<i64>, StoreError> {
    read!(c, pending_ids(after, created_before, limit))
}

/// The facts of those of `ids` that are PENDING, in one read.
pub fn pending_facts(c: &mut ReadConn<'_>, ids: &[i64]) -> Result<Vec<TicketFacts>, StoreError> {
    read!(c, pending_facts(ids))
}

/// The live record of an idempotency key.
pub fn idempotency_key(
    c: &mut ReadConn<'_>,
    scope: KeyScope,
    key: &str,
    live_after_ms: i64,
) -> Result<Option<KeyRecord>, StoreError> {
    read!(c, idempotency_key(scope, key, live_after_ms))
}

/// The database answers (`/ready`).
pub fn ping(c: &mut ReadConn<'_>) -> Result<(), StoreError> {
    match c {
        ReadConn::Sqlite(c) => {
            c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
        }
        ReadConn::Postgres(c) => {
            c.simple_query("SELECT 1")?;
        }
    }
    Ok(())
}

/// What the store tests of both backends build their batches with (`sqlite::tests`,
/// `postgres::tests`): one home, so the two suites test the same batches.
#[cfg(test)]
pub(crate) mod test_batches {
    use super::{BatchApplied, BookingOutcome, FencedBatch, NewBookingRow};

    pub const T0: &str = "2024-01-01 00:00:00.000000";
    /// T0 in Unix ms, and the start of the keys' live window (a day before).
    pub const T0_MS: i64 = 1_704_067_200_000;
    pub const LIVE_MS: i64 = T0_MS - 86_400_000;

    /// Bookings without keys: `(user_id, quantity)` each.
    pub fn rows(wanted: &[(i64, i64)]) -> Vec<NewBookingRow<'static>> {
        wanted
            .iter()
            .map(|&(user_id, quantity)| NewBookingRow {
                user_id,
                quantity,
                key: None,
            })
            .collect()
    }

    /// A batch at T0.
    pub fn batch<'a>(
        event_id: i64,
        token: i64,
        cancels: &'a [i64],
        bookings: &'a [NewBookingRow<'a>],
    ) -> FencedBatch<'a> {
        FencedBatch {
            event_id,
            token,
            cancels,
            bookings,
            now: T0,
            now_ms: T0_MS,
            keys_live_after_ms: LIVE_MS,
        }
    }

    /// The ids of the bookings the batch made.
    pub fn ids(a: &BatchApplied) -> Vec<i64> {
        a.bookings
            .iter()
            .filter_map(|o| match o {
                BookingOutcome::Booked(id) => Some(*id),
                _ => None,
            })
            .collect()
    }
}
