//! SQLite's statements, as functions over a connection: the writes the persistence actor runs
//! inside its group transaction (`actors::persistence::sqlite`), the reads behind
//! `store::queries` (which dispatches a read connection to this backend or PostgreSQL's).
//!
//! The row and outcome types are the seam's own (re-exported by `store::queries`): PostgreSQL
//! reads and writes into the same ones.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, Row, Statement};
use serde::Serialize;

use crate::domain::{Booking, BookingStatus, IdempotencyKey, KeyScope};
use crate::ticket::TicketFacts;

/// One row of `events`, as the API shows an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(as = Event)]
pub struct EventRow {
    pub id: i64,
    pub title: String,
    pub capacity: i64,
    /// Seats committed (booked and not cancelled).
    pub booked_count: i64,
    /// Most seats one customer may hold; absent when unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_user: Option<i64>,
    #[serde(skip)]
    pub finalized_count: i64,
    /// The highest lease token that has written to this event.
    #[serde(skip)]
    pub fence: i64,
}

impl FromSql for BookingStatus {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let s = value.as_str()?;
        BookingStatus::parse(s).ok_or_else(|| FromSqlError::Other(format!("status {s:?}").into()))
    }
}

/// The totals of `GET /report`, over every event: 128-bit, so no number of events of any
/// capacity overflows them (SQLite's `SUM` did, past i64, and answered 500 from then on).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Report {
    pub events: i128,
    pub total_capacity: i128,
    pub total_reserved: i128,
    pub total_finalized: i128,
}

/// What one group transaction changed in the totals; the writer adds it to the stored totals in
/// the same transaction (`add_to_totals`), so they are as exact as the rows they sum.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TotalsDelta {
    pub events: i64,
    pub capacity: i64,
    pub booked: i64,
    pub finalized: i64,
}

impl TotalsDelta {
    pub fn is_zero(&self) -> bool {
        *self == TotalsDelta::default()
    }
}

impl std::ops::AddAssign for TotalsDelta {
    fn add_assign(&mut self, d: TotalsDelta) {
        self.events += d.events;
        self.capacity += d.capacity;
        self.booked += d.booked;
        self.finalized += d.finalized;
    }
}

/// Why a fenced batch was refused: the row as the transaction saw it, so the caller can reload
/// without another round trip. Nothing of a refused batch is written.
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

/// One booking of a batch, as the writer applies it.
#[derive(Debug, Clone, Copy)]
pub struct NewBookingRow<'a> {
    pub user_id: i64,
    pub quantity: i64,
    pub key: Option<&'a IdempotencyKey>,
}

/// What became of one booking of a committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BookingOutcome {
    /// Written, with this id.
    Booked(i64),
    /// The customer holds `held` seats; this booking would pass the limit. Nothing written.
    Limit { limit: i64, held: i64 },
    /// The idempotency key already names a live booking. Nothing written.
    KeyUsed {
        booking_id: i64,
        fingerprint: String,
    },
}

/// What became of one cancellation of a committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The booking as it is now: CANCELLED (now, or already before).
    Cancelled(Booking),
    /// No such booking on this event.
    NotFound,
}

/// A batch for the fenced transaction: cancellations first (their seats return), then
/// bookings, all under one lease token.
#[derive(Debug)]
pub struct FencedBatch<'a> {
    pub event_id: i64,
    pub token: i64,
    pub cancels: &'a [i64],
    pub bookings: &'a [NewBookingRow<'a>],
    /// The stored-format timestamp of this transaction.
    pub now: &'a str,
    /// The same instant in Unix milliseconds (idempotency keys).
    pub now_ms: i64,
    /// Idempotency keys created before this (Unix ms) have expired.
    pub keys_live_after_ms: i64,
}

/// What a committed batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchApplied {
    /// The event's `booked_count` after the update: exact, whoever wrote before.
    pub booked_after: i64,
    /// Bookings this batch's cancellations moved to CANCELLED (not those cancelled before it).
    pub cancelled: i64,
    /// Seats this batch's cancellations gave back (not those cancelled before it).
    pub freed: i64,
    /// Of those, seats whose tickets had been issued (they leave `finalized_count`).
    pub freed_issued: i64,
    pub bookings: Vec<BookingOutcome>,
    pub cancels: Vec<CancelOutcome>,
    /// What the batch taught about its customers' seats, in order (events with a limit only).
    pub users: Vec<SeatsSeen>,
}

/// What a batch learned of one customer's seats on a limited event, in the order it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeatsSeen {
    /// The customer holds exactly this many (read after a cancellation or a refusal).
    Holds { user_id: i64, seats: i64 },
    /// The customer took this many more (a booking went through).
    Took { user_id: i64, seats: i64 },
}

