//! `ticketd import --from sqlite://ticket.db --to postgres://…`: moves a sale from SQLite to
//! PostgreSQL (issue 15) — every row that carries state, so the service goes on where it stood.
//!
//! What is copied, and why each matters after the move:
//! - `events` with `booked_count`, `finalized_count`, `fence` (a stale lease holder stays fenced
//!   out), `max_per_user`;
//! - `bookings` with status, ticket code, timestamps and cancellation: every booking readable, its
//!   secret (an HMAC of its facts) still opening it, its ticket still verifying, the PENDING ones
//!   still issued by the sweeper;
//! - `customer_seats` (each row with its `max_seats`): the per-customer limit counts old seats;
//! - `idempotency_keys` with fingerprint and age: a retry replays, a reuse with another body is
//!   still a 422, and keys still expire on time;
//! - `ticketd_meta`: the stored ticket key, without which no imported code or secret verifies
//!   (a deployment that sets `TICKET_KEY` has none stored, and must keep setting it);
//! - the report's totals are recomputed from the copied events (PostgreSQL keeps them in slots).
//!
//! How:
//! - The source is opened read-only and read in one read transaction: the copy is the database as
//!   of one commit, even while the service keeps selling on it (WAL: the reader never blocks the
//!   writer; the WAL only grows until the import ends).
//! - The target is migrated (the same migrations, under the same advisory lock, as a start),
//!   then, in ONE transaction: its tables are locked against writers, it must be empty (no events,
//!   bookings, keys or customer counts — an import never merges), the rows are streamed in with
//!   `COPY … FROM STDIN` (text format; no row is held in memory), the identity sequences are set
//!   past the highest ids (SQLite's AUTOINCREMENT high-water marks included, so no id is ever
//!   handed out twice), and the per-event counts and sums are compared on both sides before
//!   COMMIT. Any failure rolls everything back: the target is left as it was.
//! - PostgreSQL's constraints check every copied row: an oversold event or a customer past the
//!   limit in the SQLite file is refused, with the row, rather than carried over.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::types::FromSql;
use rusqlite::{Connection, OpenFlags};

use super::{pg_unavailable, StoreError, BUSY_TIMEOUT};
use crate::domain::KeyScope;

/// How long the import waits for a writer on the target (a replica started on it) to let go of
/// its tables before giving up: an import must not queue behind a sale indefinitely.
const LOCK_TIMEOUT: &str = "10s";

/// The tables the import knows; any other in the source is named in the summary, not copied.
const KNOWN_TABLES: &[&str] = &[
    "events",
    "bookings",
    "customer_seats",
    "idempotency_keys",
    "report_totals",
    "ticketd_meta",
    "sqlite_sequence",
];

/// What an import copied, for the summary line and the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub events: i64,
    pub bookings: i64,
    pub keys: i64,
    pub customers: i64,
    pub ticket_key: TicketKey,
    /// The SQLite file's stored report totals disagreed with its events (recomputed from them).
    pub totals_disagreed: bool,
    /// Tables of the source that no ticketd writes, left behind.
    pub unknown_tables: Vec<String>,
    pub elapsed: Duration,
}

/// What became of the ticket key stored in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketKey {
    Copied,
    /// Copied over the one a start on the (empty) target had generated.
    Replaced,
    /// The source stores none (it ran with `TICKET_KEY` set): keep setting it.
    NoneStored,
}

impl std::fmt::Display for Imported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{} events, {} bookings, {} idempotency keys, {} customer counts in {secs:.1} s \
             ({:.0} bookings/s), checked per event",
            self.events,
            self.bookings,
            self.keys,
            self.customers,
            self.bookings as f64 / secs.max(1e-3),
        )?;
        f.write_str(match self.ticket_key {
            TicketKey::Copied => "; ticket key copied",
            TicketKey::Replaced => {
                "; ticket key copied over the target's (restart any replica already on it)"
            }
            TicketKey::NoneStored => "; no ticket key stored: keep TICKET_KEY set",
        })?;
        if self.totals_disagreed {
            f.write_str("; the source's report totals disagreed with its events: recomputed")?;
        }
        if !self.unknown_tables.is_empty() {
            write!(f, "; not copied: {}", self.unknown_tables.join(", "))?;
        }
        Ok(())
    }
}

