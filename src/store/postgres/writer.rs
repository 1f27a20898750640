//! The PostgreSQL writer: one connection, owned by the writer thread, that commits a group of
//! ops (fenced batches, new events, issued tickets) in one transaction and — whatever the size
//! of the group — **one round trip**: `BEGIN`; the locks of every event row its batches write
//! and every booking row it cancels or issues, in id order; one statement per op
//! (`ticketd_apply_batch`, `ticketd_create_event`, the finalize CTE); `COMMIT` — all sent before
//! the first answer is awaited (tokio-postgres pipelines the requests of concurrently polled
//! futures on one connection). The report's totals follow the event rows by a trigger (schema
//! migration 3) and move with the issued seats in the finalize statement itself, so nothing
//! waits for the ops' answers before COMMIT, and an event row is locked only while the server
//! works — never
//! across a round trip to this process (with two, replicas queued on a hot event's row behind
//! each other's think time).
//!
//! Why statements per op and not multi-row statements for the whole group: the batches of a
//! group belong to different events with their own fences, limits and keys, and the per-batch
//! logic (cancellations first, per-customer counts in order, keys) is sequential; a server-side
//! function per batch keeps it exact and one statement, while pipelining makes the group one
//! round trip anyway. Inside the function the rows are written set-based (`unnest`).
//!
//! Refusals are results, not errors (the functions decide before they write), so a batch
//! refused by its fence or for seats leaves the rest of the group to commit, with no savepoint
//! (a subtransaction per batch would cost every batch, and past 64 per transaction slows every
//! other session's snapshots). An op that *errors* (a bug, a constraint behind the checks) aborts
//! the transaction on PostgreSQL, and the pipelined COMMIT then answers `ROLLBACK` (not an
//! error): the writer knows it from the op's error, and runs the group again without it — the
//! failed op alone is answered with its error, as a rolled-back savepoint does on SQLite. A
//! deadlock or serialization failure is not the op's fault: the whole group runs again.
//!
//! Deadlocks between replicas: every group takes its row locks first — the event rows its
//! batches write, then the bookings it cancels or issues, each in ascending id order — so two
//! writers never take rows in opposite orders; what the ops then lock besides is either new
//! (inserted rows), behind the event row (a customer's count), or the writer's own slot rows
//! (`CLAIM_SLOT`: the report's totals, the issued seats), which no other writer touches. One
//! order is left to the ops: idempotency keys, claimed as the bookings come; two writers
//! claiming the same two keys crosswise (a client retrying two keyed requests at two replicas
//! at once) can deadlock — PostgreSQL detects it and the group runs again.
//! Finalizations lock no event row (their counts go to the slot rows): issuing tickets never
//! holds the row a hot event's sale writes. A cancellation and an issue of one booking meet on
//! the booking's row: the cancellation then sees the ticket issued, or the issue finds the
//! booking CANCELLED and writes nothing.

use std::collections::BTreeSet;
use std::future::Future;

use futures_util::future::join_all;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Statement};

use crate::domain::{Booking, BookingStatus, IdempotencyKey};
use crate::store::queries::{
    iso_utc, BatchApplied, BookingOutcome, CancelOutcome, EventRow, FencedBatch, IssuedTicket,
    KeyRecord, PurgeCursor, Refusal, SeatsSeen,
};

pub type Error = tokio_postgres::Error;

/// Why a group did not commit, and whether it still may have.
#[derive(Debug)]
pub struct GroupFailed {
    pub error: Error,
    /// The COMMIT was sent and the connection was lost before its answer came (or the server
    /// was going away): the group may or may not have committed. Only idempotency keys can tell
    /// a client which (its retry finds the booking, or makes it).
    pub maybe_committed: bool,
}

impl GroupFailed {
    /// Failed before COMMIT was sent, or the server answered it with an error: nothing written.
    fn not_written(error: Error) -> Self {
        GroupFailed {
            error,
            maybe_committed: false,
        }
    }
}

