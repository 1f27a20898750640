//! Every SQL statement of ticketd, in one place, as functions over a connection.
//!
//! The writes are called by the persistence actor inside its group transaction; the reads by
//! anyone holding a read connection.

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;

/// One row of `events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRow {
    pub id: i64,
    pub title: String,
    pub capacity: i64,
    pub booked_count: i64,
    #[serde(skip)]
    pub finalized_count: i64,
    /// The highest lease token that has written to this event.
    #[serde(skip)]
    pub fence: i64,
}

/// One row of `bookings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BookingRow {
    pub id: i64,
    pub event_id: i64,
    pub user_id: i64,
    pub quantity: i64,
    pub status: String,
    pub created_at: String,
    pub ticket_code: Option<String>,
    pub finalized_at: Option<String>,
}

/// The totals of `GET /report`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub total_capacity: i64,
    pub total_reserved: i64,
    pub total_finalized: i64,
}

/// Why a fenced batch was refused: the row as the transaction saw it, so the caller can reload
/// without another round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The event does not exist (any more).
    NoEvent,
    /// A newer lease token has written: the batch was allocated under a lease that has since
    /// passed to someone else (a pause, a partition). Here is the current row.
    Fenced(EventRow),
    /// The token is current but the seats are not there (the view was behind the row).
    NoSeats(EventRow),
}

impl Refusal {
    /// The row the refusal came with, if the event exists.
    pub fn into_row(self) -> Option<EventRow> {
        match self {
            Refusal::NoEvent => None,
            Refusal::Fenced(row) | Refusal::NoSeats(row) => Some(row),
        }
    }
}

const EVENT_COLS: &str = "id, title, capacity, booked_count, finalized_count, fence";
const BOOKING_COLS: &str =
    "id, event_id, user_id, quantity, status, created_at, ticket_code, finalized_at";

fn event_from(r: &Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        id: r.get(0)?,
        title: r.get(1)?,
        capacity: r.get(2)?,
        booked_count: r.get(3)?,
        finalized_count: r.get(4)?,
        fence: r.get(5)?,
    })
}

fn booking_from(r: &Row<'_>) -> rusqlite::Result<BookingRow> {
    Ok(BookingRow {
        id: r.get(0)?,
        event_id: r.get(1)?,
        user_id: r.get(2)?,
        quantity: r.get(3)?,
        status: r.get(4)?,
        created_at: iso_utc(&r.get::<_, String>(5)?),
        ticket_code: r.get(6)?,
        finalized_at: r.get::<_, Option<String>>(7)?.map(|s| iso_utc(&s)),
    })
}

/// The timestamp format of the `created_at` column: SQLAlchemy's, so old and new rows sort
/// and compare alike.
pub fn db_timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

/// A stored timestamp (`2024-05-01 10:00:00.123456`, always UTC) as ISO 8601 with `Z`.
pub fn iso_utc(stored: &str) -> String {
    let mut s = stored.replacen(' ', "T", 1);
    let has_zone = s.ends_with('Z')
        || s.get(19..)
            .is_some_and(|t| t.contains('+') || t.contains('-'));
    if !has_zone {
        s.push('Z');
    }
    s
}

pub fn event(conn: &Connection, id: i64) -> rusqlite::Result<Option<EventRow>> {
    conn.prepare_cached(&format!("SELECT {EVENT_COLS} FROM events WHERE id = ?1"))?
        .query_row([id], event_from)
        .optional()
}

pub fn booking(conn: &Connection, id: i64) -> rusqlite::Result<Option<BookingRow>> {
    conn.prepare_cached(&format!(
        "SELECT {BOOKING_COLS} FROM bookings WHERE id = ?1"
    ))?
    .query_row([id], booking_from)
    .optional()
}

pub fn report(conn: &Connection) -> rusqlite::Result<Report> {
    conn.query_row(
        "SELECT COALESCE(SUM(capacity), 0), COALESCE(SUM(booked_count), 0),
                COALESCE(SUM(finalized_count), 0) FROM events",
        [],
        |r| {
            Ok(Report {
                total_capacity: r.get(0)?,
                total_reserved: r.get(1)?,
                total_finalized: r.get(2)?,
            })
        },
    )
}

