//! The persistence actor: the one SQLite writer of the process, with group commit.
//!
//! It is an actor in the strict sense (it alone owns the writer connection and is reached only by
//! messages) but runs on a dedicated OS thread instead of an actix context: every SQLite call
//! blocks, and group commit wants to take *everything* waiting at once, which an actix mailbox
//! (one message per handler call) does not offer. While one transaction commits, the next group
//! piles up in the hand-off queue; then it all goes into one transaction and one fsync.
//!
//! Each event batch gets a savepoint, so a batch refused by the fence (stale token, seats not
//! there) is rolled back alone while the other batches of the group commit. Replies are sent only
//! after COMMIT returns: a 200 from `POST /book` means the row is durable (promise 2).

use std::thread::JoinHandle;
use std::time::Instant;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;
use tracing::{debug, error, info_span, warn};

use crate::coord::Outbox;
use crate::handoff::{Refused, WriteQueue};
use crate::store::queries::{self, Refusal};
use crate::store::wal::WalKeeper;
use crate::store::{EventRow, StoreError};
use crate::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A booked seat request waiting for its batch: the client's reply channel travels with it, so
/// whoever decides the request's fate answers it directly.
#[derive(Debug)]
pub struct SeatRequest {
    pub user_id: i64,
    pub quantity: i64,
    pub reply: oneshot::Sender<Result<Booked, BookError>>,
}

/// A committed booking, as `POST /book` returns it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Booked {
    pub id: i64,
    pub event_id: i64,
    pub user_id: i64,
    pub quantity: i64,
    pub status: &'static str,
    pub created_at: String,
}

/// Why a booking was not made. The mapping to HTTP lives in `api::errors`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookError {
    #[error("Event is sold out.")]
    SoldOut { remaining: i64 },
    #[error("Event not found")]
    EventNotFound,
    #[error("too many requests for this event")]
    Overloaded,
    #[error("booking unavailable: {0}")]
    Unavailable(String),
}

/// What the writer tells the event actor about its batch.
#[derive(Debug)]
pub enum BatchOutcome {
    /// Committed; the clients have been answered. `booked` is the event's count after it.
    Committed { seats: i64, booked: i64 },
    /// Refused by the fenced update; nothing written. The requests come back, unanswered, with
    /// the row as the database has it.
    Refused {
        row: Option<EventRow>,
        requests: Vec<SeatRequest>,
    },
    /// The transaction failed; the clients have been answered with 503.
    Failed,
}

/// One event actor's batch: all requests allocated under one lease token.
#[derive(Debug)]
pub struct SeatBatch {
    pub event_id: i64,
    pub token: i64,
    pub requests: Vec<SeatRequest>,
    pub done: oneshot::Sender<BatchOutcome>,
}