impl std::fmt::Display for GroupFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.maybe_committed {
            write!(f, "the COMMIT's answer was lost: {}", self.error)
        } else {
            self.error.fmt(f)
        }
    }
}

/// An op of a group, as the writer applies it.
#[derive(Debug, Clone, Copy)]
pub enum PgOp<'a> {
    Batch(&'a FencedBatch<'a>),
    CreateEvent {
        title: &'a str,
        capacity: i64,
        max_per_user: Option<i64>,
        key: Option<&'a IdempotencyKey>,
        now_ms: i64,
        keys_live_after_ms: i64,
    },
    /// Issued tickets, written at `at` (stored format).
    Finalize {
        tickets: &'a [IssuedTicket],
        at: &'a str,
    },
}

/// What an op did, once its group commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgDone {
    Batch(Result<BatchApplied, Refusal>),
    Event(Result<EventRow, KeyRecord>),
    /// Tickets written, and their seats.
    Finalized(usize, i64),
}

/// The statements of the writer, prepared once per connection.
struct Statements {
    lock_events: Statement,
    lock_bookings: Statement,
    batch: Statement,
    create_event: Statement,
    finalize: Statement,
    purge: Statement,
}

/// How many times a group is run again after an op failed or a deadlock, before the whole
/// group is answered as failed.
const GROUP_RETRIES: usize = 3;

/// What each statement of a group's round trip answered.
struct Ran {
    begun: Result<(), Error>,
    locked: Result<u64, Error>,
    answers: Vec<Result<PgDone, Error>>,
    committed: Result<(), Error>,
}

/// The writer's connection (see the module doc).
pub struct PgWriter {
    rt: tokio::runtime::Runtime,
    client: Client,
    st: Statements,
    /// Round trips to the server so far (each pipeline awaited counts one): the test of "one per
    /// group".
    pub round_trips: u64,
    /// The counting slot this session claimed (`CLAIM_SLOT`), if one was free.
    pub slot: Option<i32>,
}

