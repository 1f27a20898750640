//! The persistence actor: the one writer of the process, with group commit.
//!
//! It is an actor in the strict sense (it alone owns the writer connection and is reached only by
//! messages) but runs on a dedicated OS thread instead of an actix context: every database call
//! blocks, and group commit wants to take *everything* waiting at once, which an actix mailbox
//! (one message per handler call) does not offer. While one transaction commits, the next group
//! piles up in the hand-off queue; then it all goes into one transaction and one fsync.
//!
//! The group's transaction is the backend's (`sqlite`: a savepoint per op, see its module; `postgres`: the
//! whole group pipelined in one round trip): either way a batch refused by the fence (stale
//! token, seats not there) is left out alone while the other batches of the group commit, and
//! each op comes back as an `Applied`. What follows COMMIT is this module's, the same for both:
//! replies are sent only after COMMIT returns — a 200 from `POST /book` means the row is durable
//! (promise 2) — and committed bookings go to the finalization queue.

mod postgres;
mod sqlite;

use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::{debug, error, info_span};

use crate::coord::Outbox;
use crate::domain::{
    BookError, Booked, Booking, BookingStatus, CancelRequest, IdempotencyKey, SeatRequest,
};
use crate::handoff::{Refused, WriteQueue};
use crate::store::queries::{
    self, BatchApplied, BookingOutcome, CancelOutcome, IssuedTicket, KeyRecord, PurgeCursor,
    Refusal, SeatsSeen, TotalsDelta,
};
use crate::store::{EventRow, StoreError, WriteConn};
use crate::sync::Arc;
use crate::ticket::TicketFacts;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the writer tells the event actor about its batch.
#[derive(Debug)]
pub enum BatchOutcome {
    /// Committed; the clients have been answered. `seats` is what the batch took net of what
    /// its cancellations freed, `booked` the event's count after it, `users` what it taught
    /// about its customers' seats (events with a limit).
    Committed {
        seats: i64,
        booked: i64,
        users: Vec<SeatsSeen>,
    },
    /// Refused by the fenced update; nothing written. The requests come back, unanswered, with
    /// the row as the database has it.
    Refused {
        row: Option<EventRow>,
        requests: Vec<SeatRequest>,
        cancels: Vec<CancelRequest>,
    },
    /// The transaction failed; the clients have been answered with 503.
    Failed,
}

/// One event actor's batch: all requests allocated under one lease token, and the
/// cancellations that came with them.
#[derive(Debug)]
pub struct SeatBatch {
    pub event_id: i64,
    pub token: i64,
    pub requests: Vec<SeatRequest>,
    pub cancels: Vec<CancelRequest>,
    pub done: oneshot::Sender<BatchOutcome>,
}

impl SeatBatch {
    /// Answers every client of a batch that will not be written (503), and its actor.
    fn fail(self, why: &StoreError) {
        for r in self.requests {
            let _ = r.reply.send(Err(book_error(why)));
        }
        for c in self.cancels {
            let _ = c.reply.send(Err(book_error(why)));
        }
        let _ = self.done.send(BatchOutcome::Failed);
    }
}

/// What a client of a failed batch hears: unavailable (nothing written), or — the connection
/// lost during COMMIT — that nobody knows.
fn book_error(why: &StoreError) -> BookError {
    match why {
        StoreError::OutcomeUnknown(e) => BookError::OutcomeUnknown(e.clone()),
        other => BookError::Unavailable(other.to_string()),
    }
}

/// A new event for the writer.
#[derive(Debug)]
pub struct CreateEvent {
    pub title: String,
    pub capacity: i64,
    pub max_per_user: Option<i64>,
    pub key: Option<std::sync::Arc<IdempotencyKey>>,
}

/// What creating an event came to: the event, or the record of the idempotency key that
/// already names one.
pub type Created = Result<EventRow, KeyRecord>;

