//! The storage seam: one writer connection per process (`WriteConn`, owned by the persistence
//! actor) and a pool of read connections (`ReadPool`, lending a `ReadConn`), each SQLite's or
//! PostgreSQL's as `DATABASE_URL` says; the reads every caller uses (`queries`) dispatch on the
//! connection, the group commit on the writer's (`actors::persistence`). Nothing above this
//! module names a backend.
//!
//! SQLite: in WAL mode the read-only connections never block the writer and never wait for it.
//! PostgreSQL: see `postgres`.

pub mod backup;
pub mod import;
pub mod postgres;
pub mod queries;
pub mod schema;
pub mod sqlite;
pub mod wal;

use std::path::{Path, PathBuf};
use std::time::Duration;

use r2d2_postgres::PostgresConnectionManager;
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags};

pub use queries::{EventRow, Report};

/// How long a connection waits on a lock held by another connection before SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] ::postgres::Error),
    #[error("postgres migration: {0}")]
    PgMigration(#[from] self::postgres::schema::MigrateError),
    /// The database cannot be reached (PostgreSQL down, restarting, cut off): retry later.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The connection was lost after COMMIT was sent and before its answer: written or not,
    /// nobody knows here. Retrying with the same idempotency key tells.
    #[error("the outcome of the commit is unknown: {0}")]
    OutcomeUnknown(String),
    #[error("read pool: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("migration: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("the writer has stopped")]
    WriterClosed,
    #[error("the writer is overloaded")]
    WriterFull,
    #[error("the database is busy")]
    Busy,
    #[error("a blocking task failed: {0}")]
    Task(String),
}

impl StoreError {
    /// The same error for another waiter (one failure answers many clients): its kind — busy,
    /// overloaded, stopped — survives, so the route still maps it to the right status (a busy
    /// database is a 503 to retry, not a 500).
    pub fn for_reply(&self) -> StoreError {
        match self {
            StoreError::Sqlite(e) if is_busy(e) => StoreError::Busy,
            StoreError::Busy => StoreError::Busy,
            StoreError::Postgres(e) if pg_unavailable(e) => StoreError::Unavailable(e.to_string()),
            StoreError::Unavailable(e) => StoreError::Unavailable(e.clone()),
            StoreError::OutcomeUnknown(e) => StoreError::OutcomeUnknown(e.clone()),
            StoreError::WriterClosed => StoreError::WriterClosed,
            StoreError::WriterFull => StoreError::WriterFull,
            other => StoreError::Task(other.to_string()),
        }
    }
}

/// Opens (creating if needed) and migrates the database file; returns the writer connection.
///
/// WAL lets readers run beside the writer; `synchronous = FULL` makes every commit durable
/// before `POST /book` answers 200 (promise 2), at the cost of one fsync per group commit,
/// which group commit spreads over many bookings.
pub fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Sqlite(rusqlite::Error::InvalidPath(PathBuf::from(format!(
                "{}: {e}",
                dir.display()
            ))))
        })?;
    }
    // Replicas starting together on one file would race to switch it to WAL ("database is
    // locked") and each run the migrations from version 0; an exclusive lock on a sidecar file
    // makes them take turns for the whole setup.
    let lock_path = path.with_extension("migrate-lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .and_then(|f| f.lock().map(|()| f))
        .map_err(|e| StoreError::Task(format!("{}: {e}", lock_path.display())))?;
    let conn = setup_writer(path);
    drop(lock);
    conn
}

/// Naps of `SHORT_NAP` before the writer falls back to 1 ms ones while another replica holds
/// the write lock.
const SHORT_NAPS: i32 = 50;
const SHORT_NAP: Duration = Duration::from_micros(100);

/// The writer's busy handler: waits for another replica's write lock in short naps, giving up
/// after about `BUSY_TIMEOUT`. SQLite's own busy timeout sleeps 1, 2, 5, 10, 15, 20, 25... ms
/// between attempts, so in cluster mode a collision with a commit that takes a fraction of a
/// millisecond cost every booking of the group several milliseconds (the cluster's p99).
pub(crate) fn wait_for_write_lock(attempt: i32) -> bool {
    let long_naps = BUSY_TIMEOUT.as_millis() as i32;
    if attempt < SHORT_NAPS {
        std::thread::sleep(SHORT_NAP);
    } else {
        std::thread::sleep(Duration::from_millis(1));
    }
    attempt < SHORT_NAPS + long_naps
}

