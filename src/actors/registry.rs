//! The registry: finds or spawns the one event actor of an event.
//!
//! The bookkeeping is `crate::slots::Slots` (a DashMap keyed by event id): `get_or_spawn` decides
//! under the key's lock, so two first requests for a new event can never create two actors.
//! Every actor carries a generation number; an actor that stops removes its entry only if the
//! entry still carries its generation, so an exiting actor never removes a successor that
//! replaced it. `loom-tests` checks both against every interleaving.

use std::sync::Arc;

use actix::dev::SendError;
use actix::prelude::*;
use tokio::sync::oneshot;

use super::event::{Book, Cancel, EventActor, EventDeps, LeaseFree};
use crate::domain::{BookError, Booked, Booking, CancelRequest, IdempotencyKey, SeatRequest};
use crate::slots::{Slots, SoldOut};

/// Times a booking is re-routed when its actor stopped before writing it. Each re-route needs an
/// actor that died; actors live on the HTTP workers, which stop one after another in a graceful
/// shutdown, so a booking may meet a few.
const MAX_REROUTES: usize = 8;

/// What the registry knows of a live event actor.
#[derive(Clone)]
pub struct Entry {
    pub generation: u64,
    pub addr: Addr<EventActor>,
    /// Set by the actor once the event is sold out: routes answer 409 without a message.
    pub sold_out: Arc<SoldOut>,
}

/// The live actor's address and flag, as kept in the slots.
#[derive(Clone)]
struct Live {
    addr: Addr<EventActor>,
    sold_out: Arc<SoldOut>,
}

pub struct Registry {
    slots: Slots<Live>,
    deps: EventDeps,
    arbiters: Vec<ArbiterHandle>,
}

impl Registry {
    /// A registry spawning actors round the given arbiters (by event id), or, with none given,
    /// on the arbiter of the caller: in the server that is the HTTP worker which received the
    /// event's first request. ticketd runs that way: a booking then crosses no thread on its way
    /// to an actor on its own worker, and no extra threads compete with the workers for the
    /// cores (measured: cross-thread wake-ups were the largest cost after SQLite's).
    pub fn new(deps: EventDeps, arbiters: Vec<ArbiterHandle>) -> Arc<Self> {
        Arc::new(Registry {
            slots: Slots::new(),
            deps,
            arbiters,
        })
    }

    /// The live actor of `event_id`, spawned if there is none.
    pub fn get_or_spawn(self: &Arc<Self>, event_id: i64) -> Entry {
        let slot = self.slots.get_or_create(event_id, |generation| {
            let sold_out = Arc::new(SoldOut::new());
            let (weak, deps, flag) = (Arc::downgrade(self), self.deps.clone(), sold_out.clone());
            let cap = self.deps.tuning.event_queue_limit;
            let make = move |ctx: &mut Context<EventActor>| {
                ctx.set_mailbox_capacity(cap);
                EventActor::new(event_id, generation, weak, deps, flag)
            };
            crate::metrics::handles().actors_started.increment(1);
            let addr = if self.arbiters.is_empty() {
                EventActor::create(make)
            } else {
                let i = (event_id.unsigned_abs() % self.arbiters.len() as u64) as usize;
                EventActor::start_in_arbiter(&self.arbiters[i], make)
            };
            Live { addr, sold_out }
        });
        Entry {
            generation: slot.generation,
            addr: slot.value.addr,
            sold_out: slot.value.sold_out,
        }
    }

    /// Removes the entry of `event_id` if it still belongs to actor `generation`.
    pub fn retire(&self, event_id: i64, generation: u64) {
        self.slots.remove_if_generation(event_id, generation);
    }

    /// Tells the live actor of `event_id`, if any, that its lease is free (cluster mode).
    pub fn lease_free(&self, event_id: i64) {
        if let Some(slot) = self.slots.get(event_id) {
            let _ = slot.value.addr.try_send(LeaseFree);
        }
    }

    /// Another replica gave seats of `event_id` back: let requests through to the actor again
    /// (it reads the row before refusing anyone on a view it has not confirmed).
    pub fn seats_returned(&self, event_id: i64) {
        if let Some(slot) = self.slots.get(event_id) {
            slot.value.sold_out.clear();
        }
    }

    /// Live event actors.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Books through the event's actor; a sold-out event is refused here, without a message.
    /// Every booking's verdict passes here, wherever it was decided (the fast path, the actor's
    /// view, the store, a full queue), so refusals are counted here, once each.
    pub async fn book(
        self: &Arc<Self>,
        event_id: i64,
        user_id: i64,
        quantity: i64,
        key: Option<Arc<IdempotencyKey>>,
    ) -> Result<Booked, BookError> {
        let result = self
            .deliver(event_id, true, |reply| {
                Book(SeatRequest {
                    user_id,
                    quantity,
                    key: key.clone(),
                    reply,
                })
            })
            .await;
        if let Err(e) = &result {
            count_refusal(e);
        }
        result
    }

    /// Cancels through the event's actor, so the seats return under its lease and fence.
    pub async fn cancel(
        self: &Arc<Self>,
        event_id: i64,
        booking_id: i64,
    ) -> Result<Booking, BookError> {
        self.deliver(event_id, false, |reply| {
            Cancel(CancelRequest { booking_id, reply })
        })
        .await
    }

    /// Delivers a request to the event's actor and awaits its answer. A request its actor never
    /// read (the actor passivated between lookup and delivery, or its worker stopped) is
    /// provably unwritten and is routed again to a fresh actor.
    async fn deliver<T, M>(
        self: &Arc<Self>,
        event_id: i64,
        refuse_if_sold_out: bool,
        make: impl Fn(oneshot::Sender<Result<T, BookError>>) -> M,
    ) -> Result<T, BookError>
    where
        M: Message<Result = ()> + Send + 'static,
        EventActor: Handler<M>,
    {
        for _ in 0..MAX_REROUTES {
            let entry = self.get_or_spawn(event_id);
            if refuse_if_sold_out && entry.sold_out.is_sold_out() {
                return Err(BookError::SoldOut { remaining: 0 });
            }
            let (reply, rx) = oneshot::channel();
            match entry.addr.try_send(make(reply)) {
                Ok(()) => match rx.await {
                    Ok(result) => return result,
                    // Dropped unanswered: only ever before the request reached a batch.
                    Err(_) => continue,
                },
                Err(SendError::Full(_)) => return Err(BookError::Overloaded),
                Err(SendError::Closed(_)) => self.retire(event_id, entry.generation),
            }
        }
        Err(BookError::Unavailable(
            "the event actor is restarting; retry".into(),
        ))
    }
}

/// Counts a refused booking by its reason (`ticketd_booking_refusals_total`). A used idempotency
/// key is no refusal: the route answers it with the booking the key names.
fn count_refusal(e: &BookError) {
    let m = crate::metrics::handles();
    let counter = match e {
        BookError::SoldOut { .. } => &m.refused_sold_out,
        BookError::LimitReached { .. } => &m.refused_limit,
        BookError::Overloaded => &m.refused_overloaded,
        BookError::Unavailable(_) | BookError::OutcomeUnknown(_) => &m.refused_unavailable,
        BookError::EventNotFound => &m.refused_unknown_event,
        BookError::BookingNotFound | BookError::KeyUsed { .. } => return,
    };
    counter.increment(1);
}
