//! The group transaction on SQLite: `BEGIN IMMEDIATE`, each op in a savepoint of its own (a
//! refused or failed batch is undone alone), the totals, `COMMIT` — one fsync for the group.
//! Between groups the writer keeps the WAL in check (`WalKeeper`).
//!
//! Except a group of one op: undoing it is undoing the transaction, so it runs bare and is
//! rolled back if it is refused or fails. A savepoint is not free: SQLite copies every page an
//! op touches into the statement journal first (a 4 KiB copy and an allocation per page: 3–4 %
//! of the writer's CPU in `make bench` row 2b), and the hot event's groups are mostly one batch.
//! (Running the first op of a larger group bare as well would mean a new transaction for the
//! rest after a refusal — a second BEGIN IMMEDIATE, in cluster mode a wait for the other
//! replicas' lock — for the few groups that hold a batch and a finalizer's tickets.)

use rusqlite::{Connection, TransactionBehavior};
use tracing::{error, info_span, warn};

use super::{Applied, SeatBatch, Stamps, WriteOp};
use crate::store::queries::{FencedBatch, NewBookingRow, PurgeCursor, TotalsDelta};
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
        // A group of one op runs it bare (see the module's doc): undoing it is rolling back.
        let bare = group.len() == 1;
        let tx = match begin(&self.conn) {
            Ok(tx) => tx,
            Err(why) => return fail_all(why, Vec::new(), group.into_iter()),
        };
        let mut applied = Vec::with_capacity(group.len());
        let mut totals = TotalsDelta::default();
        let mut ops = group.into_iter();
        while let Some(op) = ops.next() {
            let a = apply(&tx, op, at, !bare);
            if a.undone() && bare {
                if let Err(e) = tx.rollback() {
                    error!(error = %e, "could not roll back a refused or failed op");
                }
                return Some(vec![a]);
            }
            if a.undone() && self.conn.is_autocommit() {
                // SQLite rolled the whole transaction back on its own (it may, on a full disk, an
                // I/O error, out of memory): the ops applied before this one went with it, and
                // each op after it would commit alone. None of the group is written.
                error!("the group transaction was rolled back by SQLite; the group fails");
                applied.push(a);
                let why = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT_ROLLBACK),
                    Some("the group transaction was rolled back".into()),
                ));
                return fail_all(why, applied, ops);
            }
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

/// `BEGIN IMMEDIATE`. Other replicas share the file in cluster mode: it waits for their write
/// lock (busy_timeout), and a few retries ride out a long checkpoint or a burst of theirs.
/// (`new_unchecked` takes the connection shared, so a retry can borrow it again; this writer
/// never nests transactions.)
fn begin(conn: &Connection) -> Result<rusqlite::Transaction<'_>, StoreError> {
    // A transaction still open here was left by a ROLLBACK that failed (a refused or failed op
    // of a group of one is undone that way, see `write`). Nothing in it was committed, and
    // nothing may be: it is rolled back before the group. (Left open, every BEGIN after it
    // failed, and the writer answered 503 to every write until a restart.)
    if !conn.is_autocommit() {
        error!("a transaction was left open by a failed rollback; rolling it back");
        conn.execute_batch("ROLLBACK").map_err(StoreError::Sqlite)?;
    }
    let mut attempt = 0;
    loop {
        match rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate) {
            Ok(tx) => return Ok(tx),
            Err(e) if crate::store::is_busy(&e) && attempt < BEGIN_RETRIES => {
                attempt += 1;
                warn!(attempt, "database busy; retrying the group transaction");
                std::thread::sleep(std::time::Duration::from_millis(20 * attempt as u64));
            }
            Err(e) => {
                warn!(error = %e, "could not begin the group transaction");
                return Err(StoreError::Sqlite(e));
            }
        }
    }
}

