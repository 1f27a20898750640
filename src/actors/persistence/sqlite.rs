//! The group transaction on SQLite: `BEGIN IMMEDIATE`, each op in a savepoint of its own (a
//! refused or failed batch is undone alone), the totals, `COMMIT` — one fsync for the group.
//! Between groups the writer keeps the WAL in check (`WalKeeper`).

use rusqlite::{Connection, TransactionBehavior};
use tracing::{error, info_span, warn};

use super::{Applied, SeatBatch, Stamps, WriteOp};
use crate::store::queries::{FencedBatch, IssuedTicket, NewBookingRow, PurgeCursor, TotalsDelta};
use crate::store::sqlite as queries;
use crate::store::wal::WalKeeper;
use crate::store::StoreError;

/// Times BEGIN IMMEDIATE is retried after SQLITE_BUSY (each after the busy timeout).
const BEGIN_RETRIES: u32 = 3;

/// The writer's SQLite connection and its checkpointer.
pub(super) struct Db {
    conn: Connection,
    wal: Option<WalKeeper>,
}

impl Db {
    pub(super) fn open(conn: Connection) -> Db {
        let wal = match WalKeeper::install(&conn) {
            Ok(k) => Some(k),
            Err(e) => {
                error!(error = %e, "cannot manage checkpoints; SQLite's automatic ones stay on");
                None
            }
        };
        Db { conn, wal }
    }

    pub(super) fn after_group(&mut self) {
        if let Some(k) = self.wal.as_mut() {
            k.after_commit(&self.conn);
        }
    }

    pub(super) fn close(self) {
        WalKeeper::at_exit(&self.conn);
    }

    pub(super) fn purge_expired_keys(
        &mut self,
        cursor: &mut PurgeCursor,
        before_ms: i64,
        chunk: usize,
    ) -> Result<usize, StoreError> {
        Ok(queries::purge_expired_keys(
            &self.conn, cursor, before_ms, chunk,
        )?)
    }

    /// The group in one transaction; `None` if it failed (every op has been answered).
    pub(super) fn write(&mut self, group: Vec<WriteOp>, at: &Stamps<'_>) -> Option<Vec<Applied>> {
        // Other replicas share the file in cluster mode: BEGIN IMMEDIATE waits for their write lock
        // (busy_timeout), and a few retries ride out a long checkpoint or a burst of theirs.
        let mut attempt = 0;
        let tx = loop {
            match self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
            {
                Ok(tx) => break tx,
                Err(e) if crate::store::is_busy(&e) && attempt < BEGIN_RETRIES => {
                    attempt += 1;
                    warn!(attempt, "database busy; retrying the group transaction");
                    std::thread::sleep(std::time::Duration::from_millis(20 * attempt as u64));
                }
                Err(e) => {
                    warn!(error = %e, "could not begin the group transaction");
                    crate::metrics::handles().group_failures.increment(1);
                    let why = StoreError::Sqlite(e);
                    group.into_iter().for_each(|op| op.fail(&why));
                    return None;
                }
            }
        };
        let mut applied = Vec::with_capacity(group.len());
        let mut totals = TotalsDelta::default();
        for op in group {
            let a = apply(&tx, op, at);
            totals += a.totals();
            applied.push(a);
        }
        // The report's totals move in the same transaction as the rows they sum.
        let committed = match totals.is_zero() {
            true => commit(tx),
            false => queries::add_to_totals(&tx, &totals).and_then(|()| commit(tx)),
        };
        if let Err(e) = committed {
            error!(error = %e, "group commit failed; every op of the group is answered as failed");
            crate::metrics::handles().group_failures.increment(1);
            let why = StoreError::Sqlite(e);
            for a in applied {
                a.fail(&why);
            }
            return None;
        }
        Some(applied)
    }
}

/// COMMITs the group. Tests make it fail (failpoint `writer-commit`, returning the error a full
/// disk or an I/O error would): dropping the transaction rolls it back, as SQLite does after a
/// failed COMMIT, so nothing of the group is written and none of its clients may hear 200.
fn commit(tx: rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    fail::fail_point!("writer-commit", |_| Err(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
        Some("injected COMMIT failure (failpoint writer-commit)".into()),
    )));
    tx.commit()
}