/// Why nothing was imported. Whatever the variant, the target is as it was (one transaction).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("--from {0}: no such file")]
    NoSource(PathBuf),
    #[error("--from {0} is not a ticketd database ({1})")]
    NotTicketd(PathBuf, String),
    #[error(
        "--from {path}: its schema (version {at}) is older than this ticketd's ({latest}): \
         start this ticketd on it once (it migrates the file), then import"
    )]
    SourceTooOld { path: PathBuf, at: i64, latest: i64 },
    #[error(
        "--from {path}: its schema (version {at}) is newer than this ticketd's ({latest}): \
         import with the ticketd that wrote it"
    )]
    SourceTooNew { path: PathBuf, at: i64, latest: i64 },
    #[error(
        "the target's tables stayed locked by another session for {LOCK_TIMEOUT}: stop the \
         ticketd replicas that write to it, then import; nothing was written"
    )]
    TargetInUse,
    #[error(
        "the target is not empty ({events} events, {bookings} bookings, {keys} idempotency \
         keys, {customers} customer counts): an import only fills an empty database, it never \
         merges; nothing was written"
    )]
    NotEmpty {
        events: i64,
        bookings: i64,
        keys: i64,
        customers: i64,
    },
    /// A value of the source that cannot be read as its column's type (SQLite types loosely).
    #[error("--from: {table} {row}, column {column}: {reason}; nothing was imported")]
    BadValue {
        table: &'static str,
        row: String,
        column: &'static str,
        reason: String,
    },
    /// PostgreSQL's types or constraints refused a copied row: the source breaks a rule the
    /// service promises (an oversold event, a customer past the limit, an unknown status).
    #[error(
        "PostgreSQL refused the source's {table}: {detail}; the SQLite file breaks a rule of \
         the schema (no oversell, per-customer limits, statuses, lengths): fix it there; \
         nothing was imported"
    )]
    Refused { table: &'static str, detail: String },
    #[error("the copy differs from the source ({0}); rolled back, nothing was imported")]
    Mismatch(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for ImportError {
    fn from(e: rusqlite::Error) -> Self {
        ImportError::Store(StoreError::Sqlite(e))
    }
}

impl From<::postgres::Error> for ImportError {
    /// A server that cannot be reached is `Unavailable` (retry), as for the service itself.
    fn from(e: ::postgres::Error) -> Self {
        ImportError::Store(if pg_unavailable(&e) {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Postgres(e)
        })
    }
}

impl From<super::postgres::schema::MigrateError> for ImportError {
    fn from(e: super::postgres::schema::MigrateError) -> Self {
        ImportError::Store(StoreError::PgMigration(e))
    }
}

/// Copies the SQLite database at `from` into the empty PostgreSQL database at `to`. Blocking
/// (the `postgres` client): call it off any async runtime, as `main` does.
pub fn import(from: &Path, to: &str) -> Result<Imported, ImportError> {
    let src = open_source(from)?;
    let unknown_tables = unknown_tables(&src)?;
    let config = ::postgres::Config::from(super::pg_config(to)?);
    let mut client = config.connect(::postgres::NoTls)?;
    super::postgres::schema::migrate(&mut client)?;

    let started = Instant::now();
    let mut tx = client.transaction()?;
    // Writers (a replica already started on the target) wait until COMMIT; readers do not.
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{LOCK_TIMEOUT}';
         LOCK TABLE events, bookings, customer_seats, idempotency_keys, report_totals,
             ticketd_meta IN EXCLUSIVE MODE"
    ))
    .map_err(|e| match e.code() {
        Some(c) if *c == ::postgres::error::SqlState::LOCK_NOT_AVAILABLE => {
            ImportError::TargetInUse
        }
        _ => e.into(),
    })?;
    refuse_unless_empty(&mut tx)?;

    // One read transaction over the source: every read below sees the same commit.
    let snap = src.unchecked_transaction()?;
    let events = copy_events(&snap, &mut tx)?;
    let bookings = copy_bookings(&snap, &mut tx)?;
    let customers = copy_customer_seats(&snap, &mut tx)?;
    let keys = copy_idempotency_keys(&snap, &mut tx)?;
    let ticket_key = copy_meta(&snap, &mut tx)?;
    let totals_disagreed = recompute_totals(&snap, &mut tx)?;
    move_sequences(&snap, &mut tx)?;
    verify(&snap, &mut tx)?;
    snap.commit()?;
    // The planner's statistics for the new rows now, not at autovacuum's leisure.
    tx.batch_execute("ANALYZE events, bookings, customer_seats, idempotency_keys")?;
    tx.commit()?;
    Ok(Imported {
        events,
        bookings,
        keys,
        customers,
        ticket_key,
        totals_disagreed,
        unknown_tables,
        elapsed: started.elapsed(),
    })
}

