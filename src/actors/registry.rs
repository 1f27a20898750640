//! The registry: finds or spawns the one event actor of an event.
//!
//! `get_or_spawn` decides under the DashMap shard lock (the entry API), so two first requests for
//! a new event can never create two actors. Every actor carries a generation number; an actor
//! that stops removes its entry only if the entry still carries its generation, so an exiting
//! actor never removes a successor that replaced it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use actix::dev::SendError;
use actix::prelude::*;
use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use tokio::sync::oneshot;

use super::event::{Book, EventActor, EventDeps};
use super::persistence::{BookError, Booked, SeatRequest};
use crate::domain::NewBooking;

/// Times a booking is re-routed when its actor stopped before reading it.
const MAX_REROUTES: usize = 4;

/// What the registry knows of a live event actor.
#[derive(Clone)]
pub struct Entry {
    pub generation: u64,
    pub addr: Addr<EventActor>,
    /// Set by the actor once the event is sold out: routes answer 409 without a message.
    pub sold_out: Arc<AtomicBool>,
}

pub struct Registry {
    map: DashMap<i64, Entry>,
    next_generation: AtomicU64,
    deps: EventDeps,
    arbiters: Vec<ArbiterHandle>,
}

impl Registry {
    /// A registry spawning actors round the given arbiters (by event id).
    pub fn new(deps: EventDeps, arbiters: Vec<ArbiterHandle>) -> Arc<Self> {
        Arc::new(Registry {
            map: DashMap::new(),
            next_generation: AtomicU64::new(1),
            deps,
            arbiters,
        })
    }

    /// The live actor of `event_id`, spawned if there is none.
    pub fn get_or_spawn(self: &Arc<Self>, event_id: i64) -> Entry {
        if let Some(e) = self.map.get(&event_id) {
            return e.clone();
        }
        match self.map.entry(event_id) {
            MapEntry::Occupied(e) => e.get().clone(),
            MapEntry::Vacant(v) => {
                let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                let sold_out = Arc::new(AtomicBool::new(false));
                let (weak, deps, flag) =
                    (Arc::downgrade(self), self.deps.clone(), sold_out.clone());
                let cap = self.deps.tuning.event_queue_limit;
                let make = move |ctx: &mut Context<EventActor>| {
                    ctx.set_mailbox_capacity(cap);
                    EventActor::new(event_id, generation, weak, deps, flag)
                };
                let addr = if self.arbiters.is_empty() {
                    EventActor::create(make)
                } else {
                    let i = (event_id.unsigned_abs() % self.arbiters.len() as u64) as usize;
                    EventActor::start_in_arbiter(&self.arbiters[i], make)
                };
                v.insert(Entry {
                    generation,
                    addr,
                    sold_out,
                })
                .clone()
            }
        }
    }

    /// Removes the entry of `event_id` if it still belongs to actor `generation`.
    pub fn retire(&self, event_id: i64, generation: u64) {
        self.map
            .remove_if(&event_id, |_, e| e.generation == generation);
    }

    /// Live event actors.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Books through the event's actor. A request its actor never read (the actor passivated
    /// between lookup and delivery) is provably unwritten and is routed again to a fresh actor.
    pub async fn book(self: &Arc<Self>, nb: NewBooking) -> Result<Booked, BookError> {
        let event_id = nb.event_id.0;
        for _ in 0..MAX_REROUTES {
            let entry = self.get_or_spawn(event_id);
            if entry.sold_out.load(Ordering::Acquire) {
                return Err(BookError::SoldOut { remaining: 0 });
            }
            let (reply, rx) = oneshot::channel();
            let req = SeatRequest {
                user_id: nb.user_id,
                quantity: nb.quantity,
                reply,
            };
            match entry.addr.try_send(Book(req)) {
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
