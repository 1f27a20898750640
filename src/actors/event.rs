//! The event actor: one per event per replica, the only place that allocates its seats.
//!
//! Requests queue in the actor; whenever it is not busy it takes the lease (one round trip),
//! allocates a whole batch in memory, hands the batch to the persistence actor and waits for the
//! commit, while the next batch piles up behind it. So one event sells at the rate of group
//! commits times batch size, not one lock round trip per booking (what pretix gave up on).
//!
//! The in-memory view (capacity, booked) is loaded once, then kept exact by every commit (the
//! store returns the count after the update). Another replica may have sold seats while it held
//! the lease; since seats are only ever taken, such a view can only promise seats that went,
//! never hide seats that are there. So a batch under a new lease goes ahead on the view, and the
//! fenced update judges it against the row: a refusal brings the row back and the batch is
//! allocated again from it. That saves a database read per lease hand-over (every batch, on a
//! hot event shared by replicas) and costs one extra round only when the view was wrong.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::persistence::{BatchOutcome, BookError, SeatBatch, SeatRequest, WriteOp, Writer};
use super::registry::Registry;
use crate::config::Tuning;
use crate::coord::lease::{Lease, LeaseError, Token};
use crate::slots::SoldOut;
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

/// The seats of an event as the actor sees them, and the allocation rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub capacity: i64,
    /// Seats committed.
    pub booked: i64,
}

impl View {
    /// Allocation rule, first come first served: a request takes its seats if they are all
    /// still there after the ones already taken in this batch (`taken`); otherwise it is refused
    /// with the number left, and a later, smaller request may still fit. No partial fills.
    pub fn allocate(&self, taken: &mut i64, quantity: i64) -> Result<(), i64> {
        let remaining = self.capacity - self.booked - *taken;
        if quantity >= 1 && quantity <= remaining {
            *taken += quantity;
            Ok(())
        } else {
            Err(remaining.max(0))
        }
    }

    pub fn sold_out(&self) -> bool {
        self.booked >= self.capacity
    }
}

