//! The finalizer pool: issues the ticket of every committed booking, exactly once in effect.
//!
//! `FINALIZER_WORKERS` actors each take booking ids from their lane of the finalization queue and
//! issue them concurrently (up to `issuances_per_worker` at once): the simulated delivery
//! (`FINALIZE_DELAY_MS`) is awaited, never slept on a thread, so one pool overlaps hundreds of
//! issuances where the old Celery workers did one each.
//!
//! Issuing is idempotent: the code is a pure function of the booking, and the store's update
//! only moves PENDING to FINALIZED. A duplicate delivery (the sweeper and the writer both
//! pushing, a restart mid-issuance) therefore changes nothing. The sweeper re-queues PENDING
//! bookings that are not in flight: after a restart, after a full queue, after a failed write.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

use super::persistence::Writer;
use crate::coord::FinalizeQueue;
use crate::store::{queries, ReadPool, StoreError};
use crate::ticket::{TicketFacts, TicketSigner};

/// Bookings read per page while sweeping.
const SWEEP_PAGE: usize = 1000;

/// What every finalizer needs.
#[derive(Clone)]
pub struct FinalizerDeps {
    pub reads: ReadPool,
    pub writer: Writer,
    pub signer: TicketSigner,
    pub delay: Duration,
    pub queue: FinalizeQueue,
    pub per_worker: usize,
}

/// One finalizer actor, consuming one lane of the queue.
pub struct FinalizerActor {
    id: usize,
    deps: FinalizerDeps,
    lane: Option<mpsc::Receiver<i64>>,
}

impl Actor for FinalizerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let Some(mut lane) = self.lane.take() else {
            return;
        };
        let deps = self.deps.clone();
        let permits = Arc::new(Semaphore::new(deps.per_worker.max(1)));
        let worker = self.id;
        ctx.spawn(
            async move {
                while let Some(booking_id) = lane.recv().await {
                    let Ok(permit) = permits.clone().acquire_owned().await else { break };
                    let deps = deps.clone();
                    actix::spawn(async move {
                        if let Err(e) = issue(&deps, booking_id).await {
                            warn!(worker, booking_id, error = %e, "issuance failed; the sweeper retries");
                        }
                        deps.queue.done(booking_id);
                        drop(permit);
                    });
                }
            }
            .into_actor(self),
        );
    }
}

/// Issues one ticket: sign, deliver (the simulated delay), then mark FINALIZED with the code.
async fn issue(deps: &FinalizerDeps, booking_id: i64) -> Result<(), StoreError> {
    let Some(b) = deps
        .reads
        .read(move |c| queries::booking(c, booking_id))
        .await?
    else {
        return Ok(());
    };
    if b.status != "PENDING" {
        return Ok(()); // already issued (a duplicate delivery) or cancelled
    }
    let code = deps.signer.sign(&TicketFacts {
        booking_id: b.id,
        event_id: b.event_id,
        user_id: b.user_id,
        quantity: b.quantity,
    });
    tokio::time::sleep(deps.delay).await;
    let changed = deps.writer.finalize(booking_id, code).await?;
    debug!(booking_id, changed, "ticket issued");
    Ok(())
}

/// The running pool: its actors and its sweeper.
pub struct FinalizerPool {
    workers: Vec<Addr<FinalizerActor>>,
}

impl FinalizerPool {
    /// Starts one actor per lane and the sweeper (which runs once at once: the restart pickup).
    ///
    /// `min_age`: in cluster mode every replica sweeps the shared outbox, so a sweeper only takes
    /// bookings older than the visibility timeout (their own replica had its chance); embedded,
    /// everything PENDING and not in flight here is fair game.
    pub fn start(
        deps: FinalizerDeps,
        lanes: Vec<mpsc::Receiver<i64>>,
        sweep_every: Duration,
        min_age: Option<Duration>,
    ) -> Self {
        let workers = lanes
            .into_iter()
            .enumerate()
            .map(|(id, lane)| {
                FinalizerActor {
                    id,
                    deps: deps.clone(),
                    lane: Some(lane),
                }
                .start()
            })
            .collect();
        actix::spawn(async move {
            loop {
                match sweep(&deps, min_age).await {
                    Ok(0) => {}
                    Ok(n) => info!(requeued = n, "sweeper re-queued PENDING bookings"),
                    Err(e) => warn!(error = %e, "sweep failed"),
                }
                tokio::time::sleep(sweep_every).await;
            }
        });
        FinalizerPool { workers }
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }
}

/// Queues every PENDING booking that is not already on its way; returns how many.
async fn sweep(deps: &FinalizerDeps, min_age: Option<Duration>) -> Result<usize, StoreError> {
    let before = min_age.map(|age| {
        let age = chrono::Duration::from_std(age).unwrap_or_default();
        queries::db_timestamp(chrono::Utc::now() - age)
    });
    let mut after = 0;
    let mut queued = 0;
    loop {
        let before = before.clone();
        let ids = deps
            .reads
            .read(move |c| queries::pending_ids(c, after, before.as_deref(), SWEEP_PAGE))
            .await?;
        let Some(&last) = ids.last() else {
            return Ok(queued);
        };
        after = last;
        for id in ids {
            if !deps.queue.is_tracked(id) {
                deps.queue.push(id);
                queued += 1;
            }
        }
    }
}
