//! The group transaction on PostgreSQL: the whole group goes to `PgWriter::commit_group` (one
//! pipelined round trip, see `store::postgres::writer`), and each op's outcome comes back as the
//! same `Applied` SQLite's gives.
//!
//! The connection is the writer's to keep: lost (the server restarted, the network cut it), the
//! next group connects again — at most once per `RECONNECT_PAUSE`; meanwhile groups are answered
//! 503 at once. A group whose COMMIT was cut off may or may not have committed: its clients hear
//! so (`StoreError::OutcomeUnknown`: a 503 saying the outcome is unknown), and a retry with the
//! same `Idempotency-Key` finds the booking if it was written, or makes it if it was not.

use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::{Applied, Stamps, WriteOp};
use crate::store::postgres::writer::{PgDone, PgOp, PgWriter};
use crate::store::queries::{FencedBatch, NewBookingRow, PurgeCursor};
use crate::store::StoreError;

/// The least time between two connection attempts of the writer while the server is away.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

pub(super) struct Db {
    url: String,
    writer: Option<PgWriter>,
    /// No new connection attempt before this.
    next_attempt: Instant,
}

impl Db {
    pub(super) fn open(url: String, writer: Option<PgWriter>) -> Db {
        Db {
            url,
            writer,
            next_attempt: Instant::now(),
        }
    }

    /// The live connection, connecting again if the last one was lost.
    fn writer(&mut self) -> Result<&mut PgWriter, StoreError> {
        if self.writer.as_ref().is_some_and(PgWriter::is_closed) {
            warn!("the writer's PostgreSQL connection is lost; reconnecting");
            self.writer = None;
        }
        if self.writer.is_none() {
            if Instant::now() < self.next_attempt {
                return Err(StoreError::Unavailable("reconnecting to PostgreSQL".into()));
            }
            self.next_attempt = Instant::now() + RECONNECT_PAUSE;
            let w = PgWriter::connect(&self.url)
                .map_err(|e| StoreError::Unavailable(format!("PostgreSQL: {e}")))?;
            info!("the writer is connected to PostgreSQL");
            self.writer = Some(w);
        }
        self.writer
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("no PostgreSQL connection".into()))
    }

    pub(super) fn purge_expired_keys(
        &mut self,
        cursor: &mut PurgeCursor,
        before_ms: i64,
        chunk: usize,
    ) -> Result<usize, StoreError> {
        match self.writer.as_mut() {
            Some(w) if !w.is_closed() => Ok(w.purge_expired_keys(cursor, before_ms, chunk)?),
            _ => Ok(0),
        }
    }

    /// The group in one transaction; `None` if it failed (every op has been answered).
    pub(super) fn write(&mut self, group: Vec<WriteOp>, at: &Stamps<'_>) -> Option<Vec<Applied>> {
        // Tests make the group fail as a failed COMMIT would: nothing of it written.
        if commit_fails() {
            let why =
                StoreError::Unavailable("injected COMMIT failure (failpoint writer-commit)".into());
            fail_all(group, &why);
            return None;
        }
        let writer = match self.writer() {
            Ok(w) => w,
            Err(why) => {
                warn!(error = %why, "no connection for the group transaction");
                fail_all(group, &why);
                return None;
            }
        };
        // What the statements borrow: each batch's rows and cancellations, then its batch.
        let parts: Vec<(Vec<NewBookingRow<'_>>, Vec<i64>)> = group
            .iter()
            .filter_map(|op| match op {
                WriteOp::Seats(b) => Some((
                    b.requests
                        .iter()
                        .map(|r| NewBookingRow {
                            user_id: r.user_id,
                            quantity: r.quantity,
                            key: r.key.as_deref(),
                        })
                        .collect(),
                    b.cancels.iter().map(|c| c.booking_id).collect(),
                )),
                _ => None,
            })
            .collect();
        let batches: Vec<FencedBatch<'_>> = group
            .iter()
            .filter_map(|op| match op {
                WriteOp::Seats(b) => Some(b),
                _ => None,
            })
            .zip(&parts)
            .map(|(b, (rows, cancels))| FencedBatch {
                event_id: b.event_id,
                token: b.token,
                cancels,
                bookings: rows,
                now: at.now,
                now_ms: at.now_ms,
                keys_live_after_ms: at.keys_live_after_ms,
            })
            .collect();
        let mut next_batch = batches.iter();
        let ops: Vec<PgOp<'_>> = group
            .iter()
            .filter_map(|op| {
                Some(match op {
                    // One batch per seats op, in order: `next` is never short.
                    WriteOp::Seats(_) => PgOp::Batch(next_batch.next()?),
                    WriteOp::CreateEvent { event, .. } => PgOp::CreateEvent {
                        title: &event.title,
                        capacity: event.capacity,
                        max_per_user: event.max_per_user,
                        key: event.key.as_deref(),
                        now_ms: at.now_ms,
                        keys_live_after_ms: at.keys_live_after_ms,
                    },
                    WriteOp::Finalize { tickets, .. } => PgOp::Finalize {
                        tickets,
                        at: at.now,
                    },
                })
            })
            .collect();
        debug_assert_eq!(ops.len(), group.len());
        let result = writer.commit_group(&ops);
        drop(ops);
        drop(batches);
        drop(parts);
        match result {
            Ok(done) if done.len() == group.len() => Some(
                group
                    .into_iter()
                    .zip(done)
                    .map(|(op, d)| applied(op, d, at))
                    .collect(),
            ),
            Ok(done) => {
                let why = StoreError::Task(format!(
                    "{} answers for a group of {}",
                    done.len(),
                    group.len()
                ));
                error!(error = %why, "group commit failed");
                fail_all(group, &why);
                None
            }
            Err(failed) => {
                error!(error = %failed, "group commit failed; every op of the group is answered as failed");
                if writer.is_closed() || crate::store::pg_unavailable(&failed.error) {
                    self.writer = None;
                }
                let why = if failed.maybe_committed {
                    StoreError::OutcomeUnknown(failed.error.to_string())
                } else {
                    StoreError::Postgres(failed.error)
                };
                fail_all(group, &why);
                None
            }
        }
    }
}

/// True when the failpoint `writer-commit` plays a failed COMMIT.
fn commit_fails() -> bool {
    fail::fail_point!("writer-commit", |_| true);
    false
}

fn fail_all(group: Vec<WriteOp>, why: &StoreError) {
    crate::metrics::handles().group_failures.increment(1);
    group.into_iter().for_each(|op| op.fail(why));
}

/// An op of a committed group, as the writer answers it.
fn applied(
    op: WriteOp,
    done: Result<PgDone, crate::store::postgres::writer::Error>,
    at: &Stamps<'_>,
) -> Applied {
    match (op, done) {
        (op, Err(e)) => {
            warn!(error = %e, "an op of the group failed alone");
            Applied::Error(op, StoreError::Postgres(e))
        }
        (WriteOp::Seats(b), Ok(PgDone::Batch(Ok(done)))) => super::seats_written(b, done, at.now),
        (WriteOp::Seats(b), Ok(PgDone::Batch(Err(refusal)))) => super::seats_refused(b, refusal),
        (WriteOp::CreateEvent { reply, .. }, Ok(PgDone::Event(created))) => {
            Applied::Event(reply, created)
        }
        (WriteOp::Finalize { reply, .. }, Ok(PgDone::Finalized(written, seats))) => {
            Applied::Finalized(reply, written, seats)
        }
        (op, Ok(other)) => Applied::Error(
            op,
            StoreError::Task(format!("the writer answered an op with {other:?}")),
        ),
    }
}