/// The source, read-only: an import never writes to the database it moves away from. It must be
/// a ticketd database at this binary's schema version, since the copy maps its columns one to
/// one (an older file is migrated by starting ticketd on it, which the import does not do behind
/// the operator's back).
fn open_source(path: &Path) -> Result<Connection, ImportError> {
    if !path.is_file() {
        return Err(ImportError::NoSource(path.to_path_buf()));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let tables: rusqlite::Result<i64> = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('events', 'bookings')",
        [],
        |r| r.get(0),
    );
    match tables {
        Ok(2) => {}
        Ok(_) => {
            return Err(ImportError::NotTicketd(
                path.to_path_buf(),
                "no events and bookings tables".into(),
            ))
        }
        Err(rusqlite::Error::SqliteFailure(f, _))
            if f.code == rusqlite::ErrorCode::NotADatabase =>
        {
            return Err(ImportError::NotTicketd(
                path.to_path_buf(),
                "not a SQLite file".into(),
            ))
        }
        Err(e) => return Err(e.into()),
    }
    let at: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let latest = latest_sqlite_version()?;
    if at < latest {
        return Err(ImportError::SourceTooOld {
            path: path.to_path_buf(),
            at,
            latest,
        });
    }
    if at > latest {
        return Err(ImportError::SourceTooNew {
            path: path.to_path_buf(),
            at,
            latest,
        });
    }
    Ok(conn)
}