/// Ids of PENDING bookings after `after`, in id order: the outbox the finalizer sweeps.
/// With `created_before`, only bookings older than that (stored-format) timestamp.
pub fn pending_ids(
    conn: &Connection,
    after: i64,
    created_before: Option<&str>,
    limit: usize,
) -> rusqlite::Result<Vec<i64>> {
    let mut st = conn.prepare_cached(
        "SELECT id FROM bookings WHERE status = 'PENDING' AND id > ?1
         AND (?2 IS NULL OR created_at < ?2) ORDER BY id LIMIT ?3",
    )?;
    let rows = st.query_map(params![after, created_before, limit as i64], |r| r.get(0))?;
    rows.collect()
}

pub fn insert_event(conn: &Connection, title: &str, capacity: i64) -> rusqlite::Result<EventRow> {
    conn.prepare_cached("INSERT INTO events (title, capacity, booked_count) VALUES (?1, ?2, 0)")?
        .execute(params![title, capacity])?;
    let id = conn.last_insert_rowid();
    Ok(EventRow {
        id,
        title: title.to_string(),
        capacity,
        booked_count: 0,
        finalized_count: 0,
        fence: 0,
    })
}

/// The fenced, conditional seat update of DESIGN.md and the booking rows it pays for.
///
/// The update moves `booked_count` only if no newer lease token has written (`fence <= token`)
/// and the seats are there (`booked_count + seats <= capacity`); otherwise nothing is written
/// and the caller learns the current row. This is the last line of defence against oversell:
/// whatever an actor believes in memory, the database does not sell a seat it does not have.
///
/// On success: the new bookings' ids and the event's `booked_count` after the update, so the
/// caller's view is exact even if an older holder slipped a write in before this one.
pub fn apply_fenced_batch(
    conn: &Connection,
    event_id: i64,
    token: i64,
    bookings: &[(i64, i64)],
    created_at: &str,
) -> rusqlite::Result<Result<(Vec<i64>, i64), Refusal>> {
    let seats: i64 = bookings.iter().map(|(_, q)| q).sum();
    let booked_after: Option<i64> = conn
        .prepare_cached(
            "UPDATE events SET booked_count = booked_count + ?1, fence = ?2
             WHERE id = ?3 AND fence <= ?2 AND booked_count + ?1 <= capacity
             RETURNING booked_count",
        )?
        .query_row(params![seats, token, event_id], |r| r.get(0))
        .optional()?;
    let Some(booked_after) = booked_after else {
        return Ok(Err(match event(conn, event_id)? {
            Some(row) if row.fence > token => Refusal::Fenced(row),
            Some(row) => Refusal::NoSeats(row),
            None => Refusal::NoEvent,
        }));
    };
    let mut insert = conn.prepare_cached(
        "INSERT INTO bookings (event_id, user_id, quantity, status, created_at)
         VALUES (?1, ?2, ?3, 'PENDING', ?4)",
    )?;
    let mut ids = Vec::with_capacity(bookings.len());
    for (user_id, quantity) in bookings {
        insert.execute(params![event_id, user_id, quantity, created_at])?;
        ids.push(conn.last_insert_rowid());
    }
    Ok(Ok((ids, booked_after)))
}

