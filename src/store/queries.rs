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
use crate::domain::Booking;
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
    scope: &str,
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
