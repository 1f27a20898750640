//! The event actor: one per event per replica, the only place that allocates its seats.
//!
//! Requests (bookings and cancellations) queue in the actor; whenever it is idle it takes the
//! lease (one round trip), allocates a whole batch in memory, hands the batch to the persistence
//! actor and waits for the commit, while the next batch piles up behind it. So one event sells
//! at the rate of group commits times batch size, not one lock round trip per booking (what
//! pretix gave up on).
//!
//! # The cycle
//! One round is an explicit state machine (`Phase`), and `advance`'s callers are the only
//! places that change it:
//!
//! ```text
//!   Idle --work queued--> Leasing --token--> [Loading] --> Committing --outcome--> Idle
//!                           |  \--held elsewhere: retry in 1 ms (or on LeaseFree)--> Idle
//!                           \--lease unavailable: 503 to the queue--> Idle
//! ```
//! `Loading` (a read of the event row) happens when the actor has no view yet, or when a batch
//! would refuse someone on a view the store has not confirmed under the current lease.
//!
//! # The view
//! The in-memory view (capacity, booked, limit) is loaded once, then kept exact by every commit
//! (the store returns the count after the update). Another replica may have written while it
//! held the lease: sold seats (the view then promises seats that went: the fenced update refuses
//! the batch, the row comes back and the batch is allocated again from it) or freed seats by a
//! cancellation (the view would refuse seats that are there). So a view is trusted to *refuse*
//! only if it was confirmed under the current token or the one just before it (a renewal: nobody
//! else held the lease in between); otherwise the actor reads the row before it refuses anyone.
//! That keeps hand-overs free of reads (every batch, on a hot event shared by replicas) and
//! costs a read only where a refusal is at stake.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::persistence::{BatchOutcome, SeatBatch, WriteOp, Writer};
use super::registry::Registry;
use crate::config::Tuning;
use crate::coord::lease::{Lease, LeaseError, Token};
use crate::domain::{BookError, CancelRequest, Refused, SeatRequest, Taken, View};
use crate::slots::SoldOut;
use crate::store::queries::SeatsSeen;
use crate::store::{queries, EventRow, ReadPool, StoreError};

/// Times a batch may be refused by the fence in a row before its clients get 503.
const MAX_REFUSALS: u32 = 8;
/// How long an actor for an event that does not exist lingers before it leaves.
const MISSING_LINGER: Duration = Duration::from_millis(500);
/// Pause before asking again for a lease someone else holds.
const LEASE_RETRY: Duration = Duration::from_millis(1);

/// What every event actor needs, shared.
#[derive(Clone)]
pub struct EventDeps {
    pub writer: Writer,
    pub reads: ReadPool,
    pub lease: Lease,
    pub tuning: Arc<Tuning>,
}

/// Another replica gave up this event's lease while we wanted it: try now, not at the next poll.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeaseFree;

/// A booking request for this actor's event.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Book(pub SeatRequest);

/// A cancellation of one of this event's bookings.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Cancel(pub CancelRequest);

/// Where the actor is in its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing under way; queued work starts a round at once.
    Idle,
    /// Waiting for the lease (a Redis round trip).
    Leasing,
    /// Reading the event row under the lease just taken.
    Loading,
    /// A batch is with the writer.
    Committing,
}

pub struct EventActor {
    id: i64,
    generation: u64,
    registry: Weak<Registry>,
    deps: EventDeps,
    sold_out: Arc<SoldOut>,
    view: Option<View>,
    /// The token under which the store last confirmed the view (a commit or a read).
    confirmed: Token,
    /// The highest fence the database has shown us for this event.
    floor: Token,
    queue: VecDeque<SeatRequest>,
    cancels: Vec<CancelRequest>,
    phase: Phase,
    held: Option<Token>,
    refusals: u32,
    idle_since: Instant,
}

impl EventActor {
    pub fn new(
        id: i64,
        generation: u64,
        registry: Weak<Registry>,
        deps: EventDeps,
        sold_out: Arc<SoldOut>,
    ) -> Self {
        EventActor {
            id,
            generation,
            registry,
            deps,
            sold_out,
            view: None,
            confirmed: 0,
            floor: 0,
            queue: VecDeque::new(),
            cancels: Vec::new(),
            phase: Phase::Idle,
            held: None,
            refusals: 0,
            idle_since: Instant::now(),
        }
    }

    fn queued(&self) -> usize {
        self.queue.len() + self.cancels.len()
    }

    fn fail_queue(&mut self, err: BookError) {
        for r in self.queue.drain(..) {
            let _ = r.reply.send(Err(err.clone()));
        }
        for c in self.cancels.drain(..) {
            let _ = c.reply.send(Err(err.clone()));
        }
    }