/// The `user_version` the SQLite migrations end at (run on an empty in-memory database: the
/// migrations are the one place that knows it).
fn latest_sqlite_version() -> Result<i64, StoreError> {
    let mut mem = Connection::open_in_memory()?;
    super::schema::migrations().to_latest(&mut mem)?;
    Ok(mem.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

fn unknown_tables(src: &Connection) -> Result<Vec<String>, ImportError> {
    let mut st =
        src.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?;
    let names = st.query_map([], |r| r.get::<_, String>(0))?;
    let mut unknown = Vec::new();
    for name in names {
        let name = name?;
        if !KNOWN_TABLES.contains(&name.as_str()) {
            unknown.push(name);
        }
    }
    Ok(unknown)
}

/// An import fills an empty database, never merges into a used one: ids, counts and keys of two
/// sales would collide, and a half-merged sale could oversell. Run under the tables' lock.
fn refuse_unless_empty(tx: &mut ::postgres::Transaction<'_>) -> Result<(), ImportError> {
    let r = tx.query_one(
        // An event's slots of issued seats (`event_finalized`) count as the event.
        "SELECT (SELECT COUNT(*) FROM events) + (SELECT COUNT(DISTINCT event_id) FROM event_finalized),
                (SELECT COUNT(*) FROM bookings),
                (SELECT COUNT(*) FROM idempotency_keys), (SELECT COUNT(*) FROM customer_seats)",
        &[],
    )?;
    let (events, bookings, keys, customers): (i64, i64, i64, i64) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    if events + bookings + keys + customers > 0 {
        return Err(ImportError::NotEmpty {
            events,
            bookings,
            keys,
            customers,
        });
    }
    Ok(())
}

/// One row of COPY's text format: fields separated by tabs, `\N` for NULL, and backslash, tab,
/// newline and carriage return escaped (a title may hold any of them).
#[derive(Default)]
struct Line {
    buf: String,
    fields: usize,
}

impl Line {
    fn start(&mut self) {
        self.buf.clear();
        self.fields = 0;
    }

    fn sep(&mut self) {
        if self.fields > 0 {
            self.buf.push('\t');
        }
        self.fields += 1;
    }

    fn int(&mut self, v: i64) {
        self.sep();
        let _ = write!(self.buf, "{v}");
    }

    fn opt_int(&mut self, v: Option<i64>) {
        match v {
            Some(v) => self.int(v),
            None => self.null(),
        }
    }

    fn null(&mut self) {
        self.sep();
        self.buf.push_str("\\N");
    }

    fn text(&mut self, v: &str) {
        self.sep();
        for c in v.chars() {
            match c {
                '\\' => self.buf.push_str("\\\\"),
                '\t' => self.buf.push_str("\\t"),
                '\n' => self.buf.push_str("\\n"),
                '\r' => self.buf.push_str("\\r"),
                c => self.buf.push(c),
            }
        }
    }

    fn opt_text(&mut self, v: Option<&str>) {
        match v {
            Some(v) => self.text(v),
            None => self.null(),
        }
    }
}

/// Streams the rows of `select` (over the source snapshot) into `COPY {copy} FROM STDIN`, one
/// `Line` per row built by `row`. Returns the rows copied.
fn copy_table(
    snap: &Connection,
    tx: &mut ::postgres::Transaction<'_>,
    table: &'static str,
    select: &str,
    copy: &str,
    mut row: impl FnMut(&rusqlite::Row<'_>, i64, &mut Line) -> Result<(), ImportError>,
) -> Result<i64, ImportError> {
    let mut st = snap.prepare(select)?;
    let mut rows = st.query([])?;
    let mut writer = tx
        .copy_in(format!("COPY {copy} FROM STDIN").as_str())
        .map_err(|e| refused(table, e))?;
    let mut line = Line::default();
    let mut n = 0i64;
    while let Some(r) = rows.next()? {
        n += 1;
        line.start();
        row(r, n, &mut line)?;
        line.buf.push('\n');
        if let Err(e) = writer.write_all(line.buf.as_bytes()) {
            return Err(io_refused(table, e));
        }
    }
    writer.finish().map_err(|e| refused(table, e))?;
    Ok(n)
}

/// A PostgreSQL error of a copy: a refused value or constraint (classes 22 and 23) is the
/// source's fault and says which row; anything else keeps its kind.
fn refused(table: &'static str, e: ::postgres::Error) -> ImportError {
    let Some(db) = e.as_db_error() else {
        return e.into();
    };
    let code = db.code().code();
    if !(code.starts_with("22") || code.starts_with("23")) {
        return e.into();
    }
    let mut detail = String::new();
    if let Some(meaning) = db.constraint().and_then(constraint_meaning) {
        let _ = write!(detail, "{meaning}: ");
    }
    detail.push_str(db.message());
    if let Some(d) = db.detail() {
        let _ = write!(detail, "; {d}");
    }
    // The row as COPY saw it — but never a row of ticketd_meta, which holds the ticket key.
    if let Some(w) = db.where_().filter(|_| table != "ticketd_meta") {
        let _ = write!(detail, "; at {w}");
    }
    ImportError::Refused { table, detail }
}

/// What a refused row means for the sale, for the schema's named rules.
fn constraint_meaning(constraint: &str) -> Option<&'static str> {
    Some(match constraint {
        "events_never_oversell" => "an event with more seats booked than it has (an oversell)",
        "customer_seats_within_limit" => "a customer holding more seats than the event's limit",
        "bookings_status" => "a booking whose status is not PENDING, FINALIZED or CANCELLED",
        _ => return None,
    })
}

/// A write into COPY that failed: the server's error inside it when there is one.
fn io_refused(table: &'static str, e: std::io::Error) -> ImportError {
    match e
        .into_inner()
        .map(|inner| inner.downcast::<::postgres::Error>())
    {
        Some(Ok(pg)) => refused(table, *pg),
        Some(Err(other)) => ImportError::Store(StoreError::Task(format!("{table}: {other}"))),
        None => ImportError::Store(StoreError::Task(format!("{table}: the copy stream failed"))),
    }
}

/// Reads column `i` (named `column`) of a source row as `T`, or says which value is wrong.
fn col<T: FromSql>(
    r: &rusqlite::Row<'_>,
    i: usize,
    table: &'static str,
    column: &'static str,
    row: impl FnOnce() -> String,
) -> Result<T, ImportError> {
    r.get::<_, T>(i).map_err(|e| ImportError::BadValue {
        table,
        row: row(),
        column,
        reason: e.to_string(),
    })
}

fn copy_events(
    snap: &Connection,
    tx: &mut ::postgres::Transaction<'_>,
) -> Result<i64, ImportError> {
    const T: &str = "events";
    copy_table(
        snap,
        tx,
        T,
        "SELECT id, title, capacity, booked_count, fence, finalized_count, max_per_user
         FROM events ORDER BY id",
        "events (id, title, capacity, booked_count, fence, finalized_count, max_per_user)",
        |r, _, line| {
            let id: i64 = col(r, 0, T, "id", String::new)?;
            let at = || format!("id {id}");
            line.int(id);
            line.text(&col::<String>(r, 1, T, "title", at)?);
            line.int(col(r, 2, T, "capacity", at)?);
            line.int(col(r, 3, T, "booked_count", at)?);
            line.int(col(r, 4, T, "fence", at)?);
            line.int(col(r, 5, T, "finalized_count", at)?);
            line.opt_int(col(r, 6, T, "max_per_user", at)?);
            Ok(())
        },
    )
}

/// Timestamps go over as SQLite stores them (`2024-05-01 10:00:00.123456`, UTC); PostgreSQL
/// parses them into `timestamp(6)`, and refuses one it cannot read (a `Refused` naming the row).
fn copy_bookings(
    snap: &Connection,
    tx: &mut ::postgres::Transaction<'_>,
) -> Result<i64, ImportError> {
    const T: &str = "bookings";
    copy_table(
        snap,
        tx,
        T,
        "SELECT id, event_id, user_id, quantity, status, created_at, ticket_code, finalized_at,
                cancelled_at
         FROM bookings ORDER BY id",
        "bookings (id, event_id, user_id, quantity, status, created_at, ticket_code, \
         finalized_at, cancelled_at)",
        |r, _, line| {
            let id: i64 = col(r, 0, T, "id", String::new)?;
            let at = || format!("id {id}");
            line.int(id);
            line.int(col(r, 1, T, "event_id", at)?);
            line.int(col(r, 2, T, "user_id", at)?);
            line.int(col(r, 3, T, "quantity", at)?);
            line.text(&col::<String>(r, 4, T, "status", at)?);
            line.text(&col::<String>(r, 5, T, "created_at", at)?);
            line.opt_text(col::<Option<String>>(r, 6, T, "ticket_code", at)?.as_deref());
            line.opt_text(col::<Option<String>>(r, 7, T, "finalized_at", at)?.as_deref());
            line.opt_text(col::<Option<String>>(r, 8, T, "cancelled_at", at)?.as_deref());
            Ok(())
        },
    )
}

fn copy_customer_seats(
    snap: &Connection,
    tx: &mut ::postgres::Transaction<'_>,
) -> Result<i64, ImportError> {
    const T: &str = "customer_seats";
    copy_table(
        snap,
        tx,
        T,
        "SELECT event_id, user_id, seats, max_seats FROM customer_seats ORDER BY event_id, user_id",
        "customer_seats (event_id, user_id, seats, max_seats)",
        |r, n, line| {
            let at = || format!("row {n}");
            line.int(col(r, 0, T, "event_id", at)?);
            line.int(col(r, 1, T, "user_id", at)?);
            line.int(col(r, 2, T, "seats", at)?);
            line.int(col(r, 3, T, "max_seats", at)?);
            Ok(())
        },
    )
}

/// Keys keep their age (`created_ms`): an expired one stays expired, a live one expires when it
/// would have on SQLite.
fn copy_idempotency_keys(
    snap: &Connection,
    tx: &mut ::postgres::Transaction<'_>,
) -> Result<i64, ImportError> {
    const T: &str = "idempotency_keys";
    copy_table(
        snap,
        tx,
        T,
        "SELECT scope, key, fingerprint, booking_id, event_id, created_ms
         FROM idempotency_keys ORDER BY scope, key",
        "idempotency_keys (scope, key, fingerprint, booking_id, event_id, created_ms)",
        |r, n, line| {
            let at = || format!("row {n}");
            // SQLite stores a scope's code, PostgreSQL its text form.
            let code: i64 = col(r, 0, T, "scope", at)?;
            let scope = KeyScope::from_code(code).ok_or_else(|| ImportError::BadValue {
                table: T,
                row: at(),
                column: "scope",
                reason: format!("{code} is no scope (0 the organizer, else a user id >= 1)"),
            })?;
            line.text(&scope.to_string());
            line.text(&col::<String>(r, 1, T, "key", at)?);
            line.text(&col::<String>(r, 2, T, "fingerprint", at)?);
            line.opt_int(col(r, 3, T, "booking_id", at)?);
            line.opt_int(col(r, 4, T, "event_id", at)?);
            line.int(col(r, 5, T, "created_ms", at)?);
            Ok(())
        },
    )
}

/// `ticketd_meta` (the stored ticket key): the source's values win over what a start on the empty
/// target may have generated — the imported codes and secrets were signed with the source's key.
fn copy_meta(
    snap: &Connection,
    tx: &mut ::postgres::Transaction<'_>,
) -> Result<TicketKey, ImportError> {
    const T: &str = "ticketd_meta";
    let target_key: Option<String> = tx
        .query_opt(
            "SELECT value FROM ticketd_meta WHERE key = 'ticket_key'",
            &[],
        )?
        .map(|r| r.get(0));
    let mut st = snap.prepare("SELECT key, value FROM ticketd_meta ORDER BY key")?;
    let mut rows = st.query([])?;
    let mut source_key = None;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        n += 1;
        let at = || format!("row {n}");
        let key: String = col(r, 0, T, "key", at)?;
        let value: String = col(r, 1, T, "value", at)?;
        tx.execute(
            "INSERT INTO ticketd_meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&key, &value],
        )
        .map_err(|e| refused(T, e))?;
        if key == "ticket_key" {
            source_key = Some(value);
        }
    }
    Ok(match (source_key, target_key) {
        (None, _) => TicketKey::NoneStored,
        (Some(s), Some(t)) if s != t => TicketKey::Replaced,
        (Some(_), _) => TicketKey::Copied,
    })
}

/// PostgreSQL's totals (one row per writer slot) from the copied events, all in slot 0. True if
/// the source's stored totals said otherwise (the rows are the truth; the totals only sum them).
fn recompute_totals(
    snap: &Connection,
    tx: &mut ::postgres::Transaction<'_>,
) -> Result<bool, ImportError> {
    tx.execute("DELETE FROM report_totals", &[])?;
    let r = tx.query_one(
        "INSERT INTO report_totals (id, events, capacity, booked, finalized)
         SELECT 0, COUNT(*), COALESCE(SUM(capacity), 0), COALESCE(SUM(booked_count), 0),
                COALESCE(SUM(ticketd_finalized(events)), 0)
         FROM events
         RETURNING events::text, capacity::text, booked::text, finalized::text",
        &[],
    )?;
    let computed: Vec<String> = (0..4).map(|i| r.get::<_, String>(i)).collect();
    let stored: Option<Vec<String>> = match snap.query_row(
        "SELECT events, capacity, booked, finalized FROM report_totals WHERE id = 1",
        [],
        |r| (0..4).map(|i| r.get::<_, String>(i)).collect(),
    ) {
        Ok(v) => Some(v),
        Err(rusqlite::Error::QueryReturnedNoRows) => None,
        Err(e) => return Err(e.into()),
    };
    Ok(stored.is_some_and(|s| s != computed))
}

/// Sets the identity sequences of `events` and `bookings` past every id the source has handed
/// out: the highest copied id, or SQLite's AUTOINCREMENT high-water mark if higher (an id once
/// used is never used again, whatever happened to its row). Without this, the first booking on
/// PostgreSQL would get id 1 and collide with an imported one.
fn move_sequences(
    snap: &Connection,
    tx: &mut ::postgres::Transaction<'_>,
) -> Result<(), ImportError> {
    let has_sequences: bool = snap.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence')",
        [],
        |r| r.get(0),
    )?;
    for table in ["events", "bookings"] {
        let high_water: i64 = if has_sequences {
            snap.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = ?1",
                [table],
                |r| r.get(0),
            )?
        } else {
            0
        };
        let copied: i64 = tx
            .query_one(&format!("SELECT COALESCE(MAX(id), 0) FROM {table}"), &[])?
            .get(0);
        let last = copied.max(high_water);
        // setval(…, 1, false): nothing handed out yet, the next is 1.
        tx.query_one(
            "SELECT setval(pg_get_serial_sequence($1, 'id'), GREATEST($2::bigint, 1), $2::bigint >= 1)",
            &[&table, &last],
        )?;
    }
    Ok(())
}