/// A write for the persistence actor.
#[derive(Debug)]
pub enum WriteOp {
    CreateEvent {
        event: CreateEvent,
        reply: oneshot::Sender<Result<Created, StoreError>>,
    },
    Seats(SeatBatch),
    /// Tickets issued together: one op, one reply, for a whole batch of a finalizer.
    Finalize {
        tickets: Vec<IssuedTicket>,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
}

impl WriteOp {
    /// Whether the op may wait a moment for others to share its commit: ticket issuances, which
    /// nobody awaits (the delivery delay is seconds); never a client's request.
    fn can_wait(&self) -> bool {
        matches!(self, WriteOp::Finalize { .. })
    }

    /// Answers an op that will never be written (refused at hand-off or failed transaction).
    /// The error keeps its kind (busy, full, stopped) up to the route that maps it to HTTP.
    fn fail(self, why: &StoreError) {
        match self {
            WriteOp::CreateEvent { reply, .. } => {
                let _ = reply.send(Err(why.for_reply()));
            }
            WriteOp::Finalize { reply, .. } => {
                let _ = reply.send(Err(why.for_reply()));
            }
            WriteOp::Seats(batch) => batch.fail(why),
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
    /// Counts a refusal for `/ready` and for `/metrics` (`ticketd_batch_refusals_total`).
    fn count(&self, refusal: &Refusal) {
        let m = crate::metrics::handles();
        match refusal {
            Refusal::Fenced(_) => {
                self.fenced.fetch_add(1, Ordering::Relaxed);
                m.fence_refusals.increment(1);
            }
            Refusal::NoSeats(_) | Refusal::NoEvent => {
                self.no_seats.fetch_add(1, Ordering::Relaxed);
                m.seat_refusals.increment(1);
            }
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

    pub async fn create_event(&self, event: CreateEvent) -> Result<Created, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.submit(WriteOp::CreateEvent { event, reply });
        rx.await.map_err(|_| StoreError::WriterClosed)?
    }

    /// Writes issued tickets (`queries::finalize_many`); answers how many it finalized — fewer
    /// than given when some were delivered twice or cancelled meanwhile.
    pub async fn finalize(&self, tickets: Vec<IssuedTicket>) -> Result<usize, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.submit(WriteOp::Finalize { tickets, reply });
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
    /// Starts the writer thread on an opened, migrated database (a SQLite connection, or
    /// PostgreSQL's `WriteConn`).
    pub fn start(
        conn: impl Into<WriteConn>,
        queue_limit: usize,
        max_group: usize,
        finalize: Outbox,
    ) -> Self {
        let conn = conn.into();
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

/// The writer's database, as its thread holds it: one `match` per group, none per booking.
enum Db {
    Sqlite(sqlite::Db),
    Postgres(postgres::Db),
}

impl Db {
    fn open(conn: WriteConn) -> Db {
        match conn {
            WriteConn::Sqlite(conn) => Db::Sqlite(sqlite::Db::open(conn)),
            WriteConn::Postgres { url, writer } => {
                Db::Postgres(postgres::Db::open(url, writer.take()))
            }
        }
    }

    /// Writes the group in one transaction. `None`: it failed, and every op has been answered.
    fn write(&mut self, group: Vec<WriteOp>, at: &Stamps<'_>) -> Option<Vec<Applied>> {
        match self {
            Db::Sqlite(db) => db.write(group, at),
            Db::Postgres(db) => db.write(group, at),
        }
    }

    /// Housekeeping between groups (SQLite: the WAL's checkpoints).
    fn after_group(&mut self) {
        match self {
            Db::Sqlite(db) => db.after_group(),
            Db::Postgres(_) => {}
        }
    }

    fn purge_expired_keys(
        &mut self,
        cursor: &mut PurgeCursor,
        before_ms: i64,
        chunk: usize,
    ) -> Result<usize, StoreError> {
        match self {
            Db::Sqlite(db) => db.purge_expired_keys(cursor, before_ms, chunk),
            Db::Postgres(db) => db.purge_expired_keys(cursor, before_ms, chunk),
        }
    }

    fn close(self) {
        match self {
            Db::Sqlite(db) => db.close(),
            Db::Postgres(_) => {}
        }
    }
}

fn run(
    conn: WriteConn,
    queue: &WriteQueue<WriteOp>,
    max_group: usize,
    finalize: &Outbox,
    refusals: &Refusals,
) {
    let _guard = CloseOnExit(queue);
    let mut db = Db::open(conn);
    let (mut purged, mut cursor) = (Instant::now(), PurgeCursor::default());
    while let Some(group) =
        queue.next_group_lingering(max_group, ISSUANCE_LINGER, WriteOp::can_wait)
    {
        commit_group(&mut db, group, finalize, refusals);
        db.after_group();
        if purged.elapsed() >= PURGE_EVERY {
            purged = Instant::now();
            purge_expired_keys(&mut db, &mut cursor);
        }
    }
    db.close();
    debug!("writer drained and stopped");
}

/// How long a group of only ticket issuances waits for a batch of bookings to join it. During a
/// sale a batch comes every millisecond or so: the issuances then share its transaction and its
/// fsync instead of a commit of their own, which also kept that batch waiting behind them (make
/// bench row 2s at `FINALIZE_DELAY_MS=0`: groups 1,900 → 1,200 a second, the writer's time per
/// booking −12 %). Without a sale they are written this much later; nothing is ever held longer.
const ISSUANCE_LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// How long an `Idempotency-Key` answers with its booking.
pub const KEY_TTL: chrono::TimeDelta = chrono::TimeDelta::hours(24);
/// How often, and how many keys at a time, the writer walks the keys between groups for
/// expired ones: small chunks (a few milliseconds), so the purge never holds up a group, and
/// 5,000 a second walks a day of a busy sale's keys in a few minutes.
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
const PURGE_CHUNK: usize = 5_000;

/// Deletes the expired idempotency keys of the next chunk (lookups ignore them anyway).
fn purge_expired_keys(db: &mut Db, cursor: &mut PurgeCursor) {
    let before = (chrono::Utc::now() - KEY_TTL).timestamp_millis();
    match db.purge_expired_keys(cursor, before, PURGE_CHUNK) {
        Ok(0) => {}
        Ok(n) => debug!(purged = n, "expired idempotency keys deleted"),
        Err(e) => tracing::warn!(error = %e, "could not purge expired idempotency keys"),
    }
}

/// Hands committed bookings to the finalizers. A crash right here (the failpoint plays one)
/// leaves them PENDING and unpushed: the sweeper finds them.
fn push_committed(outbox: &Outbox, committed: Vec<TicketFacts>) {
    fail::fail_point!("finalize-before-push", |_| {});
    outbox.push(committed);
}

/// An op applied inside the open transaction, waiting for COMMIT before anyone is answered.
enum Applied {
    Event(oneshot::Sender<Result<Created, StoreError>>, Created),
    Seats {
        batch_done: oneshot::Sender<BatchOutcome>,
        answers: Vec<(SeatRequest, Result<Booked, BookError>)>,
        cancelled: Vec<(CancelRequest, Result<Booking, BookError>)>,
        seats: i64,
        /// Bookings its cancellations moved to CANCELLED, and the seats they gave back.
        cancellations: i64,
        returned: i64,
        /// Seats of issued tickets its cancellations freed.
        unissued: i64,
        booked_after: i64,
        users: Vec<SeatsSeen>,
    },
    SeatsRefused {
        done: oneshot::Sender<BatchOutcome>,
        refusal: Refusal,
        requests: Vec<SeatRequest>,
        cancels: Vec<CancelRequest>,
    },
    /// Tickets written, and their seats (duplicates and cancelled bookings are not written).
    Finalized(oneshot::Sender<Result<usize, StoreError>>, usize, i64),
    Error(WriteOp, StoreError),
}

impl Applied {
    /// What this op changes in the report's totals.
    fn totals(&self) -> TotalsDelta {
        match self {
            Applied::Event(_, Ok(row)) => TotalsDelta {
                events: 1,
                capacity: row.capacity,
                ..Default::default()
            },
            Applied::Seats {
                seats, unissued, ..
            } => TotalsDelta {
                booked: *seats,
                finalized: -unissued,
                ..Default::default()
            },
            Applied::Finalized(_, _, seats) => TotalsDelta {
                finalized: *seats,
                ..Default::default()
            },
            _ => TotalsDelta::default(),
        }
    }

    /// Whether the op's writes were (or, run without a savepoint, must be) undone: a batch
    /// refused by the fenced update had written its rows first; a failed op may have written
    /// some.
    fn undone(&self) -> bool {
        matches!(self, Applied::SeatsRefused { .. } | Applied::Error(..))
    }

    /// The COMMIT failed: nothing of this op was written, whatever it looked like inside the
    /// transaction. Every client hears so (503), none a 200.
    fn fail(self, why: &StoreError) {
        match self {
            Applied::Event(reply, _) => drop(reply.send(Err(why.for_reply()))),
            Applied::Finalized(reply, _, _) => drop(reply.send(Err(why.for_reply()))),
            Applied::Seats {
                batch_done,
                answers,
                cancelled,
                ..
            } => {
                for (req, _) in answers {
                    let _ = req.reply.send(Err(book_error(why)));
                }
                for (c, _) in cancelled {
                    let _ = c.reply.send(Err(book_error(why)));
                }
                let _ = batch_done.send(BatchOutcome::Failed);
            }
            Applied::SeatsRefused {
                done,
                requests,
                cancels,
                ..
            } => {
                for req in requests {
                    let _ = req.reply.send(Err(book_error(why)));
                }
                for c in cancels {
                    let _ = c.reply.send(Err(book_error(why)));
                }
                let _ = done.send(BatchOutcome::Failed);
            }
            Applied::Error(op, _) => op.fail(why),
        }
    }
}

fn commit_group(db: &mut Db, group: Vec<WriteOp>, finalize: &Outbox, refusals: &Refusals) {
    let started = Instant::now();
    let span = info_span!(
        "commit_group",
        ops = group.len(),
        bookings = tracing::field::Empty,
        duration_us = tracing::field::Empty
    );
    let _enter = span.enter();
    let at = chrono::Utc::now();
    let now = queries::db_timestamp(at);
    let stamps = Stamps {
        now: &now,
        now_ms: at.timestamp_millis(),
        keys_live_after_ms: (at - KEY_TTL).timestamp_millis(),
    };

    // Tests pause the writer here (before it takes the write lock) to play a replica that
    // stalls between allocating a batch and writing it, past the end of its lease.
    fail::fail_point!("writer-before-begin");
    let Some(applied) = db.write(group, &stamps) else {
        return;
    };

    // Tests kill the process right here (failpoint `writer-after-commit`): committed, nobody
    // answered — the client's retry with its Idempotency-Key must find the booking.
    fail::fail_point!("writer-after-commit", |_| std::process::abort());
    // Committed: from here on every answer is a promise kept. The event actors hear first, their
    // clients after: an actor's next batch is already in its mailbox, and the actor shares an
    // HTTP worker with those clients' handlers — woken after them, it waited behind every
    // response they wrote before handing the writer its next batch (the writer sat idle ~40 %
    // of a hot sale; make bench row 2: +6–15 % bookings/s once actors go first). A client may
    // still act on its answer before its actor has run; `EventActor::on_batch` allows for that.
    let ops = applied.len();
    let mut bookings = 0usize;
    let (mut sold, mut cancellations, mut returned) = (0i64, 0i64, 0i64);
    let mut committed = Vec::new();
    let mut answers = Vec::with_capacity(ops);
    for a in applied {
        match a {
            Applied::Seats {
                batch_done,
                answers: booked,
                cancelled,
                seats,
                booked_after,
                users,
                cancellations: cancels_done,
                returned: seats_back,
                ..
            } => {
                cancellations += cancels_done;
                returned += seats_back;
                let _ = batch_done.send(BatchOutcome::Committed {
                    seats,
                    booked: booked_after,
                    users,
                });
                answers.push((booked, cancelled));
            }
            Applied::SeatsRefused {
                done,
                refusal,
                requests,
                cancels,
            } => {
                refusals.count(&refusal);
                // The actor retries them after a reload; if it is gone, dropping the replies
                // tells the routes that nothing was written, so they may resubmit.
                let _ = done.send(BatchOutcome::Refused {
                    row: refusal.into_row(),
                    requests,
                    cancels,
                });
            }
            Applied::Event(reply, created) => {
                let _ = reply.send(Ok(created));
            }
            Applied::Finalized(reply, written, _) => {
                let _ = reply.send(Ok(written));
            }
            Applied::Error(op, e) => op.fail(&e),
        }
    }
    for (booked, cancelled) in answers {
        for (req, answer) in booked {
            if let Ok(b) = &answer {
                bookings += 1;
                sold += b.quantity;
                committed.push(TicketFacts::from(b));
            }
            let _ = req.reply.send(answer);
        }
        for (c, answer) in cancelled {
            let _ = c.reply.send(answer);
        }
    }
    push_committed(finalize, committed);
    let elapsed = started.elapsed();
    // Per group, never per booking: one atomic add each.
    let m = crate::metrics::handles();
    m.bookings_committed.increment(bookings as u64);
    m.seats_sold.increment(sold.unsigned_abs());
    m.cancellations.increment(cancellations.unsigned_abs());
    m.seats_returned.increment(returned.unsigned_abs());
    m.group_ops.record(ops as f64);
    m.group_duration.record(elapsed.as_secs_f64());
    let us = elapsed.as_micros() as u64;
    span.record("bookings", bookings);
    span.record("duration_us", us);
    debug!(bookings, duration_us = us, "group committed");
}

/// The timestamps of one group transaction.
struct Stamps<'a> {
    now: &'a str,
    now_ms: i64,
    keys_live_after_ms: i64,
}

/// A batch the transaction wrote, as the answers its clients and its actor will get once the
/// group commits (both backends).
fn seats_written(batch: SeatBatch, done: BatchApplied, now: &str) -> Applied {
    let created_at = queries::iso_utc(now);
    let event_id = batch.event_id;
    let mut seats = 0;
    let answers = batch
        .requests
        .into_iter()
        .zip(done.bookings)
        .map(|(req, outcome)| {
            let answer = match outcome {
                BookingOutcome::Booked(id) => {
                    seats += req.quantity;
                    Ok(Booked {
                        id,
                        event_id,
                        user_id: req.user_id,
                        quantity: req.quantity,
                        status: BookingStatus::Pending,
                        created_at: created_at.clone(),
                    })
                }
                BookingOutcome::Limit { limit, held } => Err(BookError::LimitReached {
                    limit,
                    may_take: (limit - held).max(0),
                }),
                BookingOutcome::KeyUsed {
                    booking_id,
                    fingerprint,
                } => Err(BookError::KeyUsed {
                    booking_id,
                    fingerprint,
                }),
            };
            (req, answer)
        })
        .collect();
    let cancelled = batch
        .cancels
        .into_iter()
        .zip(done.cancels)
        .map(|(c, outcome)| {
            let answer = match outcome {
                CancelOutcome::Cancelled(b) => Ok(b),
                CancelOutcome::NotFound => Err(BookError::BookingNotFound),
            };
            (c, answer)
        })
        .collect();
    Applied::Seats {
        batch_done: batch.done,
        answers,
        cancelled,
        seats: seats - done.freed,
        cancellations: done.cancelled,
        returned: done.freed,
        unissued: done.freed_issued,
        booked_after: done.booked_after,
        users: done.users,
    }
}

/// A batch the fenced update refused: nothing of it written.
fn seats_refused(batch: SeatBatch, refusal: Refusal) -> Applied {
    debug!(?refusal, "batch refused by the fenced update");
    Applied::SeatsRefused {
        done: batch.done,
        refusal,
        requests: batch.requests,
        cancels: batch.cancels,
    }
}