    /// Idle with work queued: start a round by asking for the lease.
    fn kick(&mut self, ctx: &mut Context<Self>) {
        if self.phase != Phase::Idle || self.queued() == 0 {
            return;
        }
        self.phase = Phase::Leasing;
        let (id, owner, floor) = (self.id, self.generation, self.floor);
        if let Some(answer) = self.deps.lease.acquire_now(id, owner, floor) {
            return self.on_lease(Ok(answer), ctx);
        }
        let lease = self.deps.lease.clone();
        ctx.spawn(
            async move { lease.acquire(id, owner, floor).await }
                .into_actor(self)
                .map(|res, act, ctx| act.on_lease(res, ctx)),
        );
    }

    fn on_lease(&mut self, res: Result<Option<Token>, LeaseError>, ctx: &mut Context<Self>) {
        debug_assert_eq!(self.phase, Phase::Leasing);
        // Every answer of the lease, in-process or Redis, comes through here: counted once.
        let m = crate::metrics::handles();
        match res {
            Err(e) => {
                m.lease_unavailable.increment(1);
                warn!(event_id = self.id, error = %e, "no lease: answering 503");
                self.phase = Phase::Idle;
                self.fail_queue(BookError::Unavailable(e.to_string()));
            }
            Ok(None) => {
                m.lease_waits.increment(1);
                self.phase = Phase::Idle;
                ctx.run_later(LEASE_RETRY, |act, ctx| act.kick(ctx));
            }
            Ok(Some(token)) => {
                m.lease_acquired.increment(1);
                self.held = Some(token);
                if self.view.is_some() {
                    self.run_batch(ctx);
                } else {
                    self.reload(ctx);
                }
            }
        }
    }

    /// Reads the event row under the lease just taken.
    fn reload(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Loading;
        let id = self.id;
        let fut = self.deps.reads.read(move |c| queries::event(c, id));
        ctx.spawn(
            fut.into_actor(self)
                .map(|res, act, ctx| act.on_reload(res, ctx)),
        );
    }

    fn on_reload(&mut self, res: Result<Option<EventRow>, StoreError>, ctx: &mut Context<Self>) {
        debug_assert_eq!(self.phase, Phase::Loading);
        match res {
            Ok(Some(row)) => {
                self.adopt(&row);
                // Read under the lease we hold: exact until someone else takes it.
                self.confirmed = self.held.unwrap_or(self.confirmed);
                self.run_batch(ctx);
            }
            Ok(None) => {
                self.fail_queue(BookError::EventNotFound);
                self.view = None;
                self.finish(ctx);
                // No such event (yet: ids are handed out later). Stay a moment to answer a
                // burst for it, then leave: unknown ids must not pile up actors.
                ctx.run_later(MISSING_LINGER, |act, ctx| {
                    if act.view.is_none() && act.phase == Phase::Idle && act.queued() == 0 {
                        act.retire(ctx);
                    }
                });
            }
            Err(e) => {
                warn!(event_id = self.id, error = %e, "could not load the event");
                self.fail_queue(BookError::Unavailable(e.to_string()));
                self.finish(ctx);
            }
        }
    }

    /// Takes the row as the store has it. The customers' counts it had learned may be stale
    /// too (another replica may have sold or cancelled for them): it forgets them, and the store
    /// judges those customers until it learns of them again.
    fn adopt(&mut self, row: &EventRow) {
        self.view = Some(View::new(row.capacity, row.booked_count, row.max_per_user));
        self.floor = self.floor.max(row.fence);
        self.mark_sold_out();
    }

    /// Publishes what the view says to the routes' fast path (sold out: 409 without a message).
    fn mark_sold_out(&mut self) {
        let Some(view) = &self.view else { return };
        if view.sold_out() {
            self.sold_out.mark();
        } else if self.sold_out.is_sold_out() {
            self.sold_out.clear();
        }
    }

    /// May the view refuse a request under `token`? Only if the store confirmed it under this
    /// token or the one before (a renewal: nobody else wrote in between).
    fn trusted(&self, token: Token) -> bool {
        token == self.confirmed || token == self.confirmed + 1
    }