/// What the two sides must agree on, per event (bookings of an event id with no event row are
/// counted under that id all the same).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct EventSums {
    /// capacity, booked_count, finalized_count, fence, max_per_user (-1: none); None: no row.
    row: Option<[i64; 5]>,
    /// bookings, seats, live seats, issued seats, ticket codes, cancelled bookings.
    bookings: [i64; 6],
    /// customer rows, seats they hold.
    customers: [i64; 2],
}

/// Per-event counts and sums, and the keys' and meta's totals, in SQL both databases run alike.
/// (On PostgreSQL an event's issued seats are also counted in `event_finalized`: empty in the
/// target, which the import refuses unless it is, so the row's column is the whole count.)
const VERIFY_EVENTS: &str =
    "SELECT id, capacity, booked_count, finalized_count, fence, COALESCE(max_per_user, -1)
     FROM events";
const VERIFY_BOOKINGS: &str = "SELECT event_id, CAST(COUNT(*) AS BIGINT),
         CAST(SUM(quantity) AS BIGINT),
         CAST(SUM(CASE WHEN status <> 'CANCELLED' THEN quantity ELSE 0 END) AS BIGINT),
         CAST(SUM(CASE WHEN status = 'FINALIZED' THEN quantity ELSE 0 END) AS BIGINT),
         CAST(COUNT(ticket_code) AS BIGINT),
         CAST(SUM(CASE WHEN status = 'CANCELLED' THEN 1 ELSE 0 END) AS BIGINT)
     FROM bookings GROUP BY event_id";