impl PgWriter {
    /// Connects (on a runtime of its own: the writer is a plain thread) and prepares.
    pub fn connect(url: &str) -> Result<PgWriter, Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        let (client, st, slot) = rt.block_on(async {
            let config = crate::store::pg_config(url)?;
            let (client, conn) = config.connect(NoTls).await?;
            // Driven while the writer awaits anything on this runtime.
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::warn!(error = %e, "the writer's PostgreSQL connection closed");
                }
            });
            client.batch_execute(SESSION).await?;
            let slot: Option<i32> = client.query_one(CLAIM_SLOT, &[]).await?.get(0);
            if let Some(slot) = slot {
                client
                    .execute(
                        "SELECT set_config('ticketd.slot', $1, false)",
                        &[&slot.to_string()],
                    )
                    .await?;
            } else {
                tracing::warn!(
                    "no free counting slot (64 writers on this database, or sessions the server \
                     has not yet found dead): this one shares one (its groups may meet \
                     another's in a deadlock, detected and run again)"
                );
            }
            let st = Statements {
                lock_events: client
                    .prepare(
                        "SELECT 1 FROM events WHERE id = ANY($1::bigint[]) ORDER BY id
                         FOR NO KEY UPDATE",
                    )
                    .await?,
                lock_bookings: client
                    .prepare(
                        "SELECT 1 FROM bookings WHERE id = ANY($1::bigint[]) ORDER BY id
                         FOR NO KEY UPDATE",
                    )
                    .await?,
                batch: client
                    .prepare(
                        "SELECT * FROM ticketd_apply_batch($1, $2, $3, $4, $5, $6, $7, $8, $9,
                             $10, $11)",
                    )
                    .await?,
                create_event: client
                    .prepare("SELECT * FROM ticketd_create_event($1, $2, $3, $4, $5, $6, $7, $8)")
                    .await?,
                finalize: client.prepare(FINALIZE).await?,
                purge: client.prepare(PURGE).await?,
            };
            Ok::<_, Error>((client, st, slot))
        })?;
        Ok(PgWriter {
            rt,
            client,
            st,
            round_trips: 0,
            slot,
        })
    }

    /// True once the connection is gone (the server restarted, the network cut it): a new
    /// `PgWriter` is needed.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Commits `ops` in one transaction (one round trip, see the module doc). Returns each op's
    /// outcome — an op that failed alone (its error), the others committed — or, if the group
    /// itself could not commit (BEGIN, COMMIT, the connection), that error: then nothing of it is
    /// known to be written (a COMMIT cut off may still have happened: idempotency keys tell).
    pub fn commit_group(
        &mut self,
        ops: &[PgOp<'_>],
    ) -> Result<Vec<Result<PgDone, Error>>, GroupFailed> {
        let mut failed: Vec<Option<Error>> = ops.iter().map(|_| None).collect();
        let mut attempt = 0;
        loop {
            let live: Vec<usize> = (0..ops.len()).filter(|&i| failed[i].is_none()).collect();
            let Ran {
                begun,
                locked,
                answers,
                committed,
            } = self.run(ops, &live);
            // An error the server answered before COMMIT aborted the transaction: the COMMIT
            // rolled it back (and said so without an error). Which statement it was, if any.
            let answered = |e: Option<&Error>| e.is_some_and(|e| e.as_db_error().is_some());
            let aborted = answered(begun.as_ref().err())
                || answered(locked.as_ref().err())
                || answers.iter().any(|a| answered(a.as_ref().err()));
            match committed.and_then(|()| if aborted { Ok(()) } else { self.answer_lost() }) {
                // The COMMIT's answer never came (the connection was lost, the server went away):
                // committed or not, unknown — unless the transaction had aborted before it.
                Err(error) => {
                    let maybe_committed = !aborted && crate::store::pg_unavailable(&error);
                    return Err(GroupFailed {
                        error,
                        maybe_committed,
                    });
                }
                Ok(()) if !aborted => {
                    let mut done = answers.into_iter().map(|a| a.expect("no op failed"));
                    return Ok(failed
                        .into_iter()
                        .map(|f| match f {
                            Some(e) => Err(e),
                            None => Ok(done.next().expect("one answer per live op")),
                        })
                        .collect());
                }
                Ok(()) => {}
            }
            // Rolled back. The group's own statements (BEGIN, the locks) failing is the group's
            // trouble; else the first op that failed for itself is the culprit (the ones after it
            // only saw the aborted transaction).
            attempt += 1;
            let (err, culprit) = match (begun, locked) {
                (Err(e), _) | (_, Err(e)) => (e, None),
                _ => {
                    let mut errors: Vec<(usize, Error)> = answers
                        .into_iter()
                        .enumerate()
                        .filter_map(|(i, a)| a.err().map(|e| (i, e)))
                        .collect();
                    let first = errors
                        .iter()
                        .position(|(_, e)| e.code() != Some(&SqlState::IN_FAILED_SQL_TRANSACTION))
                        .unwrap_or(0);
                    // `aborted` with BEGIN and the locks fine: an op's error made it so.
                    assert!(!errors.is_empty(), "a rolled-back group has a failed op");
                    let (i, e) = errors.swap_remove(first);
                    (e, Some(i))
                }
            };
            let transient = matches!(
                err.code(),
                Some(&SqlState::T_R_DEADLOCK_DETECTED) | Some(&SqlState::T_R_SERIALIZATION_FAILURE)
            );
            if attempt > GROUP_RETRIES {
                return Err(GroupFailed::not_written(err));
            }
            match (transient, culprit) {
                (true, _) => {}
                (false, Some(i)) => {
                    tracing::warn!(error = %err, "an op of the group failed; the group runs again without it");
                    failed[live[i]] = Some(err);
                }
                (false, None) => return Err(GroupFailed::not_written(err)),
            }
        }
    }

    /// The group's one round trip: BEGIN, the event and booking locks, the ops (those of
    /// `live`), COMMIT, pipelined.
    fn run(&mut self, ops: &[PgOp<'_>], live: &[usize]) -> Ran {
        let (mut events, mut bookings) = (BTreeSet::new(), BTreeSet::new());
        for &i in live {
            match ops[i] {
                PgOp::Batch(b) => {
                    events.insert(b.event_id);
                    bookings.extend(b.cancels.iter().copied());
                }
                // Finalizations lock no event row (they count in their writer's slot rows).
                PgOp::Finalize { tickets, .. } => {
                    bookings.extend(tickets.iter().map(|t| t.facts.booking_id));
                }
                PgOp::CreateEvent { .. } => {}
            }
        }
        let events: Vec<i64> = events.into_iter().collect();
        let bookings: Vec<i64> = bookings.into_iter().collect();
        let (c, st) = (&self.client, &self.st);
        self.round_trips += 1;
        self.rt.block_on(async {
            let begin = c.batch_execute("BEGIN");
            let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&events];
            let booking_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&bookings];
            let lock = async {
                let events = c.execute(&st.lock_events, &lock_params);
                let bookings = c.execute(&st.lock_bookings, &booking_params);
                let (e, b) = futures_util::future::join(events, bookings).await;
                e.and(b)
            };
            let each = join_all(live.iter().map(|&i| apply_op(c, st, ops[i])));
            let commit = c.batch_execute("COMMIT");
            let (begun, locked, answers, committed) =
                futures_util::future::join4(begin, lock, each, commit).await;
            Ran {
                begun,
                locked,
                answers,
                committed,
            }
        })
    }

    /// Tests (failpoint `pg-commit-answer-lost`): the COMMIT went through and the connection is
    /// cut before the writer reads its answer — the server ends this session, as a network cut or
    /// a server crash right after COMMIT would. Its error stands for the lost answer.
    fn answer_lost(&mut self) -> Result<(), Error> {
        fail::fail_point!("pg-commit-answer-lost", |_| {
            self.rt.block_on(
                self.client
                    .batch_execute("SELECT pg_terminate_backend(pg_backend_pid())"),
            )
        });
        Ok(())
    }

    /// Deletes the expired keys of the next `chunk` after the cursor, in key order (one
    /// statement, its own transaction); returns how many went.
    pub fn purge_expired_keys(
        &mut self,
        cursor: &mut PurgeCursor,
        expired_before_ms: i64,
        chunk: usize,
    ) -> Result<usize, Error> {
        let (after_scope, after_key) = match cursor {
            PurgeCursor::Text(scope, key) => (scope.clone(), key.clone()),
            _ => (String::new(), String::new()),
        };
        self.round_trips += 1;
        let row = self.rt.block_on(self.client.query_one(
            &self.st.purge,
            &[
                &after_scope,
                &after_key,
                &(chunk as i64),
                &expired_before_ms,
            ],
        ))?;
        let walked: i64 = row.get(0);
        let deleted: i64 = row.get(1);
        *cursor = if (walked as usize) < chunk {
            PurgeCursor::Start
        } else {
            PurgeCursor::Text(row.get(2), row.get(3))
        };
        Ok(deleted as usize)
    }
}