    /// Allocates up to `max_batch` queued requests in memory and hands them, with the queued
    /// cancellations, to the writer.
    fn run_batch(&mut self, ctx: &mut Context<Self>) {
        let (Some(view), Some(token)) = (self.view.as_ref(), self.held) else {
            self.finish(ctx);
            return;
        };
        let trusted = self.trusted(token);
        let mut judged = Vec::new();
        let mut taken = Taken::default();
        while judged.len() < self.deps.tuning.max_batch {
            let Some(req) = self.queue.pop_front() else {
                break;
            };
            if req.reply.is_closed() {
                continue; // the client went away before we sold it anything
            }
            let verdict = view.allocate(&mut taken, req.user_id, req.quantity);
            judged.push((req, verdict));
        }
        if !trusted && judged.iter().any(|(_, v)| v.is_err()) {
            // Someone else held the lease since the view was last confirmed: seats may have come
            // back. Read the row before refusing anyone, then judge the same requests again, in
            // the order they came.
            for (req, _) in judged.into_iter().rev() {
                self.queue.push_front(req);
            }
            return self.reload(ctx);
        }
        let mut requests = Vec::with_capacity(judged.len());
        for (req, verdict) in judged {
            match verdict {
                Ok(()) => requests.push(req),
                Err(Refused::SoldOut { remaining }) => {
                    let _ = req.reply.send(Err(BookError::SoldOut { remaining }));
                }
                Err(Refused::Limit { limit, may_take }) => {
                    let _ = req
                        .reply
                        .send(Err(BookError::LimitReached { limit, may_take }));
                }
            }
        }
        let cancels = std::mem::take(&mut self.cancels);
        if requests.is_empty() && cancels.is_empty() {
            self.finish(ctx);
            return;
        }
        if !cancels.is_empty() {
            // Seats may come back with this batch. The cancelling client may have its answer
            // before this actor has run on the news of the commit, and book again at once: it
            // must not meet the sold-out fast path (here or in the registry) but queue for the
            // next batch. `finish` marks the event sold out again if nothing came back.
            self.sold_out.clear();
        }
        self.phase = Phase::Committing;
        crate::metrics::handles()
            .batch_requests
            .record(requests.len() as f64);
        debug!(
            event_id = self.id,
            size = requests.len(),
            cancels = cancels.len(),
            seats = taken.seats,
            token,
            "batch to the writer"
        );
        let (done, rx) = oneshot::channel();
        self.deps.writer.submit(WriteOp::Seats(SeatBatch {
            event_id: self.id,
            token,
            requests,
            cancels,
            done,
        }));
        ctx.spawn(
            async move {
                let outcome = rx.await;
                // Tests hold the news of the commit back here: the writer answers the batch's
                // clients right after telling this actor, and they may act on their answers
                // before it has run (a cancelled seat booked again at once, say).
                if let Some(hold) = outcome_held() {
                    tokio::time::sleep(hold).await;
                }
                outcome
            }
            .into_actor(self)
            .map(move |res, act, ctx| match res {
                Ok(outcome) => act.on_batch(outcome, token, ctx),
                Err(_) => act.finish(ctx),
            }),
        );
    }

    fn on_batch(&mut self, outcome: BatchOutcome, token: Token, ctx: &mut Context<Self>) {
        debug_assert_eq!(self.phase, Phase::Committing);
        match outcome {
            BatchOutcome::Committed {
                seats,
                booked,
                users,
            } => {
                let freed = seats < 0;
                if let Some(v) = self.view.as_mut() {
                    // The count after our update: exact even if an older holder wrote just before.
                    v.booked = booked;
                    for seen in users {
                        match seen {
                            SeatsSeen::Holds { user_id, seats } => v.holds(user_id, seats),
                            SeatsSeen::Took { user_id, seats } => v.took(user_id, seats),
                        }
                    }
                }
                self.floor = self.floor.max(token);
                self.confirmed = token;
                self.refusals = 0;
                if freed {
                    // Tell the other replicas' fast paths that seats came back.
                    self.announce_seats_returned(ctx);
                }
                self.finish(ctx);
            }
            BatchOutcome::Failed => self.finish(ctx),
            BatchOutcome::Refused {
                row,
                requests,
                cancels,
            } => {
                self.refusals += 1;
                for r in requests.into_iter().rev() {
                    self.queue.push_front(r);
                }
                self.cancels.splice(0..0, cancels);
                let Some(row) = row else {
                    self.fail_queue(BookError::EventNotFound);
                    self.view = None;
                    self.finish(ctx);
                    return;
                };
                debug!(
                    event_id = self.id,
                    token,
                    fence = row.fence,
                    "batch refused; reloaded"
                );
                self.adopt(&row);
                if self.refusals > MAX_REFUSALS {
                    warn!(
                        event_id = self.id,
                        "batch refused repeatedly: answering 503"
                    );
                    self.refusals = 0;
                    self.fail_queue(BookError::Unavailable(
                        "the event is contended; retry".into(),
                    ));
                    self.finish(ctx);
                } else if row.fence > token {
                    // A newer holder wrote: our lease is gone. Take a new one (above its token).
                    self.held = None;
                    self.phase = Phase::Idle;
                    self.kick(ctx);
                } else {
                    // Our token is still the newest; the row read inside the refused transaction
                    // is exact, so allocate again from it.
                    self.confirmed = token;
                    self.run_batch(ctx);
                }
            }
        }
    }

