//! `ticketd backup --to FILE`: a consistent copy of a live SQLite database, taken while the
//! service keeps selling.
//!
//! A file copy of a WAL database is not a backup: the database file alone misses what is still
//! in the `-wal` file, and a copy taken during a checkpoint can be torn. SQLite's online backup
//! API copies the pages as one reader sees them: run in a single step it holds one read
//! transaction, so the copy is the database as of one commit — every booking acknowledged before
//! the backup started, and no half of a group — and in WAL mode a reader never blocks the writer.
//! The copy is written under a temporary name and renamed when complete and checked, so a
//! backup cut short never leaves a file that looks like one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::StoreError;

/// What a backup holds, to print and to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub path: PathBuf,
    pub events: i64,
    pub bookings: i64,
    pub bytes: u64,
}

/// Why a backup was not taken.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} exists; choose a new file (a backup never overwrites)")]
    Exists(PathBuf),
    #[error("{0} is not a ticketd database")]
    NotTicketd(PathBuf),
    #[error("the copy failed its integrity check: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<rusqlite::Error> for BackupError {
    fn from(e: rusqlite::Error) -> Self {
        BackupError::Store(StoreError::Sqlite(e))
    }
}

/// Copies the database at `from` to the new file `to`, as of one commit.
pub fn backup(from: &Path, to: &Path) -> Result<Copied, BackupError> {
    if to.exists() {
        return Err(BackupError::Exists(to.to_path_buf()));
    }
    // Read-write but never written: a WAL reader needs the shared-memory index; opening
    // read-only would fail on a database whose `-shm` it may not create.
    let src = Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    src.busy_timeout(Duration::from_secs(5))?;
    let is_ticketd: bool = src.query_row(
        "SELECT COUNT(*) = 2 FROM sqlite_master WHERE type = 'table' AND name IN ('events', 'bookings')",
        [],
        |r| r.get(0),
    )?;
    if !is_ticketd {
        return Err(BackupError::NotTicketd(from.to_path_buf()));
    }
    let partial = partial_name(to);
    let _ = std::fs::remove_file(&partial);
    let result = copy_and_check(&src, &partial);
    match result {
        Ok((events, bookings)) => {
            std::fs::rename(&partial, to)?;
            let bytes = std::fs::metadata(to)?.len();
            Ok(Copied {
                path: to.to_path_buf(),
                events,
                bookings,
                bytes,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn partial_name(to: &Path) -> PathBuf {
    let mut name = to.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// All pages in one step (one read transaction: one commit's state; a step-wise copy would
/// restart each time the service commits), then the copy checked and counted.
fn copy_and_check(src: &Connection, partial: &Path) -> Result<(i64, i64), BackupError> {
    let mut dst = Connection::open(partial)?;
    {
        let backup = Backup::new(src, &mut dst)?;
        loop {
            match backup.step(-1)? {
                StepResult::Done => break,
                // Locked by another connection for an instant: wait as a reader would.
                StepResult::Busy | StepResult::Locked => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                StepResult::More => {}
                _ => {}
            }
        }
    }
    let verdict: String = dst.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if verdict != "ok" {
        return Err(BackupError::Corrupt(verdict));
    }
    // A copy that is a file on its own: its WAL folded in, no `-wal` beside it.
    dst.pragma_update(None, "journal_mode", "DELETE")?;
    let events = dst.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?;
    let bookings = dst.query_row("SELECT COUNT(*) FROM bookings", [], |r| r.get(0))?;
    Ok((events, bookings))
}