/// The writer session's settings. Its statements are the same few, run thousands of times a
/// second with new parameters: by default PostgreSQL plans each execution again while a custom
/// plan looks cheaper, and the finalize CTE and the batch function's statements always did (the
/// planner was 40 % of the server's CPU in row 5pg of `make bench`). So plans are made once
/// (generic) — and, being made once, must not depend on how large the tables were at that moment
/// (a finalize planned on an empty `bookings` scanned every PENDING row at each run once there
/// were a million: 234 ms an op, against 0.2 ms). Every statement of the writer names its rows
/// by key, as an index condition (`id = ANY($1)` where a join alone would let the planner walk
/// an index without one), so index lookups are the plan at any size; the other ways are priced
/// out for this session (`enable_*` only adds a cost: a statement with no index path still
/// runs).
pub(super) const SESSION: &str = "SET plan_cache_mode = force_generic_plan;
    SET enable_seqscan = off; SET enable_bitmapscan = off;
    SET enable_hashjoin = off; SET enable_mergejoin = off";

/// Claims a counting slot of its own for this session (an advisory lock, released with the
/// session): the report's totals and the issued seats are counted in the slot's rows, and two
/// writers sharing one could wait for each other's slot rows in opposite orders. NULL when all
/// 64 are taken: the session then counts in `pg_backend_pid() % 64` (`ticketd_slot()`).
const CLAIM_SLOT: &str = "SELECT s FROM generate_series(0, 63) AS s
    WHERE pg_try_advisory_lock(1952672619, s) LIMIT 1";