pub struct EventActor {
    id: i64,
    generation: u64,
    registry: Weak<Registry>,
    deps: EventDeps,
    sold_out: Arc<SoldOut>,
    view: Option<View>,
    /// The highest fence the database has shown us for this event.
    floor: Token,
    queue: VecDeque<SeatRequest>,
    /// A lease request, a reload or a batch is under way.
    busy: bool,
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
            floor: 0,
            queue: VecDeque::new(),
            busy: false,
            held: None,
            refusals: 0,
            idle_since: Instant::now(),
        }
    }

    fn fail_queue(&mut self, err: BookError) {
        for r in self.queue.drain(..) {
            let _ = r.reply.send(Err(err.clone()));
        }
    }

    /// Starts the next round (lease, maybe reload, batch) if there is work and none under way.
    fn kick(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.queue.is_empty() {
            return;
        }
        self.busy = true;
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
        match res {
            Err(e) => {
                warn!(event_id = self.id, error = %e, "no lease: answering 503");
                self.busy = false;
                self.fail_queue(BookError::Unavailable(e.to_string()));
            }
            Ok(None) => {
                self.busy = false;
                ctx.run_later(LEASE_RETRY, |act, ctx| act.kick(ctx));
            }
            Ok(Some(token)) => {
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
        let id = self.id;
        let fut = self.deps.reads.read(move |c| queries::event(c, id));
        ctx.spawn(
            fut.into_actor(self)
                .map(|res, act, ctx| act.on_reload(res, ctx)),
        );
    }

    fn on_reload(&mut self, res: Result<Option<EventRow>, StoreError>, ctx: &mut Context<Self>) {
        match res {
            Ok(Some(row)) => {
                self.adopt(&row);
                self.run_batch(ctx);
            }
            Ok(None) => {
                self.fail_queue(BookError::EventNotFound);
                self.view = None;
                self.finish(ctx);
                // No such event (yet: ids are handed out later). Stay a moment to answer a
                // burst for it, then leave: unknown ids must not pile up actors.
                ctx.run_later(MISSING_LINGER, |act, ctx| {
                    if act.view.is_none() && !act.busy && act.queue.is_empty() {
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

    fn adopt(&mut self, row: &EventRow) {
        self.view = Some(View {
            capacity: row.capacity,
            booked: row.booked_count,
        });
        self.floor = self.floor.max(row.fence);
        if row.booked_count >= row.capacity {
            self.sold_out.mark();
        }
    }

    /// Allocates up to `max_batch` queued requests in memory and hands them to the writer.
    fn run_batch(&mut self, ctx: &mut Context<Self>) {
        let (Some(view), Some(token)) = (self.view, self.held) else {
            self.finish(ctx);
            return;
        };
        let mut requests = Vec::new();
        let mut seats = 0;
        while requests.len() < self.deps.tuning.max_batch {
            let Some(req) = self.queue.pop_front() else {
                break;
            };
            if req.reply.is_closed() {
                continue; // the client went away before we sold it anything
            }
            match view.allocate(&mut seats, req.quantity) {
                Ok(()) => requests.push(req),
                Err(remaining) => {
                    let _ = req.reply.send(Err(BookError::SoldOut { remaining }));
                }
            }
        }
        if requests.is_empty() {
            self.finish(ctx);
            return;
        }
        debug!(
            event_id = self.id,
            size = requests.len(),
            seats,
            token,
            "batch to the writer"
        );
        let (done, rx) = oneshot::channel();
        self.deps.writer.submit(WriteOp::Seats(SeatBatch {
            event_id: self.id,
            token,
            requests,
            done,
        }));
        ctx.spawn(
            async move { rx.await }
                .into_actor(self)
                .map(move |res, act, ctx| match res {
                    Ok(outcome) => act.on_batch(outcome, token, ctx),
                    Err(_) => act.finish(ctx),
                }),
        );
    }

    fn on_batch(&mut self, outcome: BatchOutcome, token: Token, ctx: &mut Context<Self>) {
        match outcome {
            BatchOutcome::Committed { seats, booked } => {
                if let Some(v) = self.view.as_mut() {
                    // The count after our update: exact even if an older holder wrote just before.
                    debug_assert!(booked >= v.booked + seats);
                    v.booked = booked;
                }
                self.floor = self.floor.max(token);
                self.refusals = 0;
                self.finish(ctx);
            }
            BatchOutcome::Failed => self.finish(ctx),
            BatchOutcome::Refused { row, requests } => {
                self.refusals += 1;
                for r in requests.into_iter().rev() {
                    self.queue.push_front(r);
                }
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
                    self.busy = false;
                    self.kick(ctx);
                } else {
                    // Our token is still the newest; the row read inside the refused transaction
                    // is exact, so allocate again from it.
                    self.run_batch(ctx);
                }
            }
        }
    }

    /// The round is over: give the lease back if there is nothing left to do, else go again.
    fn finish(&mut self, ctx: &mut Context<Self>) {
        self.busy = false;
        self.idle_since = Instant::now();
        if self.view.is_some_and(|v| v.sold_out()) {
            self.sold_out.mark();
        }
        if self.queue.is_empty() {
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
        if !self.busy
            && self.queue.is_empty()
            && self.idle_since.elapsed() >= self.deps.tuning.actor_idle
        {
            debug!(event_id = self.id, "idle: passivating");
            self.release_lease(ctx);
            self.retire(ctx);
        }
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
        if self.queue.len() >= self.deps.tuning.event_queue_limit {
            let _ = req.reply.send(Err(BookError::Overloaded));
            return;
        }
        self.queue.push_back(req);
        self.idle_since = Instant::now();
        self.kick(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::View;

    #[test]
    fn allocation_is_first_come_first_served_without_partial_fills() {
        let v = View {
            capacity: 10,
            booked: 4,
        };
        let mut taken = 0;
        assert_eq!(v.allocate(&mut taken, 3), Ok(()));
        assert_eq!(
            v.allocate(&mut taken, 4),
            Err(3),
            "only 3 left: refused whole"
        );
        assert_eq!(
            v.allocate(&mut taken, 2),
            Ok(()),
            "a smaller later request still fits"
        );
        assert_eq!(v.allocate(&mut taken, 1), Ok(()));
        assert_eq!(taken, 6);
        assert_eq!(v.allocate(&mut taken, 1), Err(0));
        assert_eq!(
            v.allocate(&mut taken, 0),
            Err(0),
            "never a zero or negative quantity"
        );
        assert_eq!(v.allocate(&mut taken, -5), Err(0));
    }

    #[test]
    fn sold_out_and_corrupt_views_refuse_everything() {
        assert!(View {
            capacity: 5,
            booked: 5
        }
        .sold_out());
        let over = View {
            capacity: 5,
            booked: 7,
        };
        assert!(over.sold_out());
        assert_eq!(over.allocate(&mut 0, 1), Err(0));
        assert!(!View {
            capacity: 5,
            booked: 4
        }
        .sold_out());
    }
}
