//! SQLite storage: the schema, the queries, the writer connection and the read pool.
//!
//! Exactly one connection per process writes (owned by the persistence actor); every read goes
//! through a small pool of read-only connections, which in WAL mode never block the writer and
//! never wait for it.

pub mod backup;
pub mod postgres;
pub mod queries;
pub mod schema;
pub mod wal;

use std::path::{Path, PathBuf};
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags};

pub use queries::{EventRow, Report};

/// How long a connection waits on a lock held by another connection before SQLITE_BUSY.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
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
    // Each batch runs in a savepoint; SQLite copies every page a batch touches first into the
    // statement journal, which past 64 KiB spills to a temporary file — a write per page. In
    // memory it costs a copy (profiled: 16 % of the writer's time with idempotency keys).
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Checkpoints: the writer runs them between groups (`wal::WalKeeper`).
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    schema::migrations().to_latest(&mut conn)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    queries::ensure_totals(&tx)?;
    tx.commit()?;
    Ok(conn)
}

/// True for SQLITE_BUSY / SQLITE_LOCKED: another connection (another replica) holds the lock.
pub fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

/// The pool of read-only connections used by routes, event actors (loading) and finalizers.
#[derive(Clone)]
pub struct ReadPool {
    pool: r2d2::Pool<SqliteConnectionManager>,
}

impl ReadPool {
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
        Ok(ReadPool { pool })
    }

    /// Runs `f` on a read connection on the blocking thread pool, so no reactor thread waits
    /// on SQLite.
    /// The future owns what it needs (`'static`), so actors can keep it past `&self`.
    pub fn read<T, F>(
        &self,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, StoreError>> + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let pool = self.pool.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let conn = pool.get()?;
                Ok(f(&conn)?)
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