/// A write for the persistence actor.
#[derive(Debug)]
pub enum WriteOp {
    CreateEvent {
        title: String,
        capacity: i64,
        reply: oneshot::Sender<Result<EventRow, StoreError>>,
    },
    Seats(SeatBatch),
    Finalize {
        booking_id: i64,
        code: String,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
}

impl WriteOp {
    /// Answers an op that will never be written (refused at hand-off or failed transaction).
    fn fail(self, why: &StoreError) {
        match self {
            WriteOp::CreateEvent { reply, .. } => {
                let _ = reply.send(Err(StoreError::Task(why.to_string())));
            }
            WriteOp::Finalize { reply, .. } => {
                let _ = reply.send(Err(StoreError::Task(why.to_string())));
            }
            WriteOp::Seats(batch) => {
                for r in batch.requests {
                    let _ = r.reply.send(Err(BookError::Unavailable(why.to_string())));
                }
                let _ = batch.done.send(BatchOutcome::Failed);
            }
        }
    }
}

/// Batches the fenced update refused, by reason, for `/ready`. Kept apart because they mean
/// different things: a fence refusal is a replica that allocated under a lease it no longer held
/// (a pause, a partition: the fence did its job), a seats refusal an actor whose view was behind
/// the row (another replica sold in between).
#[derive(Debug, Default)]
pub struct Refusals {
    fenced: AtomicU64,
    no_seats: AtomicU64,
}

impl Refusals {
    fn count(&self, refusal: &Refusal) {
        match refusal {
            Refusal::Fenced(_) => self.fenced.fetch_add(1, Ordering::Relaxed),
            Refusal::NoSeats(_) | Refusal::NoEvent => self.no_seats.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The address of the persistence actor: submit writes, await their outcome.
#[derive(Clone)]
pub struct Writer {
    queue: Arc<WriteQueue<WriteOp>>,
    refusals: std::sync::Arc<Refusals>,
}

impl Writer {
    /// Hands an op to the writer; a refused op is answered here (503 for its clients).
    pub fn submit(&self, op: WriteOp) {
        if let Err(refused) = self.queue.submit(op) {
            let (op, why) = match refused {
                Refused::Full(op) => (op, StoreError::WriterFull),
                Refused::Closed(op) => (op, StoreError::WriterClosed),
            };
            op.fail(&why);
        }
    }

    pub async fn create_event(&self, title: String, capacity: i64) -> Result<EventRow, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.submit(WriteOp::CreateEvent {
            title,
            capacity,
            reply,
        });
        rx.await.map_err(|_| StoreError::WriterClosed)?
    }

    pub async fn finalize(&self, booking_id: i64, code: String) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.submit(WriteOp::Finalize {
            booking_id,
            code,
            reply,
        });
        rx.await.map_err(|_| StoreError::WriterClosed)?
    }

    pub fn is_running(&self) -> bool {
        !self.queue.is_closed()
    }

    /// Batches the store refused because a newer lease token had written to the event.
    pub fn fence_refusals(&self) -> u64 {
        self.refusals.fenced.load(Ordering::Relaxed)
    }

    /// Batches the store refused under a current token because the seats were not there.
    pub fn seat_refusals(&self) -> u64 {
        self.refusals.no_seats.load(Ordering::Relaxed)
    }

    /// Writes waiting for the next transaction.
    pub fn backlog(&self) -> usize {
        self.queue.len()
    }
}

/// The running persistence actor: its address and its thread.
pub struct PersistenceActor {
    writer: Writer,
    thread: Option<JoinHandle<()>>,
}

impl PersistenceActor {
    /// Starts the writer thread on an opened, migrated connection.
    pub fn start(conn: Connection, queue_limit: usize, max_group: usize, finalize: Outbox) -> Self {
        let queue = Arc::new(WriteQueue::new(queue_limit));
        let refusals = std::sync::Arc::new(Refusals::default());
        let (q, r) = (queue.clone(), refusals.clone());
        let thread = std::thread::Builder::new()
            .name("ticketd-writer".into())
            .spawn(move || run(conn, &q, max_group, &finalize, &r))
            .ok();
        if thread.is_none() {
            queue.close();
        }
        PersistenceActor {
            writer: Writer { queue, refusals },
            thread,
        }
    }

    pub fn writer(&self) -> Writer {
        self.writer.clone()
    }

    /// Stops accepting writes, commits everything already accepted, and joins the thread.
    pub fn shutdown(mut self) {
        self.writer.queue.close();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!("the writer thread panicked");
            }
        }
    }
}

/// Closes the hand-off when the writer thread ends for any reason, a panic included, so that
/// producers get an immediate 503 (and `/ready` says so) instead of waiting on a dead writer.
struct CloseOnExit<'a>(&'a WriteQueue<WriteOp>);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!("the writer thread panicked; writes are refused from now on");
        }
        self.0.close();
    }
}

fn run(
    mut conn: Connection,
    queue: &WriteQueue<WriteOp>,
    max_group: usize,
    finalize: &Outbox,
    refusals: &Refusals,
) {
    let _guard = CloseOnExit(queue);
    let mut wal = match WalKeeper::install(&conn) {
        Ok(k) => Some(k),
        Err(e) => {
            error!(error = %e, "cannot manage checkpoints; SQLite's automatic ones stay on");
            None
        }
    };
    while let Some(group) = queue.next_group(max_group) {
        commit_group(&mut conn, group, finalize, refusals);
        if let Some(k) = wal.as_mut() {
            k.after_commit(&conn);
        }
    }
    WalKeeper::at_exit(&conn);
    debug!("writer drained and stopped");
}

