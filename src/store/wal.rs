//! Keeping the WAL small: checkpoints run by the writer itself, right after it has answered a
//! group, whenever the log has grown past a threshold.
//!
//! Why here and not on a thread of their own (what an earlier version did): SQLite starts the
//! log over from its beginning only when a checkpoint has copied *every* frame back before the
//! next write begins. A checkpointer running beside a writer that commits without pause never
//! catches up, so the log grew without bound (measured in `make bench`: 1.7 GiB after ten
//! seconds of bookings), every commit appended to a growing file (page-cache zeroing and ext4
//! block allocation were 15 % of the profile) and each fsync carried file-size metadata. Run by
//! the one writer between two groups, a PASSIVE checkpoint has nobody writing beside it (in
//! embedded mode) and completes; the next group then overwrites the log from its start. It runs
//! after the replies, so no client waits for it; new requests pile up into the next group.
//!
//! In cluster mode other replicas may commit during our checkpoint, leaving it incomplete; when
//! the log passes `FORCE_FACTOR` times the threshold anyway, a RESTART checkpoint holds the other
//! writers off (they wait on the busy timeout) until the log can start over.

use std::cell::Cell;
use std::os::raw::c_int;

use rusqlite::Connection;
use tracing::{debug, info_span, warn};

/// Log size (pages) that triggers a checkpoint: SQLite's own default for auto-checkpoints.
pub const CHECKPOINT_PAGES: i32 = 1000;
/// Log size, in thresholds, past which the checkpoint makes other writers wait.
const FORCE_FACTOR: i32 = 8;
/// How long a RESTART or TRUNCATE checkpoint may wait for other writers and readers. It holds up
/// this writer, so every booking of the process, while it waits: better to give up and try again
/// after more growth than to wait the writer's full busy timeout.
const BLOCKING_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

thread_local! {
    /// Pages in the log after this thread's last commit, as SQLite's WAL hook reports them.
    /// Per thread because the hook is a plain function and each writer commits on its own thread
    /// (tests run several applications in one process).
    static WAL_PAGES: Cell<i32> = const { Cell::new(0) };
}

fn note_pages(_wal: &rusqlite::hooks::Wal, pages: c_int) -> rusqlite::Result<()> {
    WAL_PAGES.with(|p| p.set(pages));
    Ok(())
}

/// Decides when the writer checkpoints. Owned by the writer thread.
pub struct WalKeeper {
    /// Log size at which the next checkpoint runs.
    next_at: i32,
}

impl WalKeeper {
    /// Takes over checkpointing on the writer connection (SQLite's auto-checkpoint, which would
    /// run inside COMMIT, before the replies, is turned off).
    pub fn install(conn: &Connection) -> rusqlite::Result<Self> {
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // After the pragma: it replaces the WAL hook.
        conn.wal_hook(Some(note_pages));
        Ok(WalKeeper {
            next_at: CHECKPOINT_PAGES,
        })
    }

    /// Pages in the log after the last commit on this thread.
    pub fn pages() -> i32 {
        WAL_PAGES.with(Cell::get)
    }

    /// Called by the writer after a group is committed and answered.
    pub fn after_commit(&mut self, conn: &Connection) {
        let pages = Self::pages();
        if pages < self.next_at {
            if pages < CHECKPOINT_PAGES {
                self.next_at = CHECKPOINT_PAGES; // the log started over
            }
            return;
        }
        let (mode, label) = if pages >= CHECKPOINT_PAGES * FORCE_FACTOR {
            ("RESTART", "restart")
        } else {
            ("PASSIVE", "passive")
        };
        let span = info_span!("checkpoint", pages, mode);
        let _enter = span.enter();
        match checkpoint(conn, mode) {
            Ok((busy, log, copied)) if !busy && log == copied => {
                debug!(log, "checkpoint complete; the log starts over");
                crate::metrics::wal_checkpoint(label, "complete");
                self.next_at = CHECKPOINT_PAGES;
                // The hook reports again only on the next commit that writes; a group that
                // writes nothing must not see the old count and checkpoint again.
                WAL_PAGES.with(|p| p.set(0));
            }
            Ok((busy, log, copied)) => {
                // Someone wrote or read beside us: try again after more growth.
                debug!(busy, log, copied, "checkpoint incomplete");
                crate::metrics::wal_checkpoint(label, "incomplete");
                self.next_at = pages + CHECKPOINT_PAGES;
            }
            Err(e) => {
                warn!(error = %e, "checkpoint failed");
                crate::metrics::wal_checkpoint(label, "failed");
                self.next_at = pages + CHECKPOINT_PAGES;
            }
        }
    }

    /// The last checkpoint before the writer stops: empties the log file if nobody else is
    /// using it (another replica may be).
    pub fn at_exit(conn: &Connection) {
        if let Err(e) = checkpoint(conn, "TRUNCATE") {
            debug!(error = %e, "final checkpoint skipped");
        }
    }
}

/// `PRAGMA wal_checkpoint(mode)`: (busy, frames in the log, frames copied back). PASSIVE never
/// waits; the other modes wait at most `BLOCKING_WAIT`, then the writer's own busy handler is
/// put back.
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(bool, i32, i32)> {
    let blocking = mode != "PASSIVE";
    if blocking {
        conn.busy_timeout(BLOCKING_WAIT)?;
    }
    let result = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get::<_, i32>(0)? != 0, r.get(1)?, r.get(2)?))
    });
    if blocking {
        conn.busy_handler(Some(super::wait_for_write_lock))?;
    }
    result
}

#[cfg(all(test, not(ticketd_loom)))]
mod tests {
    use super::*;

    /// Bookings-like rows: each commit adds a few pages to the log.
    fn grow(conn: &Connection, commits: usize) {
        for i in 0..commits {
            conn.execute(
                "INSERT INTO t (v) VALUES (?1)",
                [format!("{i:0>3000}")], // most of a page per row
            )
            .unwrap();
        }
    }

    #[test]
    fn the_log_starts_over_instead_of_growing() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("w.db")).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute("CREATE TABLE t (v TEXT)", []).unwrap();
        let mut keeper = WalKeeper::install(&conn).unwrap();
        let complete = "ticketd_wal_checkpoints_total{mode=\"passive\",outcome=\"complete\"}";
        let checkpoints = crate::metrics::sample(complete);
        let mut highest = 0;
        for _ in 0..20 {
            grow(&conn, 200);
            highest = highest.max(WalKeeper::pages());
            keeper.after_commit(&conn);
        }
        assert!(
            highest >= CHECKPOINT_PAGES,
            "the test wrote enough: {highest}"
        );
        assert!(
            highest < CHECKPOINT_PAGES + 300,
            "the log was reused, not extended: {highest} pages at most"
        );
        assert!(
            crate::metrics::sample(complete) > checkpoints,
            "every checkpoint is counted, with its mode and outcome"
        );
        let wal = std::fs::metadata(dir.path().join("w.db-wal"))
            .unwrap()
            .len();
        assert!(
            wal < 2 * (CHECKPOINT_PAGES as u64) * 4096,
            "log file stays bounded: {wal} bytes"
        );
        // A completed checkpoint forgets the count: a group that writes nothing next (no hook
        // call) must not checkpoint again on the old number.
        while WalKeeper::pages() < CHECKPOINT_PAGES {
            grow(&conn, 50);
        }
        keeper.after_commit(&conn);
        assert_eq!(WalKeeper::pages(), 0);
        WalKeeper::at_exit(&conn);
        let wal = std::fs::metadata(dir.path().join("w.db-wal"))
            .unwrap()
            .len();
        assert_eq!(wal, 0, "truncated at exit");
    }
}