/// Tickets per run of `FINALIZE`. Each booking the statement finds looks its ticket up in the
/// arrays (`array_position`, a scan of the array): a run costs the square of its tickets, which
/// stays small in runs of 64 (timed inside PostgreSQL: ~16 µs a ticket in runs of 16, ~11 in
/// runs of 64, more again past that). Until this, the facts were unnested and joined, and the
/// generic plan re-scanned the unnest for every booking: 0.62 ms for 20 tickets, 356 ms for
/// 1,000 — a finalizer's op of up to 1,024 tickets held its group, and the hot event's batch in
/// it, for a third of a second.
const FINALIZE_CHUNK: usize = 64;

/// Issued tickets: each booking moves PENDING → FINALIZED once, only if the facts describe it;
/// each event's count of issued seats moves once by its seats — in this writer's slot of
/// `event_finalized` (schema migration 4), not on the event row: the row is the sale's, and a
/// finalizer holding it until its COMMIT queued every replica's batches of a hot event behind
/// the issuance (row 5pg of `make bench`: 6,087 bookings/s, p99 2.25 s, with 11,086/s and 34 ms
/// when issuance waited). The report's totals move in the same slot. A booking named twice is
/// written once (by its first ticket). Each booking found by its id (an index condition) takes
/// its facts and code from the arrays at its position, with no join: a join with the unnested
/// arrays cost PostgreSQL ~25 µs a ticket, the lookup ~14–18 µs (runs of 32, timed in a
/// plpgsql loop on the same rows).
pub(super) const FINALIZE: &str = "
WITH marked AS (
    UPDATE bookings b SET status = 'FINALIZED',
        ticket_code = ($5::text[])[array_position($1::bigint[], b.id)],
        finalized_at = $6::text::timestamp
    WHERE b.id = ANY($1::bigint[]) AND b.status = 'PENDING'
      AND b.event_id = ($2::bigint[])[array_position($1::bigint[], b.id)]
      AND b.user_id = ($3::bigint[])[array_position($1::bigint[], b.id)]
      AND b.quantity = ($4::bigint[])[array_position($1::bigint[], b.id)]
    RETURNING b.event_id, b.quantity
), per_event AS (
    SELECT event_id, SUM(quantity)::bigint AS seats, COUNT(*) AS n FROM marked GROUP BY event_id
), slot AS (
    SELECT ticketd_slot() AS id
), counted AS (
    INSERT INTO event_finalized AS f (event_id, slot, seats)
    SELECT p.event_id, s.id, p.seats FROM per_event p, slot s ORDER BY p.event_id
    ON CONFLICT (event_id, slot) DO UPDATE SET seats = f.seats + excluded.seats
), totals AS (
    INSERT INTO report_totals AS r (id, finalized)
    SELECT s.id, SUM(p.seats) FROM per_event p, slot s GROUP BY s.id
    ON CONFLICT (id) DO UPDATE SET finalized = r.finalized + excluded.finalized
)
SELECT COALESCE(SUM(n), 0)::bigint, COALESCE(SUM(seats), 0)::bigint FROM per_event";