/// The group fails before its COMMIT (no transaction could be begun, or SQLite rolled it back):
/// every op is answered as failed, those applied (nothing of them is written) and those not yet
/// run.
fn fail_all(
    why: StoreError,
    applied: Vec<Applied>,
    rest: impl Iterator<Item = WriteOp>,
) -> Option<Vec<Applied>> {
    crate::metrics::handles().group_failures.increment(1);
    applied.into_iter().for_each(|a| a.fail(&why));
    rest.for_each(|op| op.fail(&why));
    None
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

/// Applies one op; `guarded`: in a savepoint of its own (the transaction holds ops to keep).
fn apply(tx: &rusqlite::Transaction<'_>, op: WriteOp, at: &Stamps<'_>, guarded: bool) -> Applied {
    match op {
        WriteOp::CreateEvent { event, reply } => {
            let e = &event;
            let created = undoable(
                tx,
                guarded,
                || {
                    queries::insert_event(
                        tx,
                        &e.title,
                        e.capacity,
                        e.max_per_user,
                        e.key.as_deref(),
                        at.now_ms,
                        at.keys_live_after_ms,
                    )
                },
                |_| true,
            );
            match created {
                Ok(created) => Applied::Event(reply, created),
                Err(err) => Applied::Error(WriteOp::CreateEvent { event, reply }, err.into()),
            }
        }
        // A finalizer's tickets all or nothing within the group: a failure undoes its own
        // statements, not the group's other ops (their clients may still hear 200).
        WriteOp::Finalize { tickets, reply } => {
            match undoable(
                tx,
                guarded,
                || queries::finalize_many(tx, &tickets, at.now),
                |_| true,
            ) {
                Ok((written, seats)) => Applied::Finalized(reply, written, seats),
                Err(e) => Applied::Error(WriteOp::Finalize { tickets, reply }, e.into()),
            }
        }
        WriteOp::Seats(batch) => apply_seats(tx, batch, at, guarded),
    }
}

/// Runs an op's statements; `guarded`, inside a savepoint of its own that is released if `keep`
/// says so of the result and rolled back otherwise (a refusal) or on an error, so the op is
/// undone alone. Unguarded, the caller undoes it with the transaction (`Applied::undone`).
fn undoable<T>(
    tx: &rusqlite::Transaction<'_>,
    guarded: bool,
    run: impl FnOnce() -> rusqlite::Result<T>,
    keep: impl FnOnce(&T) -> bool,
) -> rusqlite::Result<T> {
    if !guarded {
        return run();
    }
    savepoint(tx)?;
    match run() {
        Ok(v) if keep(&v) => match release_savepoint(tx) {
            Ok(()) => Ok(v),
            Err(e) => {
                let _ = rollback_savepoint(tx);
                Err(e)
            }
        },
        other => {
            let _ = rollback_savepoint(tx);
            other
        }
    }
}

/// The statements are prepared once: the hot path runs them for every guarded op.
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

fn apply_seats(
    tx: &rusqlite::Transaction<'_>,
    batch: SeatBatch,
    at: &Stamps<'_>,
    guarded: bool,
) -> Applied {
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
    let result = undoable(
        tx,
        guarded,
        || queries::apply_fenced_batch(tx, &fenced),
        |r| r.is_ok(),
    );
    drop(rows);
    match result {
        Ok(Ok(done)) => super::seats_written(batch, done, at.now),
        Ok(Err(refusal)) => super::seats_refused(batch, refusal),
        Err(e) => {
            warn!(error = %e, "batch failed");
            Applied::Error(WriteOp::Seats(batch), e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::persistence::SeatBatch;
    use crate::domain::{IdempotencyKey, KeyScope, SeatRequest};
    use std::sync::Arc;
    use tokio::sync::oneshot;

    const NOW: &str = "2026-12-05 12:00:00.000000";
    const NOW_MS: i64 = 1_796_472_000_000;

    fn stamps() -> Stamps<'static> {
        Stamps {
            now: NOW,
            now_ms: NOW_MS,
            keys_live_after_ms: NOW_MS - 86_400_000,
        }
    }

    /// A batch under `token` of keyed requests `(user, seats)` (the receivers are dropped: the
    /// test reads what the writer applied and what the file holds).
    fn batch(event_id: i64, token: i64, requests: &[(i64, i64)]) -> WriteOp {
        let (done, _) = oneshot::channel();
        let requests = requests
            .iter()
            .map(|&(user, quantity)| SeatRequest {
                user_id: user,
                quantity,
                key: Some(Arc::new(IdempotencyKey {
                    scope: KeyScope::Customer(user),
                    key: format!("k{user}"),
                    fingerprint: "f".into(),
                })),
                reply: oneshot::channel().0,
            })
            .collect();
        WriteOp::Seats(SeatBatch {
            event_id,
            token,
            requests,
            cancels: vec![],
            done,
        })
    }

    fn kinds(applied: &[Applied]) -> Vec<&'static str> {
        applied
            .iter()
            .map(|a| match a {
                Applied::Seats { .. } => "written",
                Applied::SeatsRefused { .. } => "refused",
                _ => "other",
            })
            .collect()
    }

    fn count(db: &Db, sql: &str) -> i64 {
        db.conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// A group of one op runs it without a savepoint: refused by the fenced update, which comes
    /// after its booking rows, keys and customers' seats are written, it must be rolled back with
    /// the transaction; in a larger group, each op in its savepoint is undone alone.
    #[test]
    fn a_refused_batch_leaves_nothing_wherever_it_is_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(crate::store::open_writer(&dir.path().join("t.db")).unwrap());
        let at = stamps();
        let ev = queries::insert_event(&db.conn, "Hot", 6, Some(4), None, NOW_MS, 0)
            .unwrap()
            .unwrap()
            .id;
        let written = db.write(vec![batch(ev, 5, &[(1, 2)])], &at).unwrap();
        assert_eq!(kinds(&written), ["written"]);
        // 6 seats wanted, 4 left: refused, alone in its group.
        let alone = db
            .write(vec![batch(ev, 6, &[(2, 3), (3, 3)])], &at)
            .unwrap();
        assert_eq!(kinds(&alone), ["refused"]);
        // Refused first, then a batch that fits.
        let first = db
            .write(
                vec![batch(ev, 6, &[(2, 3), (3, 2)]), batch(ev, 6, &[(4, 1)])],
                &at,
            )
            .unwrap();
        assert_eq!(kinds(&first), ["refused", "written"]);
        // A batch that fits, then one that does not.
        let last = db
            .write(
                vec![batch(ev, 7, &[(5, 1)]), batch(ev, 7, &[(6, 2), (7, 1)])],
                &at,
            )
            .unwrap();
        assert_eq!(kinds(&last), ["written", "refused"]);
        // A stale token, alone.
        let stale = db.write(vec![batch(ev, 2, &[(9, 1)])], &at).unwrap();
        assert_eq!(kinds(&stale), ["refused"]);

        let users = |table: &str| users_in(&db, table);
        assert_eq!(
            users("bookings"),
            [1, 4, 5],
            "only the written batches' rows"
        );
        assert_eq!(
            users("customer_seats"),
            [1, 4, 5],
            "only their customers' seats"
        );
        let keys: Vec<String> = db
            .conn
            .prepare("SELECT key FROM idempotency_keys ORDER BY key")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            keys,
            ["k1", "k4", "k5"],
            "refused batches give their keys back"
        );
        assert_eq!(count(&db, "SELECT booked_count FROM events"), 4);
        assert_eq!(count(&db, "SELECT fence FROM events"), 7);
        assert_eq!(
            count(&db, "SELECT CAST(booked AS INTEGER) FROM report_totals"),
            4,
            "the report's totals count the written batches once"
        );
    }

    /// A ROLLBACK that failed leaves its transaction open on the writer's connection, holding
    /// what a refused op of a group of one wrote before its refusal: the next group rolls it
    /// back first. Its rows are never committed, and the writer goes on.
    #[test]
    fn a_transaction_left_open_is_rolled_back_before_the_next_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(crate::store::open_writer(&dir.path().join("t.db")).unwrap());
        let at = stamps();
        let ev = queries::insert_event(&db.conn, "Hot", 10, None, None, NOW_MS, 0)
            .unwrap()
            .unwrap()
            .id;
        db.conn
            .execute_batch(&format!(
                "BEGIN IMMEDIATE;
                 INSERT INTO bookings (event_id, user_id, quantity, status, created_at)
                 VALUES ({ev}, 99, 1, 'PENDING', '{NOW}');"
            ))
            .unwrap();
        let next = db
            .write(vec![batch(ev, 5, &[(1, 1)])], &at)
            .expect("the writer goes on");
        assert_eq!(kinds(&next), ["written"]);
        assert_eq!(
            users_in(&db, "bookings"),
            [1],
            "what the open transaction held is not committed"
        );
    }

    /// Rows of `table` by user, in order.
    fn users_in(db: &Db, table: &str) -> Vec<i64> {
        let mut st = db
            .conn
            .prepare(&format!("SELECT user_id FROM {table} ORDER BY user_id"))
            .unwrap();
        let v: Vec<i64> = st
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        v
    }

    /// An op that fails after writing (a statement refused by the file, here a trigger on the
    /// test's connection) leaves nothing, bare or not; and when SQLite rolls the whole
    /// transaction back on its own (as it may on a full disk or an I/O error; here
    /// `RAISE(ROLLBACK)`), the group fails: neither the ops before the failing one nor those
    /// after it may be written, although each op after it would commit alone, outside any
    /// transaction, if the group went on.
    #[test]
    fn a_failed_op_leaves_nothing_and_a_lost_transaction_fails_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(crate::store::open_writer(&dir.path().join("t.db")).unwrap());
        let at = stamps();
        db.conn
            .execute_batch(
                "CREATE TEMP TRIGGER fail_777 BEFORE INSERT ON bookings WHEN NEW.user_id = 777
                 BEGIN SELECT RAISE(ABORT, 'injected failure'); END;
                 CREATE TEMP TRIGGER lose_666 BEFORE INSERT ON bookings WHEN NEW.user_id = 666
                 BEGIN SELECT RAISE(ROLLBACK, 'injected loss of the transaction'); END;",
            )
            .unwrap();
        let ev = queries::insert_event(&db.conn, "Hot", 100, Some(4), None, NOW_MS, 0)
            .unwrap()
            .unwrap()
            .id;

        let alone = db.write(vec![batch(ev, 5, &[(777, 1)])], &at).unwrap();
        assert!(matches!(alone[..], [Applied::Error(..)]));
        let inside = db
            .write(
                vec![batch(ev, 5, &[(1, 1)]), batch(ev, 5, &[(777, 1)])],
                &at,
            )
            .unwrap();
        assert_eq!(kinds(&inside), ["written", "other"]);
        assert_eq!(
            users_in(&db, "customer_seats"),
            [1],
            "the failed ops' seats are undone"
        );
        assert_eq!(
            count(
                &db,
                "SELECT COUNT(*) FROM idempotency_keys WHERE key = 'k777'"
            ),
            0
        );

        let lost = db.write(
            vec![
                batch(ev, 6, &[(2, 1)]),
                batch(ev, 6, &[(666, 1)]),
                batch(ev, 6, &[(3, 1)]),
            ],
            &at,
        );
        assert!(lost.is_none(), "the group failed");
        assert_eq!(
            users_in(&db, "bookings"),
            [1],
            "nothing of the lost group is written"
        );
        assert_eq!(count(&db, "SELECT booked_count FROM events"), 1);
        assert_eq!(
            count(&db, "SELECT CAST(booked AS INTEGER) FROM report_totals"),
            1
        );
        // The writer goes on.
        let after = db.write(vec![batch(ev, 7, &[(4, 1)])], &at).unwrap();
        assert_eq!(kinds(&after), ["written"]);
        assert_eq!(users_in(&db, "bookings"), [1, 4]);
    }
}