/// What the store knows of an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub fingerprint: String,
    pub booking_id: Option<i64>,
    pub event_id: Option<i64>,
}

const EVENT_COLS: &str = "id, title, capacity, booked_count, finalized_count, fence, max_per_user";
const BOOKING_COLS: &str =
    "id, event_id, user_id, quantity, status, created_at, ticket_code, finalized_at, cancelled_at";

fn event_from(r: &Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        id: r.get(0)?,
        title: r.get(1)?,
        capacity: r.get(2)?,
        booked_count: r.get(3)?,
        finalized_count: r.get(4)?,
        fence: r.get(5)?,
        max_per_user: r.get(6)?,
    })
}

fn booking_from(r: &Row<'_>) -> rusqlite::Result<Booking> {
    Ok(Booking {
        id: r.get(0)?,
        event_id: r.get(1)?,
        user_id: r.get(2)?,
        quantity: r.get(3)?,
        status: r.get(4)?,
        created_at: iso_utc(&r.get::<_, String>(5)?),
        ticket_code: r.get(6)?,
        finalized_at: r.get::<_, Option<String>>(7)?.map(|s| iso_utc(&s)),
        cancelled_at: r.get::<_, Option<String>>(8)?.map(|s| iso_utc(&s)),
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

/// Up to `limit` events with ids above `after`, in id order (keyset pagination: a page costs
/// the same wherever it starts, and events created meanwhile never shift a page).
pub fn events_after(conn: &Connection, after: i64, limit: i64) -> rusqlite::Result<Vec<EventRow>> {
    conn.prepare_cached(&format!(
        "SELECT {EVENT_COLS} FROM events WHERE id > ?1 ORDER BY id LIMIT ?2"
    ))?
    .query_map([after, limit], event_from)?
    .collect()
}

pub fn booking(conn: &Connection, id: i64) -> rusqlite::Result<Option<Booking>> {
    conn.prepare_cached(&format!(
        "SELECT {BOOKING_COLS} FROM bookings WHERE id = ?1"
    ))?
    .query_row([id], booking_from)
    .optional()
}

/// The stored totals (one row, kept by every commit): `GET /report` never scans the events.
pub fn report(conn: &Connection) -> rusqlite::Result<Report> {
    conn.prepare_cached(
        "SELECT events, capacity, booked, finalized FROM report_totals WHERE id = 1",
    )?
    .query_row([], |r| {
        Ok(Report {
            events: wide(r, 0)?,
            total_capacity: wide(r, 1)?,
            total_reserved: wide(r, 2)?,
            total_finalized: wide(r, 3)?,
        })
    })
}

/// A 128-bit total, stored as decimal text (SQLite's integers are 64-bit).
fn wide(r: &Row<'_>, i: usize) -> rusqlite::Result<i128> {
    let text: String = r.get(i)?;
    text.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Adds one group's changes to the stored totals (inside the group's transaction).
pub fn add_to_totals(conn: &Connection, d: &TotalsDelta) -> rusqlite::Result<()> {
    let now = report(conn)?;
    conn.prepare_cached(
        "UPDATE report_totals SET events = ?1, capacity = ?2, booked = ?3, finalized = ?4
         WHERE id = 1",
    )?
    .execute(params![
        (now.events + d.events as i128).to_string(),
        (now.total_capacity + d.capacity as i128).to_string(),
        (now.total_reserved + d.booked as i128).to_string(),
        (now.total_finalized + d.finalized as i128).to_string(),
    ])?;
    Ok(())
}

/// Computes the totals from the events, once, if the file has none yet (a new file, or one that
/// comes from before the totals were kept: the old service's included). Run by the writer at
/// start, inside a write transaction, so replicas starting together compute them once.
pub fn ensure_totals(conn: &Connection) -> rusqlite::Result<()> {
    let kept: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM report_totals WHERE id = 1)",
        [],
        |r| r.get(0),
    )?;
    if kept {
        return Ok(());
    }
    let mut t = Report::default();
    let mut rows = conn.prepare("SELECT capacity, booked_count, finalized_count FROM events")?;
    let mut rows = rows.query([])?;
    while let Some(r) = rows.next()? {
        t.events += 1;
        t.total_capacity += r.get::<_, i64>(0)? as i128;
        t.total_reserved += r.get::<_, i64>(1)? as i128;
        t.total_finalized += r.get::<_, i64>(2)? as i128;
    }
    conn.execute(
        "INSERT INTO report_totals (id, events, capacity, booked, finalized)
         VALUES (1, ?1, ?2, ?3, ?4)",
        params![
            t.events.to_string(),
            t.total_capacity.to_string(),
            t.total_reserved.to_string(),
            t.total_finalized.to_string(),
        ],
    )?;
    Ok(())
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

/// Creates an event; with an idempotency key that already names a live event, creates nothing
/// and returns the key's record instead.
pub fn insert_event(
    conn: &Connection,
    title: &str,
    capacity: i64,
    max_per_user: Option<i64>,
    key: Option<&IdempotencyKey>,
    now_ms: i64,
    keys_live_after_ms: i64,
) -> rusqlite::Result<Result<EventRow, KeyRecord>> {
    if let Some(k) = key {
        let mut claim = conn.prepare_cached(CLAIM_KEY)?;
        if !claim_key_for(&mut claim, k, None, now_ms, keys_live_after_ms)? {
            return Ok(Err(live_key(conn, k)?));
        }
    }
    conn.prepare_cached(
        "INSERT INTO events (title, capacity, booked_count, max_per_user) VALUES (?1, ?2, 0, ?3)",
    )?
    .execute(params![title, capacity, max_per_user])?;
    let id = conn.last_insert_rowid();
    if let Some(k) = key {
        conn.prepare_cached(
            "UPDATE idempotency_keys SET event_id = ?3 WHERE scope = ?1 AND key = ?2",
        )?
        .execute(params![k.scope.code(), k.key, id])?;
    }
    Ok(Ok(EventRow {
        id,
        title: title.to_string(),
        capacity,
        booked_count: 0,
        max_per_user,
        finalized_count: 0,
        fence: 0,
    }))
}

/// Claims a key for a new request: inserts its record, or takes over an expired one. One
/// statement, no lookup before it: on the hot path the key is new.
const CLAIM_KEY: &str =
    "INSERT INTO idempotency_keys (scope, key, fingerprint, booking_id, created_ms)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint,
         booking_id = excluded.booking_id, event_id = NULL, created_ms = excluded.created_ms
     WHERE idempotency_keys.created_ms < ?6";

/// Runs `CLAIM_KEY` (prepared by the caller, once per batch) for `k`, naming `booking_id` if
/// known yet. False if a live record holds the key.
fn claim_key_for(
    claim: &mut Statement<'_>,
    k: &IdempotencyKey,
    booking_id: Option<i64>,
    now_ms: i64,
    live_after_ms: i64,
) -> rusqlite::Result<bool> {
    let n = claim.execute(params![
        k.scope.code(),
        k.key,
        k.fingerprint,
        booking_id,
        now_ms,
        live_after_ms
    ])?;
    Ok(n == 1)
}

/// The record that holds a key (after `claim_key_for` found it live).
fn live_key(conn: &Connection, k: &IdempotencyKey) -> rusqlite::Result<KeyRecord> {
    idempotency_key(conn, k.scope, &k.key, i64::MIN)?.ok_or(rusqlite::Error::QueryReturnedNoRows)
}

/// The live record of an idempotency key, for a route deciding between a replay and a 422.
pub fn idempotency_key(
    conn: &Connection,
    scope: KeyScope,
    key: &str,
    live_after_ms: i64,
) -> rusqlite::Result<Option<KeyRecord>> {
    conn.prepare_cached(
        "SELECT fingerprint, booking_id, event_id FROM idempotency_keys
         WHERE scope = ?1 AND key = ?2 AND created_ms >= ?3",
    )?
    .query_row(params![scope.code(), key, live_after_ms], |r| {
        Ok(KeyRecord {
            fingerprint: r.get(0)?,
            booking_id: r.get(1)?,
            event_id: r.get(2)?,
        })
    })
    .optional()
}

/// Where the purge of expired keys has got to in its walk over the table, in the table's own
/// order: the last (scope, key) walked, the scope as the backend stores it (SQLite: its code,
/// PostgreSQL: its text).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum PurgeCursor {
    /// At the start of the table.
    #[default]
    Start,
    Code(i64, String),
    Text(String, String),
}

/// Walks the next `chunk` keys after the cursor and deletes the expired ones; returns how many
/// went. The table has no index by age (it would cost every keyed booking a second B-tree
/// write): the purge walks it in key order instead, a chunk at a time, and starts over at the
/// end. Expired keys are ignored by every lookup meanwhile, so a slow walk is only space.
pub fn purge_expired_keys(
    conn: &Connection,
    cursor: &mut PurgeCursor,
    expired_before_ms: i64,
    chunk: usize,
) -> rusqlite::Result<usize> {
    let (after_scope, after_key) = match cursor {
        PurgeCursor::Code(scope, key) => (*scope, key.clone()),
        _ => (i64::MIN, String::new()),
    };
    let walked: Vec<(i64, String, i64)> = conn
        .prepare_cached(
            "SELECT scope, key, created_ms FROM idempotency_keys
             WHERE (scope, key) > (?1, ?2) ORDER BY scope, key LIMIT ?3",
        )?
        .query_map(params![after_scope, after_key, chunk as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut deleted = 0;
    let mut delete =
        conn.prepare_cached("DELETE FROM idempotency_keys WHERE scope = ?1 AND key = ?2")?;
    for (scope, key, created_ms) in &walked {
        if *created_ms < expired_before_ms {
            deleted += delete.execute(params![scope, key])?;
        }
    }
    *cursor = match walked.last() {
        Some((s, k, _)) if walked.len() == chunk => PurgeCursor::Code(*s, k.clone()),
        _ => PurgeCursor::Start, // the end: start over
    };
    Ok(deleted)
}

/// The fenced, conditional batch of DESIGN.md: cancellations, bookings, their customers' counts
/// and idempotency keys, then one update of the event row that moves `booked_count` only if no
/// newer lease token has written (`fence <= token`) and the seats are there
/// (`booked_count + n <= capacity`). If that update refuses, the caller undoes the whole batch
/// (`actors::persistence::sqlite`) and learns the current row. This is the last line of defence against
/// oversell: whatever an actor believes in memory, the database does not sell a seat it does not
/// have, nor let a customer pass the limit (the conditional upsert of `customer_seats`).
pub fn apply_fenced_batch(
    conn: &Connection,
    b: &FencedBatch<'_>,
) -> rusqlite::Result<Result<BatchApplied, Refusal>> {
    let Some(row) = event(conn, b.event_id)? else {
        return Ok(Err(Refusal::NoEvent));
    };
    if row.fence > b.token {
        return Ok(Err(Refusal::Fenced(row)));
    }
    let limit = row.max_per_user;
    let mut users = Vec::new();

    // Cancellations first: the seats they free may be sold again in this very batch.
    let (mut cancelled, mut freed, mut freed_issued) = (0i64, 0i64, 0i64);
    let mut cancels = Vec::with_capacity(b.cancels.len());
    for &id in b.cancels {
        let found = conn
            .prepare_cached(&format!(
                "SELECT {BOOKING_COLS} FROM bookings WHERE id = ?1 AND event_id = ?2"
            ))?
            .query_row([id, b.event_id], booking_from)
            .optional()?;
        let Some(mut booking) = found else {
            cancels.push(CancelOutcome::NotFound);
            continue;
        };
        if booking.status != BookingStatus::Cancelled {
            conn.prepare_cached(
                "UPDATE bookings SET status = 'CANCELLED', cancelled_at = ?2 WHERE id = ?1",
            )?
            .execute(params![id, b.now])?;
            cancelled += 1;
            freed += booking.quantity;
            if booking.status == BookingStatus::Finalized {
                freed_issued += booking.quantity;
            }
            if limit.is_some() {
                let left: i64 = conn
                    .prepare_cached(
                        "UPDATE customer_seats SET seats = seats - ?3
                         WHERE event_id = ?1 AND user_id = ?2 RETURNING seats",
                    )?
                    .query_row(
                        params![b.event_id, booking.user_id, booking.quantity],
                        |r| r.get(0),
                    )
                    .optional()?
                    .unwrap_or(0);
                users.push(SeatsSeen::Holds {
                    user_id: booking.user_id,
                    seats: left,
                });
            }
            booking.status = BookingStatus::Cancelled;
            booking.cancelled_at = Some(iso_utc(b.now));
        }
        cancels.push(CancelOutcome::Cancelled(booking));
    }

    let mut taken = 0i64;
    let mut bookings = Vec::with_capacity(b.bookings.len());
    // Each statement is looked up in the connection's cache once per batch, not per booking
    // (the lookup hashes the statement's text: ~3 % of the writer, profiled).
    let mut insert = conn.prepare_cached(
        "INSERT INTO bookings (id, event_id, user_id, quantity, status, created_at)
         VALUES (?1, ?2, ?3, ?4, 'PENDING', ?5)",
    )?;
    let mut claim = match b.bookings.iter().any(|nb| nb.key.is_some()) {
        true => Some(conn.prepare_cached(CLAIM_KEY)?),
        false => None,
    };
    // A plain VALUES row, not `INSERT … SELECT … WHERE` (a co-routine per booking): a first
    // request above the limit never reaches the table, and the row's CHECK refuses whatever would
    // pass it. No RETURNING either: SQLite buffers RETURNING rows in a temporary table, a cost per
    // booking (profiled); whether a row was written says whether the limit held.
    let mut count_seats = match limit {
        Some(_) => Some(conn.prepare_cached(
            "INSERT INTO customer_seats (event_id, user_id, seats, max_seats)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (event_id, user_id) DO UPDATE SET seats = seats + excluded.seats
             WHERE seats + excluded.seats <= ?4",
        )?),
        None => None,
    };
    // A keyed booking claims its key before its row exists, naming the id the row will get:
    // bookings are only ever appended, by this one writer, so ids are handed out in order.
    let mut last_id: Option<i64> = None;
    for nb in b.bookings {
        let id = match (nb.key, claim.as_mut()) {
            (Some(k), Some(claim)) => {
                let next = match last_id {
                    Some(id) => id + 1,
                    // Bookings are never deleted, so the largest id is the last one handed out.
                    None => {
                        conn.prepare_cached("SELECT COALESCE(MAX(id), 0) FROM bookings")?
                            .query_row([], |r| r.get::<_, i64>(0))?
                            + 1
                    }
                };
                if !claim_key_for(claim, k, Some(next), b.now_ms, b.keys_live_after_ms)? {
                    let used = live_key(conn, k)?;
                    bookings.push(BookingOutcome::KeyUsed {
                        booking_id: used.booking_id.unwrap_or(0),
                        fingerprint: used.fingerprint,
                    });
                    continue;
                }
                Some(next)
            }
            _ => None,
        };
        if let (Some(limit), Some(count_seats)) = (limit, count_seats.as_mut()) {
            let took = nb.quantity <= limit
                && count_seats.execute(params![b.event_id, nb.user_id, nb.quantity, limit])? == 1;
            if !took {
                if let Some(k) = nb.key {
                    // Refusals are not remembered: the key goes back.
                    conn.prepare_cached(
                        "DELETE FROM idempotency_keys WHERE scope = ?1 AND key = ?2",
                    )?
                    .execute(params![k.scope.code(), k.key])?;
                }
                let held: i64 = conn
                    .prepare_cached(
                        "SELECT seats FROM customer_seats WHERE event_id = ?1 AND user_id = ?2",
                    )?
                    .query_row([b.event_id, nb.user_id], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0);
                users.push(SeatsSeen::Holds {
                    user_id: nb.user_id,
                    seats: held,
                });
                bookings.push(BookingOutcome::Limit { limit, held });
                continue;
            }
            users.push(SeatsSeen::Took {
                user_id: nb.user_id,
                seats: nb.quantity,
            });
        }
        insert.execute(params![id, b.event_id, nb.user_id, nb.quantity, b.now])?;
        let id = conn.last_insert_rowid();
        last_id = Some(id);
        taken += nb.quantity;
        bookings.push(BookingOutcome::Booked(id));
    }
    drop((insert, claim, count_seats));

    let booked_after: Option<i64> = conn
        .prepare_cached(
            "UPDATE events SET booked_count = booked_count + ?1,
                 finalized_count = finalized_count - ?4, fence = ?2
             WHERE id = ?3 AND fence <= ?2 AND booked_count + ?1 <= capacity
             RETURNING booked_count",
        )?
        .query_row(
            params![taken - freed, b.token, b.event_id, freed_issued],
            |r| r.get(0),
        )
        .optional()?;
    let Some(booked_after) = booked_after else {
        return Ok(Err(match event(conn, b.event_id)? {
            Some(row) if row.fence > b.token => Refusal::Fenced(row),
            Some(row) => Refusal::NoSeats(row),
            None => Refusal::NoEvent,
        }));
    };
    Ok(Ok(BatchApplied {
        booked_after,
        cancelled,
        freed,
        freed_issued,
        bookings,
        cancels,
        users,
    }))
}

/// A ticket to write: the booking it vouches for and its code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedTicket {
    pub facts: TicketFacts,
    pub code: String,
}

/// Marks bookings FINALIZED with their ticket codes, each once and only while PENDING — a
/// second delivery, or a booking cancelled meanwhile, changes nothing — and only the booking the
/// facts describe (the code vouches for them: facts the queue carried wrongly write nothing).
/// Each event's `finalized_count` moves once per call. Returns the tickets written and their
/// seats.
pub fn finalize_many(
    conn: &Connection,
    tickets: &[IssuedTicket],
    at: &str,
) -> rusqlite::Result<(usize, i64)> {
    let mut mark = conn.prepare_cached(
        "UPDATE bookings SET status = 'FINALIZED', ticket_code = ?2, finalized_at = ?3
         WHERE id = ?1 AND status = 'PENDING' AND event_id = ?4 AND user_id = ?5
           AND quantity = ?6",
    )?;
    let mut per_event: std::collections::BTreeMap<i64, i64> = Default::default();
    let mut written = 0;
    for t in tickets {
        let f = &t.facts;
        let changed = mark.execute(params![
            f.booking_id,
            t.code,
            at,
            f.event_id,
            f.user_id,
            f.quantity
        ])?;
        if changed == 1 {
            written += 1;
            *per_event.entry(f.event_id).or_default() += f.quantity;
        }
    }
    let mut count = conn
        .prepare_cached("UPDATE events SET finalized_count = finalized_count + ?2 WHERE id = ?1")?;
    for (event_id, seats) in &per_event {
        count.execute([event_id, seats])?;
    }
    Ok((written, per_event.values().sum()))
}

/// The facts of those of `ids` that are PENDING (what a ticket for each would vouch for), in
/// one read: for issuances whose queue entry carried only the id (the sweeper, a replay).
pub fn pending_facts(conn: &Connection, ids: &[i64]) -> rusqlite::Result<Vec<TicketFacts>> {
    let list = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
    let mut st = conn.prepare_cached(
        "SELECT id, event_id, user_id, quantity FROM bookings
         WHERE id IN (SELECT value FROM json_each(?1)) AND status = 'PENDING'",
    )?;
    let rows = st.query_map([list], |r| {
        Ok(TicketFacts {
            booking_id: r.get(0)?,
            event_id: r.get(1)?,
            user_id: r.get(2)?,
            quantity: r.get(3)?,
        })
    })?;
    rows.collect()
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

    use crate::store::queries::test_batches::{batch, ids, rows, LIVE_MS, T0, T0_MS};

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        crate::store::schema::migrations()
            .to_latest(&mut c)
            .unwrap();
        c
    }

    fn event_with(c: &Connection, capacity: i64, limit: Option<i64>) -> EventRow {
        insert_event(c, "t", capacity, limit, None, T0_MS, LIVE_MS)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn fenced_batch_refuses_stale_tokens_and_missing_seats() {
        let c = db();
        let e = event_with(&c, 5, None);
        let a = apply_fenced_batch(&c, &batch(e.id, 2, &[], &rows(&[(1, 2), (2, 1)])))
            .unwrap()
            .unwrap();
        assert_eq!((ids(&a).len(), a.booked_after), (2, 3));
        // An older token cannot write any more, though the seats are there.
        let r = apply_fenced_batch(&c, &batch(e.id, 1, &[], &rows(&[(3, 1)]))).unwrap();
        assert!(
            matches!(r, Err(Refusal::Fenced(ref row)) if row.fence == 2 && row.booked_count == 3)
        );
        // The same token may write again, but not past capacity.
        let r = apply_fenced_batch(&c, &batch(e.id, 2, &[], &rows(&[(3, 3)]))).unwrap();
        assert!(matches!(r, Err(Refusal::NoSeats(ref row)) if row.booked_count == 3));
        assert!(
            apply_fenced_batch(&c, &batch(e.id, 3, &[], &rows(&[(3, 2)])))
                .unwrap()
                .is_ok()
        );
        assert_eq!(event(&c, e.id).unwrap().unwrap().booked_count, 5);
        assert_eq!(
            apply_fenced_batch(&c, &batch(999, 9, &[], &rows(&[(1, 1)]))).unwrap(),
            Err(Refusal::NoEvent)
        );
    }

    #[test]
    fn cancelled_seats_return_and_are_counted_once() {
        let c = db();
        let e = event_with(&c, 3, None);
        let a = apply_fenced_batch(&c, &batch(e.id, 1, &[], &rows(&[(1, 2), (2, 1)])))
            .unwrap()
            .unwrap();
        let first = ids(&a)[0];
        assert_eq!(finalize(&c, first, "CODE", T0).unwrap(), Some(2));
        // Sold out; cancelling the issued booking frees its 2 seats, sold again in one batch.
        let a = apply_fenced_batch(&c, &batch(e.id, 2, &[first], &rows(&[(3, 2)])))
            .unwrap()
            .unwrap();
        assert!(matches!(&a.cancels[0],
            CancelOutcome::Cancelled(b) if b.status == BookingStatus::Cancelled));
        assert_eq!((a.booked_after, ids(&a).len()), (3, 1));
        let row = event(&c, e.id).unwrap().unwrap();
        assert_eq!((row.booked_count, row.finalized_count), (3, 0));
        // Twice is the same cancellation: nothing more is freed.
        let a = apply_fenced_batch(&c, &batch(e.id, 3, &[first, 999], &[]))
            .unwrap()
            .unwrap();
        assert_eq!(a.booked_after, 3);
        assert_eq!(a.cancels[1], CancelOutcome::NotFound);
        // A cancelled booking is never issued.
        assert_eq!(finalize(&c, first, "OTHER", T0).unwrap(), None);
        assert_eq!(
            booking(&c, first).unwrap().unwrap().ticket_code.as_deref(),
            Some("CODE")
        );
    }

    #[test]
    fn the_limit_is_enforced_by_the_store() {
        let c = db();
        let e = event_with(&c, 100, Some(4));
        let a = apply_fenced_batch(
            &c,
            &batch(e.id, 1, &[], &rows(&[(7, 3), (7, 2), (7, 1), (8, 5)])),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            a.bookings[1..],
            [
                BookingOutcome::Limit { limit: 4, held: 3 },
                BookingOutcome::Booked(2),
                BookingOutcome::Limit { limit: 4, held: 0 },
            ]
        );
        assert_eq!(a.booked_after, 4);
        // A cancellation gives the customer room again.
        let a = apply_fenced_batch(&c, &batch(e.id, 2, &[1], &rows(&[(7, 3)])))
            .unwrap()
            .unwrap();
        assert!(matches!(a.bookings[0], BookingOutcome::Booked(_)));
        assert_eq!(
            a.users,
            vec![
                SeatsSeen::Holds {
                    user_id: 7,
                    seats: 1
                },
                SeatsSeen::Took {
                    user_id: 7,
                    seats: 3
                }
            ]
        );
        // Whoever writes, the file refuses more than the limit.
        assert!(c
            .execute(
                "UPDATE customer_seats SET seats = 5 WHERE event_id = ?1 AND user_id = 7",
                [e.id]
            )
            .is_err());
    }

    #[test]
    fn idempotency_keys_name_one_booking_and_expire() {
        let c = db();
        let e = event_with(&c, 10, None);
        let key = IdempotencyKey {
            scope: KeyScope::Customer(1),
            key: "k1".into(),
            fingerprint: "f".into(),
        };
        let one = [NewBookingRow {
            user_id: 1,
            quantity: 1,
            key: Some(&key),
        }];
        let a = apply_fenced_batch(&c, &batch(e.id, 1, &[], &one))
            .unwrap()
            .unwrap();
        let id = ids(&a)[0];
        let again = apply_fenced_batch(&c, &batch(e.id, 2, &[], &one))
            .unwrap()
            .unwrap();
        assert_eq!(
            again.bookings,
            vec![BookingOutcome::KeyUsed {
                booking_id: id,
                fingerprint: "f".into()
            }]
        );
        assert_eq!(again.booked_after, 1, "nothing booked twice");
        // A plain booking between keyed ones: the ids a keyed booking claims stay in order.
        let plain = apply_fenced_batch(&c, &batch(e.id, 3, &[], &rows(&[(2, 1)])))
            .unwrap()
            .unwrap();
        assert_eq!(ids(&plain), vec![id + 1]);
        // Expired (created before the live window): the key may be used again, and names the
        // new booking.
        let later = FencedBatch {
            keys_live_after_ms: T0_MS + 1,
            now_ms: T0_MS + 86_400_001,
            ..batch(e.id, 4, &[], &one)
        };
        let a = apply_fenced_batch(&c, &later).unwrap().unwrap();
        assert_eq!(ids(&a), vec![id + 2]);
        let rec = idempotency_key(&c, KeyScope::Customer(1), "k1", T0_MS + 1)
            .unwrap()
            .unwrap();
        assert_eq!(rec.booking_id, Some(id + 2));
        // The purge walks the keys in chunks and deletes only the expired ones.
        let other = IdempotencyKey {
            scope: KeyScope::Customer(1),
            key: "a-old".into(),
            fingerprint: "f".into(),
        };
        let old_one = [NewBookingRow {
            user_id: 1,
            quantity: 1,
            key: Some(&other),
        }];
        apply_fenced_batch(&c, &batch(e.id, 5, &[], &old_one))
            .unwrap()
            .unwrap();
        let mut cursor = PurgeCursor::default();
        assert_eq!(
            purge_expired_keys(&c, &mut cursor, T0_MS + 1, 1).unwrap(),
            1
        );
        assert_eq!(
            purge_expired_keys(&c, &mut cursor, T0_MS + 1, 1).unwrap(),
            0
        );
        assert_eq!(
            purge_expired_keys(&c, &mut cursor, T0_MS + 1, 1).unwrap(),
            0
        );
        assert_eq!(
            cursor,
            PurgeCursor::default(),
            "the walk starts over at the end"
        );
        assert_eq!(
            idempotency_key(&c, KeyScope::Customer(1), "a-old", 0).unwrap(),
            None
        );
        assert!(idempotency_key(&c, KeyScope::Customer(1), "k1", 0)
            .unwrap()
            .is_some());
    }

    /// One ticket through `finalize_many`, with the booking's own facts: the seats it
    /// finalized, if it did.
    fn finalize(c: &Connection, id: i64, code: &str, at: &str) -> rusqlite::Result<Option<i64>> {
        let b = booking(c, id)?.expect("the booking exists");
        let ticket = IssuedTicket {
            facts: TicketFacts::from(&b),
            code: code.into(),
        };
        let (n, seats) = finalize_many(c, &[ticket], at)?;
        Ok((n == 1).then_some(seats))
    }

    /// Many tickets in one call: each event's count moves once by its seats, facts that do not
    /// describe the booking write nothing, and only PENDING bookings are read back for issuing.
    #[test]
    fn tickets_are_written_many_at_a_time_and_only_for_their_booking() {
        let c = db();
        let (e1, e2) = (event_with(&c, 10, None), event_with(&c, 10, None));
        let a1 = apply_fenced_batch(&c, &batch(e1.id, 1, &[], &rows(&[(1, 2), (2, 1)])))
            .unwrap()
            .unwrap();
        let a2 = apply_fenced_batch(&c, &batch(e2.id, 1, &[], &rows(&[(3, 4)])))
            .unwrap()
            .unwrap();
        let all: Vec<i64> = ids(&a1).into_iter().chain(ids(&a2)).collect();
        let facts = pending_facts(&c, &all).unwrap();
        assert_eq!(facts.len(), 3);
        let ticket = |f: &TicketFacts| IssuedTicket {
            facts: *f,
            code: format!("C{}", f.booking_id),
        };
        let mut tickets: Vec<IssuedTicket> = facts.iter().map(ticket).collect();
        // A forged quantity for the last one: not its booking, nothing written.
        tickets[2].facts.quantity += 1;
        assert_eq!(finalize_many(&c, &tickets, T0).unwrap(), (2, 3));
        assert_eq!(event(&c, e1.id).unwrap().unwrap().finalized_count, 3);
        assert_eq!(event(&c, e2.id).unwrap().unwrap().finalized_count, 0);
        // Again, with the right facts: only the one left is written.
        let again: Vec<IssuedTicket> = facts.iter().map(ticket).collect();
        assert_eq!(finalize_many(&c, &again, T0).unwrap(), (1, 4));
        assert_eq!(event(&c, e2.id).unwrap().unwrap().finalized_count, 4);
        assert!(pending_facts(&c, &all).unwrap().is_empty());
    }

    #[test]
    fn finalize_is_idempotent() {
        let c = db();
        let e = event_with(&c, 5, None);
        let a = apply_fenced_batch(&c, &batch(e.id, 1, &[], &rows(&[(1, 3)])))
            .unwrap()
            .unwrap();
        let id = ids(&a)[0];
        assert!(finalize(&c, id, "CODE", "2024-01-01 00:00:05.000000")
            .unwrap()
            .is_some());
        assert!(finalize(&c, id, "OTHER", "2024-01-01 00:00:06.000000")
            .unwrap()
            .is_none());
        let b = booking(&c, id).unwrap().unwrap();
        assert_eq!(
            (b.status, b.ticket_code.as_deref()),
            (BookingStatus::Finalized, Some("CODE"))
        );
        assert_eq!(b.created_at, "2024-01-01T00:00:00.000000Z");
        assert_eq!(event(&c, e.id).unwrap().unwrap().finalized_count, 3);
        // A file without stored totals gets them from its rows.
        ensure_totals(&c).unwrap();
        assert_eq!(
            report(&c).unwrap(),
            Report {
                events: 1,
                total_capacity: 5,
                total_reserved: 3,
                total_finalized: 3
            }
        );
        assert!(pending_ids(&c, 0, None, 10).unwrap().is_empty());
    }

    #[test]
    fn totals_do_not_overflow_past_i64() {
        let c = db();
        ensure_totals(&c).unwrap();
        let big = TotalsDelta {
            events: 4096,
            capacity: 4096 * 1_000_000_000_000,
            booked: 7,
            finalized: 0,
        };
        // 3,000 groups of 4,096 events of the largest capacity: 1.2e19 seats, past i64::MAX.
        for _ in 0..3_000 {
            add_to_totals(&c, &big).unwrap();
        }
        let r = report(&c).unwrap();
        assert_eq!(r.total_capacity, 3_000 * 4096 * 1_000_000_000_000_i128);
        assert!(r.total_capacity > i64::MAX as i128);
        assert_eq!((r.events, r.total_reserved), (3_000 * 4096, 21_000));
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