const VERIFY_CUSTOMERS: &str = "SELECT event_id, CAST(COUNT(*) AS BIGINT),
         CAST(SUM(seats) AS BIGINT)
     FROM customer_seats GROUP BY event_id";
const VERIFY_TOTALS: &str = "SELECT
         (SELECT CAST(COUNT(*) AS BIGINT) FROM idempotency_keys),
         (SELECT CAST(COUNT(booking_id) AS BIGINT) FROM idempotency_keys),
         (SELECT CAST(MIN(created_ms) AS BIGINT) FROM idempotency_keys),
         (SELECT CAST(MAX(created_ms) AS BIGINT) FROM idempotency_keys),
         (SELECT CAST(MAX(id) AS BIGINT) FROM bookings),
         (SELECT CAST(COUNT(event_id) AS BIGINT) FROM idempotency_keys)";
/// Whose the keys are (the organizer's; customers', with their lowest and highest user id), each
/// database read in its own form of the scope: SQLite's code, PostgreSQL's text.
const VERIFY_SCOPES_SQLITE: &str = "SELECT
         COALESCE(SUM(scope = 0), 0), COALESCE(SUM(scope >= 1), 0),
         MIN(CASE WHEN scope >= 1 THEN scope END), MAX(CASE WHEN scope >= 1 THEN scope END)
     FROM idempotency_keys";
