//! The finalizer pool: issues the ticket of every committed booking, exactly once in effect.
//!
//! `FINALIZER_WORKERS` actors per replica take bookings from the queue (embedded: their lane of
//! the in-process queue; cluster: the Redis Stream, as consumers of one group). Each issuance
//! waits out its simulated delivery (`FINALIZE_DELAY_MS`, a PDF renderer and a mail provider: an
//! I/O wait) in its worker's delay line — a queue in arrival order, so in order of when each is
//! due — and costs the service nothing but its place in that line (about 125 bytes) while it
//! waits. Up to `FINALIZE_IN_FLIGHT` issuances per replica wait at once; beyond that the backlog
//! stays where it is durable (the PENDING rows, the stream), never in memory.
//!
//! What is due is issued in batches: signed (the code is a pure function of the booking's facts,
//! which the queue carries from the writer's commit, so nothing is read back), written by the
//! writer as one op of up to `ISSUE_BATCH` tickets, and acknowledged in one round trip.
//!
//! Issuing is idempotent: the store's update only moves PENDING to FINALIZED, and only for the
//! booking the facts describe. So duplicates (a redelivery, the sweeper and the writer both
//! pushing, a restart mid-issuance) change nothing, and the queue can be at-least-once; a booking
//! cancelled while it waited is never finalized.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::persistence::Writer;
use crate::coord::stream::{self, Consumer, Entry};
use crate::coord::{LocalQueue, Owed, RedisLink};
use crate::store::queries::{self, IssuedTicket};
use crate::store::ReadPool;
use crate::ticket::{TicketFacts, TicketSigner};

/// Bookings read per page while sweeping.
const SWEEP_PAGE: usize = 1000;
/// How long a stream consumer waits for new entries per read.
pub const READ_BLOCK: Duration = Duration::from_millis(1000);
/// Entries read (or reclaimed) at once by one stream consumer.
const READ_COUNT: usize = 512;
/// Most tickets one worker hands the writer at once (one op, one reply, one acknowledgement).
const ISSUE_BATCH: usize = 1024;
/// How long past its due time a ticket waits for others to be written with it (see
/// `batch_due`): at `FINALIZE_DELAY_MS=0` a write carried ~10 tickets, ~50 with this and the
/// writer's `ISSUANCE_LINGER` (probe of the hot event, 2026-12-06: finalize ops per second from
/// `ticketd_group_commit_ops` less the batches).
const ISSUE_GATHER: Duration = Duration::from_millis(4);

/// What every finalizer needs.
#[derive(Clone)]
pub struct FinalizerDeps {
    pub reads: ReadPool,
    pub writer: Writer,
    pub signer: TicketSigner,
    pub delay: Duration,
    /// Issuances waiting or being written in this replica, all workers together
    /// (`FINALIZE_IN_FLIGHT`): a permit per issuance, from intake to its end.
    pub in_flight: Arc<Semaphore>,
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

    /// Issuances queued or under way in this replica (embedded mode; the stream keeps its own).
    pub fn in_flight(&self) -> Option<usize> {
        match self {
            Finalization::Local(q) => Some(q.in_flight()),
            Finalization::Stream(_) => None,
        }
    }

    /// Issuances waiting or under way: embedded, this replica's; cluster, the shared stream's
    /// entries (queued, or delivered and not yet acknowledged).
    pub async fn queue_depth(&self) -> Result<u64, String> {
        match self {
            Finalization::Local(q) => Ok(q.in_flight() as u64),
            Finalization::Stream(link) => {
                stream::depth(&link.conn()).await.map_err(|e| e.to_string())
            }
        }
    }
}

/// Where one finalizer actor gets its work.
pub enum Source {
    Lane(LocalQueue, mpsc::Receiver<Owed>),
    Stream(Box<Consumer>),
}

/// One issuance: the booking, the stream entry it came from (cluster), and its place among the
/// replica's in-flight issuances (given back when it ends, however it ends).
struct Job {
    owed: Owed,
    entry: Option<String>,
    _slot: OwnedSemaphorePermit,
}

/// How a worker closes what it issued: the local queue's bookkeeping, or the stream's ack.
#[derive(Clone)]
enum Done {
    Local(LocalQueue),
    Stream(RedisLink),
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
                let jobs = lane_jobs(deps.in_flight.clone(), lane);
                ctx.spawn(run_worker(deps, jobs, Done::Local(queue)).into_actor(self));
            }
            Some(Source::Stream(consumer)) => {
                let done = Done::Stream(consumer.link().clone());
                let jobs = stream_jobs(deps.clone(), *consumer);
                ctx.spawn(run_worker(deps, jobs, done).into_actor(self));
            }
            None => {}
        }
    }
}