/// Hands committed bookings to the finalizers. A crash right here (the failpoint plays one)
/// leaves them PENDING and unpushed: the sweeper finds them.
fn push_committed(outbox: &Outbox, ids: &[i64]) {
    fail::fail_point!("finalize-before-push", |_| {});
    for id in ids {
        outbox.push(*id);
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

/// An op applied inside the open transaction, waiting for COMMIT before anyone is answered.
enum Applied {
    Event(oneshot::Sender<Result<EventRow, StoreError>>, EventRow),
    Seats {
        batch_done: oneshot::Sender<BatchOutcome>,
        booked: Vec<(SeatRequest, Booked)>,
        booked_after: i64,
    },
    SeatsRefused {
        done: oneshot::Sender<BatchOutcome>,
        refusal: Refusal,
        requests: Vec<SeatRequest>,
    },
    Finalized(oneshot::Sender<Result<bool, StoreError>>, bool),
    Error(WriteOp, StoreError),
}

/// Times BEGIN IMMEDIATE is retried after SQLITE_BUSY (each after the busy timeout).
const BEGIN_RETRIES: u32 = 3;

fn commit_group(
    conn: &mut Connection,
    group: Vec<WriteOp>,
    finalize: &Outbox,
    refusals: &Refusals,
) {
    let started = Instant::now();
    let span = info_span!(
        "commit_group",
        ops = group.len(),
        bookings = tracing::field::Empty,
        duration_us = tracing::field::Empty
    );
    let _enter = span.enter();
    let now = queries::db_timestamp(chrono::Utc::now());

    // Tests pause the writer here (before it takes the write lock) to play a replica that
    // stalls between allocating a batch and writing it, past the end of its lease.
    fail::fail_point!("writer-before-begin");
    // Other replicas share the file in cluster mode: BEGIN IMMEDIATE waits for their write lock
    // (busy_timeout), and a few retries ride out a long checkpoint or a burst of theirs.
    let mut attempt = 0;
    let tx = loop {
        match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => break tx,
            Err(e) if crate::store::is_busy(&e) && attempt < BEGIN_RETRIES => {
                attempt += 1;
                warn!(attempt, "database busy; retrying the group transaction");
                std::thread::sleep(std::time::Duration::from_millis(20 * attempt as u64));
            }
            Err(e) => {
                warn!(error = %e, "could not begin the group transaction");
                let why = StoreError::Sqlite(e);
                group.into_iter().for_each(|op| op.fail(&why));
                return;
            }
        }
    };
    let mut applied = Vec::with_capacity(group.len());
    for op in group {
        applied.push(apply(&tx, op, &now));
    }
    if let Err(e) = commit(tx) {
        error!(error = %e, "group commit failed; every op of the group is answered as failed");
        let why = StoreError::Sqlite(e);
        for a in applied {
            match a {
                Applied::Event(reply, _) => {
                    drop(reply.send(Err(StoreError::Task(why.to_string()))))
                }
                Applied::Finalized(reply, _) => {
                    drop(reply.send(Err(StoreError::Task(why.to_string()))))
                }
                Applied::Seats {
                    batch_done, booked, ..
                } => {
                    for (req, _) in booked {
                        let _ = req.reply.send(Err(BookError::Unavailable(why.to_string())));
                    }
                    let _ = batch_done.send(BatchOutcome::Failed);
                }
                Applied::SeatsRefused { done, requests, .. } => {
                    for req in requests {
                        let _ = req.reply.send(Err(BookError::Unavailable(why.to_string())));
                    }
                    let _ = done.send(BatchOutcome::Failed);
                }
                Applied::Error(op, _) => op.fail(&why),
            }
        }
        return;
    }

    // Committed: from here on every answer is a promise kept.
    let mut bookings = 0usize;
    let mut committed = Vec::new();
    for a in applied {
        match a {
            Applied::Event(reply, row) => {
                let _ = reply.send(Ok(row));
            }
            Applied::Finalized(reply, changed) => {
                let _ = reply.send(Ok(changed));
            }
            Applied::Seats {
                batch_done,
                booked,
                booked_after,
            } => {
                let mut seats = 0;
                bookings += booked.len();
                for (req, b) in booked {
                    seats += b.quantity;
                    committed.push(b.id);
                    let _ = req.reply.send(Ok(b));
                }
                let _ = batch_done.send(BatchOutcome::Committed {
                    seats,
                    booked: booked_after,
                });
            }
            Applied::SeatsRefused {
                done,
                refusal,
                requests,
            } => {
                refusals.count(&refusal);
                // The actor retries them after a reload; if it is gone, dropping the replies
                // tells the routes that nothing was written, so they may resubmit.
                let _ = done.send(BatchOutcome::Refused {
                    row: refusal.into_row(),
                    requests,
                });
            }
            Applied::Error(op, e) => op.fail(&e),
        }
    }
    push_committed(finalize, &committed);
    let us = started.elapsed().as_micros() as u64;
    span.record("bookings", bookings);
    span.record("duration_us", us);
    debug!(bookings, duration_us = us, "group committed");
}

fn apply(tx: &rusqlite::Transaction<'_>, op: WriteOp, now: &str) -> Applied {
    match op {
        WriteOp::CreateEvent {
            title,
            capacity,
            reply,
        } => match queries::insert_event(tx, &title, capacity) {
            Ok(row) => Applied::Event(reply, row),
            Err(e) => Applied::Error(
                WriteOp::CreateEvent {
                    title,
                    capacity,
                    reply,
                },
                e.into(),
            ),
        },
        WriteOp::Finalize {
            booking_id,
            code,
            reply,
        } => match queries::finalize(tx, booking_id, &code, now) {
            Ok(changed) => Applied::Finalized(reply, changed),
            Err(e) => Applied::Error(
                WriteOp::Finalize {
                    booking_id,
                    code,
                    reply,
                },
                e.into(),
            ),
        },
        WriteOp::Seats(batch) => apply_seats(tx, batch, now),
    }
}

/// Undoes one batch inside the group transaction (prepared once: the hot path runs it often).
fn rollback_savepoint(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.prepare_cached("ROLLBACK TO seats")?.execute([])?;
    tx.prepare_cached("RELEASE seats")?.execute([])?;
    Ok(())
}

fn apply_seats(tx: &rusqlite::Transaction<'_>, batch: SeatBatch, now: &str) -> Applied {
    let _span = info_span!(
        "batch",
        event_id = batch.event_id,
        size = batch.requests.len(),
        token = batch.token
    )
    .entered();
    let wanted: Vec<(i64, i64)> = batch
        .requests
        .iter()
        .map(|r| (r.user_id, r.quantity))
        .collect();
    // A savepoint per batch: a refused or failed batch is undone alone.
    let result = tx
        .prepare_cached("SAVEPOINT seats")
        .and_then(|mut st| st.execute([]))
        .map(|_| ())
        .map_err(StoreError::from)
        .and_then(|()| {
            match queries::apply_fenced_batch(tx, batch.event_id, batch.token, &wanted, now) {
                Ok(r) => Ok(r),
                Err(e) => Err(e.into()),
            }
        });
    match result {
        Ok(Ok((ids, booked_after))) => {
            if let Err(e) = tx
                .prepare_cached("RELEASE seats")
                .and_then(|mut st| st.execute([]))
            {
                return Applied::Error(WriteOp::Seats(batch), e.into());
            }
            let created_at = queries::iso_utc(now);
            let booked = batch
                .requests
                .into_iter()
                .zip(ids)
                .map(|(req, id)| {
                    let b = Booked {
                        id,
                        event_id: batch.event_id,
                        user_id: req.user_id,
                        quantity: req.quantity,
                        status: "PENDING",
                        created_at: created_at.clone(),
                    };
                    (req, b)
                })
                .collect();
            Applied::Seats {
                batch_done: batch.done,
                booked,
                booked_after,
            }
        }
        Ok(Err(refusal)) => {
            let _ = rollback_savepoint(tx);
            debug!(?refusal, "batch refused by the fenced update");
            Applied::SeatsRefused {
                done: batch.done,
                refusal,
                requests: batch.requests,
            }
        }
        Err(e) => {
            let _ = rollback_savepoint(tx);
            warn!(error = %e, "batch failed");
            Applied::Error(WriteOp::Seats(batch), e)
        }
    }
}