fn setup_writer(path: &Path) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(path)?;
    conn.busy_handler(Some(wait_for_write_lock))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    // A batch in a group of several runs in a savepoint (`actors::persistence::sqlite`); SQLite
    // copies every page it touches first into the statement journal, which past 64 KiB spills
    // to a temporary file — a write per page. In memory it costs a copy (profiled: 16 % of the
    // writer's time with idempotency keys).
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Checkpoints: the writer runs them between groups (`wal::WalKeeper`).
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    schema::migrations().to_latest(&mut conn)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    sqlite::ensure_totals(&tx)?;
    tx.commit()?;
    Ok(conn)
}

/// Opens PostgreSQL at `url` for a start: migrates it (under the advisory lock, so replicas
/// starting together take turns), reads the ticket key stored there — inserting `key_default`
/// first when there is none — and connects the writer. Blocking, on a thread of its own: the
/// blocking `postgres` client must not run inside the caller's async runtime.
pub fn open_postgres(
    url: &str,
    key_default: Option<String>,
) -> Result<(WriteConn, Option<String>), StoreError> {
    let url = url.to_string();
    std::thread::scope(|s| {
        s.spawn(|| {
            let config = ::postgres::Config::from(pg_config(&url)?);
            let mut client = config.connect(::postgres::NoTls)?;
            self::postgres::schema::migrate(&mut client)?;
            let key = match key_default {
                Some(k) => Some(self::postgres::queries::meta_get_or_insert(
                    &mut client,
                    "ticket_key",
                    &k,
                )?),
                None => None,
            };
            drop(client);
            let writer = self::postgres::writer::PgWriter::connect(&url)?;
            Ok((
                WriteConn::Postgres {
                    url: url.clone(),
                    writer: PgStart(Some(writer)),
                },
                key,
            ))
        })
        .join()
        .map_err(|_| StoreError::Task("the PostgreSQL setup panicked".into()))?
    })
}

/// True for SQLITE_BUSY / SQLITE_LOCKED: another connection (another replica) holds the lock.
pub fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

/// True when a PostgreSQL error says the server cannot be reached or is going away (connection
/// lost or refused, shutdown, too many connections): a 503 to retry, not a 500. An error the
/// server answered about a statement is not.
pub fn pg_unavailable(e: &::postgres::Error) -> bool {
    match e.code() {
        None => e.as_db_error().is_none(),
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P") || c.starts_with("53")
        }
    }
}

/// Drops `v` on a thread of its own when called on an async runtime's thread: the blocking
/// `postgres` client and the writer's runtime panic if dropped there (they block to close).
pub fn drop_off_runtime<T: Send + 'static>(v: T) {
    if tokio::runtime::Handle::try_current().is_ok() {
        let _ = std::thread::spawn(move || drop(v)).join();
    } else {
        drop(v);
    }
}

/// The connection of the one writer of the process, for `actors::PersistenceActor`.
pub enum WriteConn {
    Sqlite(Connection),
    /// PostgreSQL: the writer connects (and reconnects after a loss) by itself; `writer` holds
    /// the connection made at start.
    Postgres {
        url: String,
        writer: PgStart,
    },
}

/// The writer's PostgreSQL connection made at start, on its way to the writer thread; a start
/// that fails before it gets there drops it off the runtime (`drop_off_runtime`).
pub struct PgStart(Option<self::postgres::writer::PgWriter>);

impl PgStart {
    pub fn take(mut self) -> Option<self::postgres::writer::PgWriter> {
        self.0.take()
    }
}

impl Drop for PgStart {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            drop_off_runtime(w);
        }
    }
}

/// The PostgreSQL read pool; its last handle dropped (at stop, often on an actix thread)
/// closes its connections off the runtime.
struct PgPool(Option<r2d2::Pool<PgManager>>);

impl Drop for PgPool {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            drop_off_runtime(p);
        }
    }
}

impl From<Connection> for WriteConn {
    fn from(c: Connection) -> Self {
        WriteConn::Sqlite(c)
    }
}

