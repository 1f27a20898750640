//! The finalizer pool: issues the ticket of every committed booking, exactly once in effect.
//!
//! `FINALIZER_WORKERS` actors per replica take booking ids from the queue (embedded: their lane
//! of the in-process queue; cluster: the Redis Stream, as consumers of one group) and issue them
//! concurrently, up to `issuances_per_worker` each: the simulated delivery (`FINALIZE_DELAY_MS`)
//! is awaited, never slept on a thread, so one pool overlaps hundreds of issuances where the old
//! Celery workers did one each.
//!
//! Issuing is idempotent: the code is a pure function of the booking, and the store's update
//! only moves PENDING to FINALIZED. So duplicates (a redelivery, the sweeper and the writer both
//! pushing, a restart mid-issuance) change nothing, and the queue can be at-least-once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

use super::persistence::Writer;
use crate::coord::stream::{self, Consumer, Entry};
use crate::coord::{LocalQueue, RedisLink};
use crate::store::{queries, ReadPool, StoreError};
use crate::ticket::{TicketFacts, TicketSigner};

/// Bookings read per page while sweeping.
const SWEEP_PAGE: usize = 1000;
/// How long a stream consumer waits for new entries per read.
pub const READ_BLOCK: Duration = Duration::from_millis(1000);
/// Entries read (or reclaimed) at once by one stream consumer.
const READ_COUNT: usize = 128;

/// What every finalizer needs.
#[derive(Clone)]
pub struct FinalizerDeps {
    pub reads: ReadPool,
    pub writer: Writer,
    pub signer: TicketSigner,
    pub delay: Duration,
    pub per_worker: usize,
    /// Cluster mode: an entry idle this long is taken over by another consumer.
    pub visibility: Duration,
    /// Deliveries after which an entry is dead-lettered.
    pub max_deliveries: usize,
}

/// The queue behind the pool, as the rest of the service sees it (`/report`, replay).
#[derive(Clone)]
pub enum Finalization {
    Local(LocalQueue),
    Stream(RedisLink),
}