    fn announce_seats_returned(&mut self, ctx: &mut Context<Self>) {
        let (lease, id) = (self.deps.lease.clone(), self.id);
        ctx.spawn(async move { lease.announce_seats_returned(id).await }.into_actor(self));
    }

    /// The round is over: give the lease back if there is nothing left to do, else go again.
    fn finish(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Idle;
        self.idle_since = Instant::now();
        self.mark_sold_out();
        if self.queued() == 0 {
            self.release_lease(ctx);
        } else {
            self.kick(ctx);
        }
    }

    fn release_lease(&mut self, ctx: &mut Context<Self>) {
        if let Some(token) = self.held.take() {
            let (id, owner) = (self.id, self.generation);
            if self.deps.lease.release_now(id, owner, token) {
                return;
            }
            let lease = self.deps.lease.clone();
            ctx.spawn(
                async move {
                    if let Err(e) = lease.release(id, owner, token).await {
                        debug!(event_id = id, error = %e, "lease release failed; it will expire");
                    }
                }
                .into_actor(self),
            );
        }
    }

    /// Leaves the registry (only if it still points at this actor) and stops.
    fn retire(&mut self, ctx: &mut Context<Self>) {
        if let Some(reg) = self.registry.upgrade() {
            reg.retire(self.id, self.generation);
        }
        ctx.stop();
    }

    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        if self.phase == Phase::Idle
            && self.queued() == 0
            && self.idle_since.elapsed() >= self.deps.tuning.actor_idle
        {
            debug!(event_id = self.id, "idle: passivating");
            self.release_lease(ctx);
            self.retire(ctx);
        }
    }

    /// Room for one more request, or the 503 it gets.
    fn admit(&mut self) -> Result<(), BookError> {
        if self.queued() >= self.deps.tuning.event_queue_limit {
            return Err(BookError::Overloaded);
        }
        self.idle_since = Instant::now();
        Ok(())
    }
}

impl Actor for EventActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let every = (self.deps.tuning.actor_idle / 2).max(Duration::from_millis(10));
        ctx.run_interval(every, |act, ctx| act.check_idle(ctx));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(reg) = self.registry.upgrade() {
            reg.retire(self.id, self.generation);
        }
        if let Some(token) = self.held.take() {
            let (id, owner) = (self.id, self.generation);
            if !self.deps.lease.release_now(id, owner, token) {
                // On the System arbiter: this actor's own arbiter may be going away with it.
                let lease = self.deps.lease.clone();
                let release = async move {
                    let _ = lease.release(id, owner, token).await;
                };
                match actix::System::try_current() {
                    Some(system) => {
                        system.arbiter().spawn(release);
                    }
                    None => {
                        actix::spawn(release);
                    }
                }
            }
        }
        // An actor stops itself only with an empty queue (idle, or an unknown event); requests
        // still queued mean its arbiter is going away under it: an HTTP worker stopping during
        // a graceful shutdown. None of them reached a batch, so dropping their reply channels
        // tells their routes that nothing was written, and the routes re-route them to a live
        // actor (`Registry::book`) instead of answering 503.
        self.queue.clear();
        self.cancels.clear();
    }
}

impl Handler<LeaseFree> for EventActor {
    type Result = ();

    fn handle(&mut self, _: LeaseFree, ctx: &mut Self::Context) {
        if self.held.is_none() {
            self.kick(ctx); // nothing to do if busy or idle; the poll stays as the fallback
        }
    }
}

impl Handler<Book> for EventActor {
    type Result = ();

    fn handle(&mut self, Book(req): Book, ctx: &mut Self::Context) {
        if self.sold_out.is_sold_out() {
            let _ = req.reply.send(Err(BookError::SoldOut { remaining: 0 }));
            return;
        }
        if let Err(e) = self.admit() {
            let _ = req.reply.send(Err(e));
            return;
        }
        self.queue.push_back(req);
        self.kick(ctx);
    }
}

impl Handler<Cancel> for EventActor {
    type Result = ();

    fn handle(&mut self, Cancel(req): Cancel, ctx: &mut Self::Context) {
        if let Err(e) = self.admit() {
            let _ = req.reply.send(Err(e));
            return;
        }
        self.cancels.push(req);
        self.kick(ctx);
    }
}

/// How long tests hold an actor's news of its batch's commit (failpoint `actor-before-outcome`,
/// `return(<ms>)`); never in a build without failpoints.
fn outcome_held() -> Option<Duration> {
    fail::fail_point!("actor-before-outcome", |ms| ms
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis));
    None
}