/// One chunk of the walk over the keys: the expired ones deleted (checked on the row deleted,
/// so a key claimed again meanwhile stays), where the walk got to.
const PURGE: &str = "
WITH walked AS (
    SELECT scope, key FROM idempotency_keys WHERE (scope, key) > ($1, $2)
    ORDER BY scope, key LIMIT $3
), gone AS (
    DELETE FROM idempotency_keys k USING walked w
    WHERE k.scope = w.scope AND k.key = w.key AND k.created_ms < $4
    RETURNING 1
), last AS (
    SELECT scope, key FROM walked ORDER BY scope DESC, key DESC LIMIT 1
)
SELECT (SELECT COUNT(*) FROM walked), (SELECT COUNT(*) FROM gone),
       (SELECT scope FROM last), (SELECT key FROM last)";

fn apply_op<'a>(
    c: &'a Client,
    st: &'a Statements,
    op: PgOp<'a>,
) -> std::pin::Pin<Box<dyn Future<Output = Result<PgDone, Error>> + 'a>> {
    match op {
        PgOp::Batch(b) => Box::pin(apply_batch(c, st, b)),
        PgOp::CreateEvent {
            title,
            capacity,
            max_per_user,
            key,
            now_ms,
            keys_live_after_ms,
        } => Box::pin(async move {
            let r = c
                .query_one(
                    &st.create_event,
                    &[
                        &title,
                        &capacity,
                        &max_per_user,
                        &key.map(|k| k.scope.to_string()),
                        &key.map(|k| k.key.as_str()),
                        &key.map(|k| k.fingerprint.as_str()),
                        &now_ms,
                        &keys_live_after_ms,
                    ],
                )
                .await?;
            let created: bool = r.get(0);
            Ok(PgDone::Event(if created {
                Ok(EventRow {
                    id: r.get(1),
                    title: title.to_string(),
                    capacity,
                    booked_count: 0,
                    max_per_user,
                    finalized_count: 0,
                    fence: 0,
                })
            } else {
                Err(KeyRecord {
                    fingerprint: r.get::<_, Option<String>>(2).unwrap_or_default(),
                    booking_id: r.get(3),
                    event_id: r.get(4),
                })
            }))
        }),
        // In chunks, pipelined on the connection: see `FINALIZE_CHUNK`.
        PgOp::Finalize { tickets, at } => Box::pin(async move {
            let chunks = tickets.chunks(FINALIZE_CHUNK).map(|tickets| async move {
                let col = |f: fn(&IssuedTicket) -> i64| tickets.iter().map(f).collect::<Vec<i64>>();
                let ids = col(|t| t.facts.booking_id);
                let events = col(|t| t.facts.event_id);
                let users = col(|t| t.facts.user_id);
                let qtys = col(|t| t.facts.quantity);
                let codes: Vec<&str> = tickets.iter().map(|t| t.code.as_str()).collect();
                let r = c
                    .query_one(&st.finalize, &[&ids, &events, &users, &qtys, &codes, &at])
                    .await?;
                Ok::<_, Error>((r.get::<_, i64>(0) as usize, r.get::<_, i64>(1)))
            });
            let (mut written, mut seats) = (0, 0);
            for done in join_all(chunks).await {
                let (n, s) = done?;
                written += n;
                seats += s;
            }
            Ok(PgDone::Finalized(written, seats))
        }),
    }
}

async fn apply_batch(c: &Client, st: &Statements, b: &FencedBatch<'_>) -> Result<PgDone, Error> {
    let users: Vec<i64> = b.bookings.iter().map(|n| n.user_id).collect();
    let qtys: Vec<i64> = b.bookings.iter().map(|n| n.quantity).collect();
    // PostgreSQL keeps a scope's text form (`user:<id>`, `organizer`), as it always has.
    let scopes: Vec<Option<String>> = b
        .bookings
        .iter()
        .map(|n| n.key.map(|k| k.scope.to_string()))
        .collect();
    let keys: Vec<Option<&str>> = b
        .bookings
        .iter()
        .map(|n| n.key.map(|k| k.key.as_str()))
        .collect();
    let fps: Vec<Option<&str>> = b
        .bookings
        .iter()
        .map(|n| n.key.map(|k| k.fingerprint.as_str()))
        .collect();
    let r = c
        .query_one(
            &st.batch,
            &[
                &b.event_id,
                &b.token,
                &b.cancels,
                &users,
                &qtys,
                &scopes,
                &keys,
                &fps,
                &b.now,
                &b.now_ms,
                &b.keys_live_after_ms,
            ],
        )
        .await?;
    Ok(PgDone::Batch(batch_from(&r, b.event_id)))
}