const VERIFY_SCOPES_PG: &str = "SELECT
         COUNT(*) FILTER (WHERE scope = 'organizer'), COUNT(*) FILTER (WHERE scope LIKE 'user:%'),
         MIN(CAST(substr(scope, 6) AS BIGINT)) FILTER (WHERE scope LIKE 'user:%'),
         MAX(CAST(substr(scope, 6) AS BIGINT)) FILTER (WHERE scope LIKE 'user:%')
     FROM idempotency_keys";

/// The events' sums, and the totals: keys (count, with a booking, oldest, newest), highest
/// booking id, keys with an event, then the keys' scopes (`VERIFY_SCOPES_*`).
type Sums = (BTreeMap<i64, EventSums>, [Option<i64>; 10]);

/// Compares the copy with the source before COMMIT: every event's row, its bookings' counts and
/// sums (by status, with ticket codes) and its customers' seats, and the keys' totals. COPY is
/// exact, so a difference means a bug of the import, which must never reach a COMMIT.
fn verify(snap: &Connection, tx: &mut ::postgres::Transaction<'_>) -> Result<(), ImportError> {
    let source = sqlite_sums(snap)?;
    let target = pg_sums(tx)?;
    if source.1 != target.1 {
        return Err(ImportError::Mismatch(format!(
            "idempotency keys (count, with a booking, oldest, newest), highest booking id, keys \
             (with an event, the organizer's, customers', lowest and highest user id): source \
             {:?}, copy {:?}",
            source.1, target.1
        )));
    }
    for id in source.0.keys().chain(target.0.keys()) {
        let (s, t) = (source.0.get(id), target.0.get(id));
        if s != t {
            return Err(ImportError::Mismatch(format!(
                "event {id}: source {s:?}, copy {t:?}"
            )));
        }
    }
    Ok(())
}

