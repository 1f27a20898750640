//! The reads of ticketd on PostgreSQL: the same functions, semantics and Rust types as SQLite's
//! (`store::queries`), over a blocking connection of the read pool. The writes are the writer's
//! (`super::writer`).

use postgres::GenericClient;

use crate::domain::{Booking, BookingStatus, KeyScope};
use crate::store::queries::{iso_utc, EventRow, KeyRecord, Report};
use crate::ticket::TicketFacts;

pub type Result<T> = std::result::Result<T, postgres::Error>;

/// `finalized_count` is the row's plus the finalizers' slots (`schema`, migration 4).
const EVENT_COLS: &str =
    "id, title, capacity, booked_count, ticketd_finalized(events), fence, max_per_user";
const BOOKING_COLS: &str = "id, event_id, user_id, quantity, status, ticketd_ts(created_at), \
     ticket_code, ticketd_ts(finalized_at), ticketd_ts(cancelled_at)";

fn event_from(r: &postgres::Row) -> EventRow {
    EventRow {
        id: r.get(0),
        title: r.get(1),
        capacity: r.get(2),
        booked_count: r.get(3),
        finalized_count: r.get(4),
        fence: r.get(5),
        max_per_user: r.get(6),
    }
}

fn booking_from(r: &postgres::Row) -> Booking {
    let status: &str = r.get(4);
    Booking {
        id: r.get(0),
        event_id: r.get(1),
        user_id: r.get(2),
        quantity: r.get(3),
        // The column's CHECK admits only the three.
        status: BookingStatus::parse(status).unwrap_or(BookingStatus::Pending),
        created_at: iso_utc(r.get(5)),
        ticket_code: r.get(6),
        finalized_at: r.get::<_, Option<&str>>(7).map(iso_utc),
        cancelled_at: r.get::<_, Option<&str>>(8).map(iso_utc),
    }
}

pub fn event(c: &mut impl GenericClient, id: i64) -> Result<Option<EventRow>> {
    let sql = format!("SELECT {EVENT_COLS} FROM events WHERE id = $1");
    Ok(c.query_opt(&sql, &[&id])?.as_ref().map(event_from))
}

/// Up to `limit` events with ids above `after`, in id order (keyset pagination).
pub fn events_after(c: &mut impl GenericClient, after: i64, limit: i64) -> Result<Vec<EventRow>> {
    let sql = format!("SELECT {EVENT_COLS} FROM events WHERE id > $1 ORDER BY id LIMIT $2");
    Ok(c.query(&sql, &[&after, &limit])?
        .iter()
        .map(event_from)
        .collect())
}

pub fn booking(c: &mut impl GenericClient, id: i64) -> Result<Option<Booking>> {
    let sql = format!("SELECT {BOOKING_COLS} FROM bookings WHERE id = $1");
    Ok(c.query_opt(&sql, &[&id])?.as_ref().map(booking_from))
}

/// The totals: the sum of the writers' slots (`schema`), 128-bit.
pub fn report(c: &mut impl GenericClient) -> Result<Report> {
    let r = c.query_one(
        "SELECT COALESCE(SUM(events), 0)::text, COALESCE(SUM(capacity), 0)::text,
                COALESCE(SUM(booked), 0)::text, COALESCE(SUM(finalized), 0)::text
         FROM report_totals",
        &[],
    )?;
    let wide = |i: usize| r.get::<_, &str>(i).parse::<i128>().unwrap_or(i128::MAX);
    Ok(Report {
        events: wide(0),
        total_capacity: wide(1),
        total_reserved: wide(2),
        total_finalized: wide(3),
    })
}

/// Ids of PENDING bookings after `after`, in id order; with `created_before` (stored format),
/// only those older.
pub fn pending_ids(
    c: &mut impl GenericClient,
    after: i64,
    created_before: Option<&str>,
    limit: usize,
) -> Result<Vec<i64>> {
    let mut tx = c.transaction()?;
    tx.batch_execute(PENDING_IDS_PLAN)?;
    let rows = tx.query(PENDING_IDS, &[&after, &created_before, &(limit as i64)])?;
    tx.commit()?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A page of the sweep's walk over the PENDING bookings, in id order.
pub(super) const PENDING_IDS: &str = "SELECT id FROM bookings WHERE status = 'PENDING' AND id > $1
    AND ($2::text IS NULL OR created_at < $2::text::timestamp) ORDER BY id LIMIT $3";

/// The page's plan: the PENDING index walked in id order from the cursor, stopping at the page's
/// end. Left to itself, with no statistics yet (a sale's first minute, before autovacuum's first
/// analyze) or ones taken while the table was small, the planner collected every PENDING booking
/// past the cursor in a bitmap and sorted them for the first thousand: 22 ms a page at 116,000
/// PENDING (it guessed 53 rows), and a sweep
/// — every 10 s in embedded mode, each page past the last — grew with the square of the
/// backlog (PostgreSQL's CPU: a quarter of it spent sweeping while tickets were issued).
pub(super) const PENDING_IDS_PLAN: &str =
    "SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off; SET LOCAL enable_seqscan = off";

/// The facts of those of `ids` that are PENDING, in one read.
pub fn pending_facts(c: &mut impl GenericClient, ids: &[i64]) -> Result<Vec<TicketFacts>> {
    let rows = c.query(
        "SELECT id, event_id, user_id, quantity FROM bookings
         WHERE id = ANY($1) AND status = 'PENDING'",
        &[&ids],
    )?;
    Ok(rows
        .iter()
        .map(|r| TicketFacts {
            booking_id: r.get(0),
            event_id: r.get(1),
            user_id: r.get(2),
            quantity: r.get(3),
        })
        .collect())
}

/// The live record of an idempotency key.
pub fn idempotency_key(
    c: &mut impl GenericClient,
    scope: KeyScope,
    key: &str,
    live_after_ms: i64,
) -> Result<Option<KeyRecord>> {
    let row = c.query_opt(
        "SELECT fingerprint, booking_id, event_id FROM idempotency_keys
         WHERE scope = $1 AND key = $2 AND created_ms >= $3",
        &[&scope.to_string(), &key, &live_after_ms],
    )?;
    Ok(row.map(|r| KeyRecord {
        fingerprint: r.get(0),
        booking_id: r.get(1),
        event_id: r.get(2),
    }))
}

/// The value stored under `key` in `ticketd_meta`, inserting `default` first if there is none.
pub fn meta_get_or_insert(c: &mut impl GenericClient, key: &str, default: &str) -> Result<String> {
    c.execute(
        "INSERT INTO ticketd_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        &[&key, &default],
    )?;
    Ok(
        c.query_one("SELECT value FROM ticketd_meta WHERE key = $1", &[&key])?
            .get(0),
    )
}