impl Finalization {
    pub async fn dead_letters(&self) -> Result<u64, String> {
        match self {
            Finalization::Local(q) => Ok(q.dead_letters()),
            Finalization::Stream(link) => stream::dead_letters(&link.conn())
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Sends every dead letter back for issuance; returns how many.
    pub async fn replay(&self) -> Result<u64, String> {
        match self {
            Finalization::Local(q) => Ok(q.replay()),
            Finalization::Stream(link) => stream::replay(&link.conn())
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Issuances waiting or under way: this replica's (embedded), or the entries of the shared
    /// stream, queued or delivered and not yet acknowledged (cluster).
    pub async fn queue_depth(&self) -> Result<u64, String> {
        match self {
            Finalization::Local(q) => Ok(q.in_flight() as u64),
            Finalization::Stream(link) => {
                stream::depth(&link.conn()).await.map_err(|e| e.to_string())
            }
        }
    }

    /// Issuances queued or under way in this replica (embedded mode; the stream keeps its own).
    pub fn in_flight(&self) -> Option<usize> {
        match self {
            Finalization::Local(q) => Some(q.in_flight()),
            Finalization::Stream(_) => None,
        }
    }
}

/// Where one finalizer actor gets its work.
pub enum Source {
    Lane(LocalQueue, mpsc::Receiver<i64>),
    Stream(Consumer),
}

/// One finalizer actor.
pub struct FinalizerActor {
    deps: FinalizerDeps,
    source: Option<Source>,
}

impl Actor for FinalizerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let deps = self.deps.clone();
        match self.source.take() {
            Some(Source::Lane(queue, lane)) => {
                ctx.spawn(run_lane(deps, queue, lane).into_actor(self));
            }
            Some(Source::Stream(consumer)) => {
                ctx.spawn(run_stream(deps, consumer).into_actor(self));
            }
            None => {}
        }
    }
}

/// Embedded mode: issue what arrives on this actor's lane.
async fn run_lane(deps: FinalizerDeps, queue: LocalQueue, mut lane: mpsc::Receiver<i64>) {
    let permits = Arc::new(Semaphore::new(deps.per_worker.max(1)));
    while let Some(booking_id) = lane.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (deps, queue) = (deps.clone(), queue.clone());
        actix::spawn(async move {
            match issue(&deps, booking_id).await {
                Ok(()) => queue.done(booking_id),
                Err(e) => {
                    warn!(booking_id, error = %e, "issuance failed; the sweeper retries");
                    queue.failed(booking_id);
                }
            }
            drop(permit);
        });
    }
}

/// Cluster mode: one consumer of the stream's group. First its own pending entries (delivered
/// before a restart, never acknowledged), then new entries, and now and then the stalled entries
/// of dead consumers.
async fn run_stream(deps: FinalizerDeps, mut consumer: Consumer) {
    let link = consumer.link().clone();
    let permits = Arc::new(Semaphore::new(deps.per_worker.max(1)));
    while let Err(e) = stream::ensure_group(&link.conn()).await {
        warn!(error = %e, "finalize stream unavailable; retrying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Each entry takes its slot when it is read: reads ask for no more than `room` free slots,
    // so the try never fails in practice (the fallback waits rather than overrun the bound).
    let spawn_all = |entries: Vec<Entry>| {
        for entry in entries {
            let (deps, link, permits) = (deps.clone(), link.clone(), permits.clone());
            let slot = permits.clone().try_acquire_owned().ok();
            actix::spawn(async move {
                let _slot = match slot {
                    Some(s) => s,
                    None => match permits.acquire_owned().await {
                        Ok(s) => s,
                        Err(_) => return,
                    },
                };
                handle_entry(&deps, &link, entry).await;
            });
        }
    };
    // Own pending entries first: they were ours when this consumer last stopped.
    let mut after = "0".to_string();
    loop {
        let n = room(&permits).await;
        match consumer.read(Some(&after), n).await {
            Ok(entries) if entries.is_empty() => break,
            Ok(entries) => {
                if let Some(last) = entries.last() {
                    after = last.id.clone();
                }
                info!(consumer = %consumer.name, n = entries.len(), "resuming own pending entries");
                crate::metrics::handles()
                    .finalize_retries
                    .increment(entries.len() as u64);
                spawn_all(entries);
            }
            Err(e) => {
                warn!(error = %e, "reading own pending entries failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let mut last_reclaim = Instant::now();
    loop {
        if last_reclaim.elapsed() >= deps.visibility / 2 {
            last_reclaim = Instant::now();
            let n = room(&permits).await;
            match stream::reclaim(
                &link.conn(),
                &consumer.name,
                deps.visibility,
                deps.max_deliveries,
                n,
            )
            .await
            {
                Ok(entries) => {
                    crate::metrics::handles()
                        .finalize_retries
                        .increment(entries.len() as u64);
                    spawn_all(entries)
                }
                Err(e) => warn!(error = %e, "reclaim failed"),
            }
        }
        let n = room(&permits).await;
        match consumer.read(None, n).await {
            Ok(entries) => spawn_all(entries),
            Err(e) => {
                debug!(error = %e, "stream read failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Waits until at least one issuance slot is free; returns how many entries to read (at most
/// `READ_COUNT`). A consumer reads only what it can start at once: an entry it read is its own
/// until acknowledged, and one left waiting here for a slot would age past the visibility
/// timeout, be reclaimed by another consumer and, after a few rounds, dead-lettered although
/// nothing was wrong with it (seen in review while counting the stream commands of `make bench`).
async fn room(permits: &Arc<Semaphore>) -> usize {
    loop {
        let free = permits.available_permits();
        if free > 0 {
            return free.min(READ_COUNT);
        }
        match permits.acquire().await {
            Ok(p) => drop(p),            // one came free: look again
            Err(_) => return READ_COUNT, // closed: never, but do not spin
        }
    }
}

/// Issues one stream entry and acknowledges it. An entry that fails stays unacknowledged: it is
/// reclaimed after the visibility timeout and dead-lettered after too many deliveries.
async fn handle_entry(deps: &FinalizerDeps, link: &RedisLink, entry: Entry) {
    let Some(booking_id) = entry.booking else {
        warn!(entry = %entry.id, "unreadable finalize entry; it will be dead-lettered");
        return;
    };
    if let Err(e) = issue(deps, booking_id).await {
        warn!(booking_id, entry = %entry.id, error = %e, "issuance failed; the entry will be redelivered");
        return;
    }
    // A crash here (played by the failpoint) leaves an issued booking unacknowledged: its
    // redelivery finds it FINALIZED and only acknowledges it.
    fail::fail_point!("finalize-before-ack", |_| {});
    if let Err(e) = stream::ack(&link.conn(), &entry.id).await {
        warn!(booking_id, entry = %entry.id, error = %e, "ack failed; the entry will be redelivered");
    }
}

/// Issues one ticket (`try_issue`) and counts what came of it: a ticket issued when this
/// delivery is the one that finalized the booking (a duplicate delivery changes nothing and is
/// not counted), a failure when it failed (the booking is delivered again).
async fn issue(deps: &FinalizerDeps, booking_id: i64) -> Result<(), StoreError> {
    let m = crate::metrics::handles();
    match try_issue(deps, booking_id).await {
        Ok(true) => {
            m.tickets_issued.increment(1);
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) => {
            m.finalize_failures.increment(1);
            Err(e)
        }
    }
}

/// Issues one ticket: sign, deliver (the simulated delay), then mark FINALIZED with the code;
/// true if this call finalized it. A booking that is missing or no longer PENDING needs nothing
/// (a duplicate delivery).
async fn try_issue(deps: &FinalizerDeps, booking_id: i64) -> Result<bool, StoreError> {
    let Some(b) = deps
        .reads
        .read(move |c| queries::booking(c, booking_id))
        .await?
    else {
        return Ok(false);
    };
    if b.status != crate::domain::BookingStatus::Pending {
        return Ok(false);
    }
    let code = deps.signer.sign(&TicketFacts {
        booking_id: b.id,
        event_id: b.event_id,
        user_id: b.user_id,
        quantity: b.quantity,
    });
    tokio::time::sleep(deps.delay).await;
    fail::fail_point!("finalize-issue", |_| Err(StoreError::Task(
        "failpoint finalize-issue".into()
    )));
    let changed = deps.writer.finalize(booking_id, code).await?;
    debug!(booking_id, changed, "ticket issued");
    Ok(changed)
}

/// The running pool.
pub struct FinalizerPool {
    workers: Vec<Addr<FinalizerActor>>,
}

impl FinalizerPool {
    /// Starts one actor per source and the sweeper, which runs at once (the restart pickup) and
    /// then every `sweep_every`.
    pub fn start(
        deps: FinalizerDeps,
        sources: Vec<Source>,
        queue: Finalization,
        sweep_every: Duration,
    ) -> Self {
        let workers = sources
            .into_iter()
            .map(|source| {
                FinalizerActor {
                    deps: deps.clone(),
                    source: Some(source),
                }
                .start()
            })
            .collect();
        actix::spawn(async move {
            loop {
                match sweep(&deps, &queue).await {
                    Ok(0) => {}
                    Ok(n) => {
                        crate::metrics::handles()
                            .finalize_retries
                            .increment(n as u64);
                        info!(requeued = n, "sweeper re-queued PENDING bookings")
                    }
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

/// Re-queues PENDING bookings that are not on their way; returns how many.
///
/// Embedded: every PENDING booking not queued or in flight here (and not dead-lettered).
/// Cluster: every PENDING booking older than the visibility timeout that has no entry in the
/// stream (never pushed: a crash between commit and push; or lost: Redis restarted empty) and
/// is not dead-lettered. Bookings whose entry exists are the consumers' and reclaim's business.
async fn sweep(deps: &FinalizerDeps, queue: &Finalization) -> Result<usize, String> {
    let (before, skip) = match queue {
        Finalization::Local(_) => (None, Default::default()),
        Finalization::Stream(link) => {
            let age = chrono::Duration::from_std(deps.visibility).unwrap_or_default();
            let before = queries::db_timestamp(chrono::Utc::now() - age);
            let conn = link.conn();
            let mut skip: std::collections::HashSet<i64> =
                stream::queued_ids(&conn).await.map_err(|e| e.to_string())?;
            skip.extend(stream::dead_ids(&conn).await.map_err(|e| e.to_string())?);
            (Some(before), skip)
        }
    };
    let mut after = 0;
    let mut queued = 0;
    loop {
        let b = before.clone();
        let ids = deps
            .reads
            .read(move |c| queries::pending_ids(c, after, b.as_deref(), SWEEP_PAGE))
            .await
            .map_err(|e| e.to_string())?;
        let Some(&last) = ids.last() else {
            return Ok(queued);
        };
        after = last;
        match queue {
            Finalization::Local(q) => {
                for id in ids {
                    if !q.is_tracked(id) {
                        q.push(id);
                        queued += 1;
                    }
                }
            }
            Finalization::Stream(link) => {
                let missing: Vec<i64> = ids.into_iter().filter(|id| !skip.contains(id)).collect();
                if !missing.is_empty() {
                    stream::push_now(&link.conn(), &missing)
                        .await
                        .map_err(|e| e.to_string())?;
                    queued += missing.len();
                }
            }
        }
    }
}