/// Marks a booking FINALIZED with its ticket code, once: a second call (a duplicate delivery)
/// changes nothing and returns false, so counters never double and a code never changes.
pub fn finalize(
    conn: &Connection,
    booking_id: i64,
    code: &str,
    at: &str,
) -> rusqlite::Result<bool> {
    // RETURNING hands back what the event counter needs: no second look-up of the booking.
    let changed: Option<(i64, i64)> = conn
        .prepare_cached(
            "UPDATE bookings SET status = 'FINALIZED', ticket_code = ?2, finalized_at = ?3
             WHERE id = ?1 AND status = 'PENDING'
             RETURNING event_id, quantity",
        )?
        .query_row(params![booking_id, code, at], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((event_id, quantity)) = changed else {
        return Ok(false);
    };
    conn.prepare_cached("UPDATE events SET finalized_count = finalized_count + ?2 WHERE id = ?1")?
        .execute([event_id, quantity])?;
    Ok(true)
}

/// The value stored under `key` in `ticketd_meta`, inserting `default` first if there is none
/// (so concurrent starters agree on one value).
pub fn meta_get_or_insert(conn: &Connection, key: &str, default: &str) -> rusqlite::Result<String> {
    conn.execute(
        "INSERT OR IGNORE INTO ticketd_meta (key, value) VALUES (?1, ?2)",
        params![key, default],
    )?;
    conn.query_row(
        "SELECT value FROM ticketd_meta WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        crate::store::schema::migrations()
            .to_latest(&mut c)
            .unwrap();
        c
    }

    #[test]
    fn fenced_batch_refuses_stale_tokens_and_missing_seats() {
        let c = db();
        let e = insert_event(&c, "t", 5).unwrap();
        let (ids, booked) =
            apply_fenced_batch(&c, e.id, 2, &[(1, 2), (2, 1)], "2024-01-01 00:00:00.000000")
                .unwrap()
                .unwrap();
        assert_eq!((ids.len(), booked), (2, 3));
        // An older token cannot write any more, though the seats are there.
        let r = apply_fenced_batch(&c, e.id, 1, &[(3, 1)], "x").unwrap();
        assert!(
            matches!(r, Err(Refusal::Fenced(ref row)) if row.fence == 2 && row.booked_count == 3)
        );
        // The same token may write again, but not past capacity.
        let r = apply_fenced_batch(&c, e.id, 2, &[(3, 3)], "x").unwrap();
        assert!(matches!(r, Err(Refusal::NoSeats(ref row)) if row.booked_count == 3));
        assert!(apply_fenced_batch(&c, e.id, 3, &[(3, 2)], "x")
            .unwrap()
            .is_ok());
        assert_eq!(event(&c, e.id).unwrap().unwrap().booked_count, 5);
        assert_eq!(
            apply_fenced_batch(&c, 999, 9, &[(1, 1)], "x").unwrap(),
            Err(Refusal::NoEvent)
        );
    }

    #[test]
    fn finalize_is_idempotent() {
        let c = db();
        let e = insert_event(&c, "t", 5).unwrap();
        let (ids, _) = apply_fenced_batch(&c, e.id, 1, &[(1, 3)], "2024-01-01 00:00:00.000000")
            .unwrap()
            .unwrap();
        assert!(finalize(&c, ids[0], "CODE", "2024-01-01 00:00:05.000000").unwrap());
        assert!(!finalize(&c, ids[0], "OTHER", "2024-01-01 00:00:06.000000").unwrap());
        let b = booking(&c, ids[0]).unwrap().unwrap();
        assert_eq!(
            (b.status.as_str(), b.ticket_code.as_deref()),
            ("FINALIZED", Some("CODE"))
        );
        assert_eq!(b.created_at, "2024-01-01T00:00:00.000000Z");
        assert_eq!(event(&c, e.id).unwrap().unwrap().finalized_count, 3);
        assert_eq!(
            report(&c).unwrap(),
            Report {
                total_capacity: 5,
                total_reserved: 3,
                total_finalized: 3
            }
        );
        assert!(pending_ids(&c, 0, None, 10).unwrap().is_empty());
    }

    #[test]
    fn iso_timestamps() {
        assert_eq!(
            iso_utc("2024-05-01 10:00:00.123456"),
            "2024-05-01T10:00:00.123456Z"
        );
        assert_eq!(iso_utc("2024-05-01T10:00:00Z"), "2024-05-01T10:00:00Z");
        assert_eq!(
            iso_utc("2024-05-01 10:00:00+00:00"),
            "2024-05-01T10:00:00+00:00"
        );
    }
}