/// `ticketd_apply_batch`'s row as the SQLite writer's types.
fn batch_from(r: &tokio_postgres::Row, event_id: i64) -> Result<BatchApplied, Refusal> {
    let status: i16 = r.get("status");
    if status == 1 {
        return Err(Refusal::NoEvent);
    }
    // The row as the refusal found it (`finalized` comes with refusals only).
    let row = || EventRow {
        id: event_id,
        title: r.get("title"),
        capacity: r.get("capacity"),
        booked_count: r.get("booked"),
        max_per_user: r.get("max_per_user"),
        finalized_count: r.get("finalized"),
        fence: r.get("fence"),
    };
    match status {
        2 => return Err(Refusal::Fenced(row())),
        3 => return Err(Refusal::NoSeats(row())),
        _ => {}
    }
    let kind: Vec<i16> = r.get("b_kind");
    let a: Vec<i64> = r.get("b_a");
    let bb: Vec<i64> = r.get("b_b");
    let fp: Vec<Option<String>> = r.get("b_fp");
    let bookings = (0..kind.len())
        .map(|i| match kind[i] {
            0 => BookingOutcome::Booked(a[i]),
            1 => BookingOutcome::Limit {
                limit: a[i],
                held: bb[i],
            },
            _ => BookingOutcome::KeyUsed {
                booking_id: a[i],
                fingerprint: fp[i].clone().unwrap_or_default(),
            },
        })
        .collect();
    let c_id: Vec<Option<i64>> = r.get("c_id");
    let c_user: Vec<Option<i64>> = r.get("c_user");
    let c_qty: Vec<Option<i64>> = r.get("c_qty");
    let c_status: Vec<Option<String>> = r.get("c_status");
    let c_created: Vec<Option<String>> = r.get("c_created");
    let c_code: Vec<Option<String>> = r.get("c_code");
    let c_fin: Vec<Option<String>> = r.get("c_fin");
    let c_can: Vec<Option<String>> = r.get("c_can");
    let cancels = (0..c_id.len())
        .map(|i| match c_id[i] {
            None => CancelOutcome::NotFound,
            Some(id) => CancelOutcome::Cancelled(Booking {
                id,
                event_id,
                user_id: c_user[i].unwrap_or_default(),
                quantity: c_qty[i].unwrap_or_default(),
                status: c_status[i]
                    .as_deref()
                    .and_then(BookingStatus::parse)
                    .unwrap_or(BookingStatus::Cancelled),
                created_at: iso_utc(c_created[i].as_deref().unwrap_or_default()),
                ticket_code: c_code[i].clone(),
                finalized_at: c_fin[i].as_deref().map(iso_utc),
                cancelled_at: c_can[i].as_deref().map(iso_utc),
            }),
        })
        .collect();
    let took: Vec<bool> = r.get("u_took");
    let u_user: Vec<i64> = r.get("u_user");
    let u_seats: Vec<i64> = r.get("u_seats");
    let users = (0..took.len())
        .map(|i| match took[i] {
            true => SeatsSeen::Took {
                user_id: u_user[i],
                seats: u_seats[i],
            },
            false => SeatsSeen::Holds {
                user_id: u_user[i],
                seats: u_seats[i],
            },
        })
        .collect();
    Ok(BatchApplied {
        booked_after: r.get("booked"),
        cancelled: r.get("cancelled"),
        freed: r.get("freed"),
        freed_issued: r.get("freed_issued"),
        bookings,
        cancels,
        users,
    })
}