fn apply(tx: &rusqlite::Transaction<'_>, op: WriteOp, at: &Stamps<'_>) -> Applied {
    match op {
        WriteOp::CreateEvent { event, reply } => {
            let e = &event;
            match queries::insert_event(
                tx,
                &e.title,
                e.capacity,
                e.max_per_user,
                e.key.as_deref(),
                at.now_ms,
                at.keys_live_after_ms,
            ) {
                Ok(created) => Applied::Event(reply, created),
                Err(err) => Applied::Error(WriteOp::CreateEvent { event, reply }, err.into()),
            }
        }
        WriteOp::Finalize { tickets, reply } => match finalize_in_savepoint(tx, &tickets, at) {
            Ok((written, seats)) => Applied::Finalized(reply, written, seats),
            Err(e) => Applied::Error(WriteOp::Finalize { tickets, reply }, e.into()),
        },
        WriteOp::Seats(batch) => apply_seats(tx, batch, at),
    }
}

/// Writes a finalizer's tickets all or nothing within the group: a failure undoes its own
/// statements, not the group's other ops (their clients may still hear 200).
fn finalize_in_savepoint(
    tx: &rusqlite::Transaction<'_>,
    tickets: &[IssuedTicket],
    at: &Stamps<'_>,
) -> rusqlite::Result<(usize, i64)> {
    savepoint(tx)?;
    match queries::finalize_many(tx, tickets, at.now) {
        Ok(done) => {
            release_savepoint(tx)?;
            Ok(done)
        }
        Err(e) => {
            let _ = rollback_savepoint(tx);
            Err(e)
        }
    }
}

/// One op of the group (a batch, a finalizer's tickets) runs inside its own savepoint, so a
/// refused or failed op is undone alone. The statements are prepared once: the hot path runs
/// them for every batch.
fn savepoint(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.prepare_cached("SAVEPOINT op")?.execute([])?;
    Ok(())
}

fn release_savepoint(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.prepare_cached("RELEASE op")?.execute([])?;
    Ok(())
}

/// Undoes the op inside the group transaction.
fn rollback_savepoint(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.prepare_cached("ROLLBACK TO op")?.execute([])?;
    release_savepoint(tx)
}

fn apply_seats(tx: &rusqlite::Transaction<'_>, batch: SeatBatch, at: &Stamps<'_>) -> Applied {
    let _span = info_span!(
        "batch",
        event_id = batch.event_id,
        size = batch.requests.len(),
        cancels = batch.cancels.len(),
        token = batch.token
    )
    .entered();
    let rows: Vec<NewBookingRow<'_>> = batch
        .requests
        .iter()
        .map(|r| NewBookingRow {
            user_id: r.user_id,
            quantity: r.quantity,
            key: r.key.as_deref(),
        })
        .collect();
    let cancel_ids: Vec<i64> = batch.cancels.iter().map(|c| c.booking_id).collect();
    let fenced = FencedBatch {
        event_id: batch.event_id,
        token: batch.token,
        cancels: &cancel_ids,
        bookings: &rows,
        now: at.now,
        now_ms: at.now_ms,
        keys_live_after_ms: at.keys_live_after_ms,
    };
    // A savepoint per batch: a refused or failed batch is undone alone.
    let result = savepoint(tx)
        .and_then(|()| queries::apply_fenced_batch(tx, &fenced))
        .and_then(|r| {
            if r.is_ok() {
                release_savepoint(tx)?;
            }
            Ok(r)
        });
    drop(rows);
    match result {
        Ok(Ok(done)) => super::seats_written(batch, done, at.now),
        Ok(Err(refusal)) => {
            let _ = rollback_savepoint(tx);
            super::seats_refused(batch, refusal)
        }
        Err(e) => {
            let _ = rollback_savepoint(tx);
            warn!(error = %e, "batch failed");
            Applied::Error(WriteOp::Seats(batch), e.into())
        }
    }
}