fn sqlite_sums(c: &Connection) -> Result<Sums, ImportError> {
    let mut map: BTreeMap<i64, EventSums> = BTreeMap::new();
    let ints = |r: &rusqlite::Row<'_>, n: usize| -> rusqlite::Result<Vec<i64>> {
        (0..n)
            .map(|i| r.get::<_, Option<i64>>(i).map(|v| v.unwrap_or(0)))
            .collect()
    };
    let mut st = c.prepare(VERIFY_EVENTS)?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let v = ints(r, 6)?;
        map.entry(v[0]).or_default().row = Some([v[1], v[2], v[3], v[4], v[5]]);
    }
    let mut st = c.prepare(VERIFY_BOOKINGS)?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let v = ints(r, 7)?;
        map.entry(v[0]).or_default().bookings = [v[1], v[2], v[3], v[4], v[5], v[6]];
    }
    let mut st = c.prepare(VERIFY_CUSTOMERS)?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let v = ints(r, 3)?;
        map.entry(v[0]).or_default().customers = [v[1], v[2]];
    }
    let mut totals = [None; 10];
    let (sums, scopes) = totals.split_at_mut(6);
    for (sql, into) in [(VERIFY_TOTALS, sums), (VERIFY_SCOPES_SQLITE, scopes)] {
        c.query_row(sql, [], |r| {
            for (i, t) in into.iter_mut().enumerate() {
                *t = r.get(i)?;
            }
            Ok(())
        })?;
    }
    Ok((map, totals))
}

fn pg_sums(tx: &mut ::postgres::Transaction<'_>) -> Result<Sums, ImportError> {
    let mut map: BTreeMap<i64, EventSums> = BTreeMap::new();
    let ints = |r: &::postgres::Row, n: usize| -> Vec<i64> {
        (0..n)
            .map(|i| r.get::<_, Option<i64>>(i).unwrap_or(0))
            .collect()
    };
    for r in tx.query(VERIFY_EVENTS, &[])? {
        let v = ints(&r, 6);
        map.entry(v[0]).or_default().row = Some([v[1], v[2], v[3], v[4], v[5]]);
    }
    for r in tx.query(VERIFY_BOOKINGS, &[])? {
        let v = ints(&r, 7);
        map.entry(v[0]).or_default().bookings = [v[1], v[2], v[3], v[4], v[5], v[6]];
    }
    for r in tx.query(VERIFY_CUSTOMERS, &[])? {
        let v = ints(&r, 3);
        map.entry(v[0]).or_default().customers = [v[1], v[2]];
    }
    let mut totals = [None; 10];
    let r = tx.query_one(VERIFY_TOTALS, &[])?;
    (0..6).for_each(|i| totals[i] = r.get(i));
    let r = tx.query_one(VERIFY_SCOPES_PG, &[])?;
    (0..4).for_each(|i| totals[6 + i] = r.get(i));
    Ok((map, totals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_would_split_a_row() {
        let mut l = Line::default();
        l.int(7);
        l.text("a\tb\\c\nd\re");
        l.opt_int(None);
        l.opt_text(None);
        l.text("");
        assert_eq!(l.buf, "7\ta\\tb\\\\c\\nd\\re\t\\N\t\\N\t");
        l.start();
        l.text("");
        l.int(1);
        assert_eq!(l.buf, "\t1", "an empty first field is still a field");
    }
}