/// Embedded mode: a lane's bookings as jobs, each taking its slot as it is taken off the lane
/// (no slot free: the lane waits, and once full, pushes are dropped and swept later).
fn lane_jobs(slots: Arc<Semaphore>, mut lane: mpsc::Receiver<Owed>) -> mpsc::Receiver<Job> {
    let (tx, rx) = mpsc::channel(READ_COUNT);
    actix::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let Some(owed) = lane.recv().await else {
                return;
            };
            let job = Job {
                owed,
                entry: None,
                _slot: slot,
            };
            if tx.send(job).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Cluster mode: one consumer of the stream's group, its entries as jobs. First its own pending
/// entries (delivered before a restart, never acknowledged), then new entries, and now and then
/// the stalled entries of dead consumers. It reads only as many entries as there are free slots:
/// an entry it read is its own until acknowledged, and one left waiting for a slot would age
/// past the visibility timeout, be reclaimed by another consumer and, after a few rounds,
/// dead-lettered although nothing was wrong with it.
fn stream_jobs(deps: FinalizerDeps, mut consumer: Consumer) -> mpsc::Receiver<Job> {
    let (tx, rx) = mpsc::channel(READ_COUNT);
    actix::spawn(async move {
        let link = consumer.link().clone();
        let slots = deps.in_flight.clone();
        while let Err(e) = stream::ensure_group(&link.conn()).await {
            warn!(error = %e, "finalize stream unavailable; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let send = |entries: Vec<Entry>| {
            let (tx, slots) = (tx.clone(), slots.clone());
            async move {
                for entry in entries {
                    let Ok(slot) = slots.clone().acquire_owned().await else {
                        return false;
                    };
                    let Some(owed) = entry.booking else {
                        warn!(entry = %entry.id, "unreadable finalize entry; it will be dead-lettered");
                        continue;
                    };
                    let job = Job {
                        owed,
                        entry: Some(entry.id),
                        _slot: slot,
                    };
                    if tx.send(job).await.is_err() {
                        return false;
                    }
                }
                true
            }
        };
        // Own pending entries first: they were ours when this consumer last stopped.
        let mut after = "0".to_string();
        loop {
            let n = room(&slots).await;
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
                    if !send(entries).await {
                        return;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "reading own pending entries failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        let mut last_reclaim = std::time::Instant::now();
        loop {
            if last_reclaim.elapsed() >= deps.visibility / 2 {
                last_reclaim = std::time::Instant::now();
                let n = room(&slots).await;
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
                        if !send(entries).await {
                            return;
                        }
                    }
                    Err(e) => warn!(error = %e, "reclaim failed"),
                }
            }
            let n = room(&slots).await;
            match consumer.read(None, n).await {
                Ok(entries) => {
                    if !send(entries).await {
                        return;
                    }
                }
                Err(e) => {
                    debug!(error = %e, "stream read failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    });
    rx
}

/// Waits until at least one issuance slot is free; returns how many entries to read (at most
/// `READ_COUNT`).
async fn room(slots: &Arc<Semaphore>) -> usize {
    loop {
        let free = slots.available_permits();
        if free > 0 {
            return free.min(READ_COUNT);
        }
        match slots.acquire().await {
            Ok(p) => drop(p),            // one came free: look again
            Err(_) => return READ_COUNT, // closed: never, but do not spin
        }
    }
}

/// A worker: every job waits out the delivery delay in the delay line, then what is due is
/// issued in batches. The line is in arrival order, which is the order of the deadlines (one
/// delay for all), so one timer — the head's — serves the whole line.
async fn run_worker(deps: FinalizerDeps, mut jobs: mpsc::Receiver<Job>, done: Done) {
    let mut line: VecDeque<(Instant, Job)> = VecDeque::new();
    let mut open = true;
    while open || !line.is_empty() {
        let head = batch_due(&line);
        tokio::select! {
            job = jobs.recv(), if open => match job {
                Some(job) => line.push_back((Instant::now() + deps.delay, job)),
                None => open = false,
            },
            () = sleep_until(head), if head.is_some() => {
                let now = Instant::now();
                let mut batch = Vec::new();
                while batch.len() < ISSUE_BATCH && line.front().is_some_and(|(due, _)| *due <= now) {
                    if let Some((_, job)) = line.pop_front() {
                        batch.push(job);
                    }
                }
                actix::spawn(issue(deps.clone(), done.clone(), batch));
            }
        }
    }
}

/// When the next batch is to be taken off `line` (in order of due time): once what fell due
/// within `ISSUE_GATHER` of its first ticket is in, or as soon as a full batch is due, whichever
/// comes first. Tickets fall due one at a time, at the pace of the sale a delay ago, and a write
/// of a few tickets costs the writer more than the tickets do. (Until 2026-12-06 the full-batch
/// test read the line's length, not what in it was due: at the default 5 s delay the line holds
/// seconds of sales, so batches never gathered — ops of ~8 tickets, ~1,800 a second.)
fn batch_due<T>(line: &VecDeque<(Instant, T)>) -> Option<Instant> {
    let (first, _) = line.front()?;
    let gathered = *first + ISSUE_GATHER;
    Some(match line.get(ISSUE_BATCH - 1) {
        Some((full, _)) => gathered.min(*full),
        None => gathered,
    })
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Issues a batch of due tickets: signs them, has the writer write them as one op, and closes
/// them (the local queue's bookkeeping, or one acknowledgement for all their entries). A ticket
/// whose booking is gone or no longer PENDING needs nothing, and is closed all the same; one
/// that fails is left to be delivered again (the sweeper, or the stream's redelivery).
async fn issue(deps: FinalizerDeps, done: Done, batch: Vec<Job>) {
    let m = crate::metrics::handles();
    let (mut ready, mut failed): (Vec<Job>, Vec<Job>) = (Vec::with_capacity(batch.len()), vec![]);
    for job in batch {
        // A failed delivery, per issuance (tests play it).
        let fails = (|| {
            fail::fail_point!("finalize-issue", |_| true);
            false
        })();
        if fails {
            failed.push(job);
        } else {
            ready.push(job);
        }
    }
    // Facts for the jobs queued by id only (swept, replayed): one read for all of them.
    let unknown: Vec<i64> = ready
        .iter()
        .filter(|j| j.owed.facts.is_none())
        .map(|j| j.owed.booking_id)
        .collect();
    if !unknown.is_empty() {
        let n = unknown.len();
        match deps
            .reads
            .read(move |c| queries::pending_facts(c, &unknown))
            .await
        {
            Ok(found) => {
                let found: std::collections::HashMap<i64, TicketFacts> =
                    found.into_iter().map(|f| (f.booking_id, f)).collect();
                for job in ready.iter_mut().filter(|j| j.owed.facts.is_none()) {
                    job.owed.facts = found.get(&job.owed.booking_id).copied();
                }
            }
            Err(e) => {
                warn!(error = %e, n, "could not read bookings to issue");
                let (known, lost): (Vec<Job>, Vec<Job>) =
                    ready.into_iter().partition(|j| j.owed.facts.is_some());
                ready = known;
                failed.extend(lost);
            }
        }
    }
    // Still without facts: missing or no longer PENDING, nothing to issue.
    let tickets: Vec<IssuedTicket> = ready
        .iter()
        .filter_map(|j| j.owed.facts)
        .map(|facts: TicketFacts| IssuedTicket {
            code: deps.signer.sign(&facts),
            facts,
        })
        .collect();
    if !tickets.is_empty() {
        match deps.writer.finalize(tickets).await {
            Ok(written) => {
                m.tickets_issued.increment(written as u64);
                debug!(written, batch = ready.len(), "tickets issued");
            }
            // The writer stops last in a graceful shutdown: issuances still due then wait,
            // PENDING, for the next start. Expected, so not a warning.
            Err(e @ crate::store::StoreError::WriterClosed) => {
                info!(error = %e, n = ready.len(), "stopping: these tickets are issued after the next start");
                failed.append(&mut ready);
            }
            Err(e) => {
                warn!(error = %e, n = ready.len(), "issuing failed; the tickets will be delivered again");
                failed.append(&mut ready);
            }
        }
    }
    m.finalize_failures.increment(failed.len() as u64);
    match &done {
        Done::Local(q) => {
            for job in &ready {
                q.done(job.owed.booking_id);
            }
            for job in &failed {
                q.failed(job.owed.booking_id);
            }
        }
        Done::Stream(link) => {
            // A crash here (played by the failpoint) leaves issued bookings unacknowledged:
            // their redelivery finds them FINALIZED and only acknowledges them.
            fail::fail_point!("finalize-before-ack", |_| {});
            let ids: Vec<String> = ready.iter().filter_map(|j| j.entry.clone()).collect();
            if let Err(e) = stream::ack(&link.conn(), &ids).await {
                warn!(error = %e, n = ids.len(), "ack failed; the entries will be redelivered");
            }
        }
    }
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
                        q.push(Owed::id(id));
                        queued += 1;
                    }
                }
            }
            Finalization::Stream(link) => {
                let missing: Vec<Owed> = ids
                    .into_iter()
                    .filter(|id| !skip.contains(id))
                    .map(Owed::id)
                    .collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn line(dues: impl IntoIterator<Item = Instant>) -> VecDeque<(Instant, ())> {
        dues.into_iter().map(|due| (due, ())).collect()
    }

    fn us(n: usize) -> Duration {
        Duration::from_micros(n as u64)
    }

    #[test]
    fn a_batch_gathers_what_falls_due_unless_a_full_one_is_due() {
        let t = Instant::now();
        assert_eq!(batch_due(&line([])), None);
        // A few tickets: the first waits for company.
        assert_eq!(batch_due(&line([t, t + us(1_000)])), Some(t + ISSUE_GATHER));
        // Seconds of a sale in the line (the default delay), one ticket falling due every 100 µs:
        // still gathered, though the line is far longer than a batch.
        let long = line((0..50_000).map(|i| t + us(100 * i)));
        assert_eq!(batch_due(&long), Some(t + ISSUE_GATHER));
        // A full batch due within the window: taken as soon as its last ticket is due.
        let burst = line((0..2_000).map(|i| t + us(i)));
        assert_eq!(batch_due(&burst), Some(t + us(ISSUE_BATCH - 1)));
    }
}