/// A read connection lent by `ReadPool::read`; `queries::*` run on either.
pub enum ReadConn<'a> {
    Sqlite(&'a Connection),
    Postgres(&'a mut ::postgres::Client),
}

type PgManager = PostgresConnectionManager<::postgres::NoTls>;

#[derive(Clone)]
enum Pool {
    Sqlite(r2d2::Pool<SqliteConnectionManager>),
    Postgres(std::sync::Arc<PgPool>),
}

/// The pool of read connections used by routes, event actors (loading) and finalizers.
#[derive(Clone)]
pub struct ReadPool {
    pool: Pool,
}

/// How long a PostgreSQL read waits for a connection (the server down: a quick 503, not a
/// stalled route), and how long connecting may take.
const PG_POOL_WAIT: Duration = Duration::from_secs(2);
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection may go without hearing from the server before it counts as lost: sent
/// data unacknowledged (`tcp_user_timeout`), or an idle connection's keepalive probes unanswered.
const PG_SILENCE: Duration = Duration::from_secs(5);

/// `DATABASE_URL` as every PostgreSQL connection's settings, with what a sale needs where the
/// URL says nothing: a connect timeout, and a bound on silence. Without it a connection whose
/// server's host went silent (a network cut, not a refusal) waits for TCP's own retries —
/// minutes — and the writer holds its group's clients and the event's lease all that while; with
/// it, the connection fails in seconds, the group is answered (503, or "outcome unknown" if the
/// COMMIT was sent), and the writer connects again.
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(PG_CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(PG_SILENCE);
    }
    // The URL's `keepalives_idle`, if any, else ours (the library's default is two hours).
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config
            .keepalives(true)
            .keepalives_idle(PG_SILENCE)
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3);
    }
    Ok(config)
}

impl ReadPool {
    /// Read connections to PostgreSQL at `url` (already migrated).
    pub fn open_postgres(url: &str, size: u32) -> Result<Self, StoreError> {
        let config = pg_config(url).map_err(|e| StoreError::Task(format!("DATABASE_URL: {e}")))?;
        let config = ::postgres::Config::from(config);
        let manager = PgManager::new(config, ::postgres::NoTls);
        let pool = r2d2::Pool::builder()
            .max_size(size.max(1))
            .connection_timeout(PG_POOL_WAIT)
            .build(manager)?;
        Ok(ReadPool {
            pool: Pool::Postgres(std::sync::Arc::new(PgPool(Some(pool)))),
        })
    }

    /// Read-only connections to the SQLite file at `path`.
    pub fn open(path: &Path, size: u32) -> Result<Self, StoreError> {
        let manager = SqliteConnectionManager::file(path)
            .with_flags(
                OpenFlags::SQLITE_OPEN_READ_ONLY
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_URI,
            )
            .with_init(|c| {
                c.busy_timeout(BUSY_TIMEOUT)?;
                c.pragma_update(None, "query_only", "ON")
            });
        let pool = r2d2::Pool::builder()
            .max_size(size.max(1))
            .connection_timeout(Duration::from_secs(10))
            .build(manager)?;
        Ok(ReadPool {
            pool: Pool::Sqlite(pool),
        })
    }

    /// Runs `f` (one of `queries::*`, mostly) on a read connection on the blocking thread pool,
    /// so no reactor thread waits on the database.
    /// The future owns what it needs (`'static`), so actors can keep it past `&self`.
    pub fn read<T, F>(
        &self,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, StoreError>> + 'static
    where
        T: Send + 'static,
        F: FnOnce(&mut ReadConn<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.pool.clone();
        async move {
            tokio::task::spawn_blocking(move || match pool {
                Pool::Sqlite(pool) => {
                    let conn = pool.get()?;
                    f(&mut ReadConn::Sqlite(&conn))
                }
                Pool::Postgres(pool) => {
                    let pool = pool.0.as_ref().ok_or(StoreError::WriterClosed)?;
                    let mut conn = pool.get()?;
                    f(&mut ReadConn::Postgres(&mut conn))
                }
            })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Promise 2 rests on these two settings of the writer connection: no process kill can show
    /// a missing fsync (the page cache survives it), only a power loss would, so they are
    /// checked here on the connection `open_writer` hands to the persistence actor.
    #[test]
    fn the_writer_commits_durably_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("t.db")).unwrap();
        let journal: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        let synchronous: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
        assert_eq!(
            synchronous, 2,
            "synchronous = FULL: every COMMIT is fsynced"
        );
    }
}
