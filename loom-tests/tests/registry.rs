//! Model: the registry's slots (`ticketd::slots::Slots`). Two first requests for one event and
//! the exit of the event's idle actor, all at once: exactly one live actor is reachable per
//! event, both requests that created or found a new one found the same one, and the exiting
//! actor never removes its successor.
#![cfg(ticketd_loom)]

use loom::sync::Arc;
use loom::thread;
use ticketd::slots::Slots;

#[test]
fn first_requests_and_an_idle_exit_race() {
    loom::model(|| {
        let slots: Arc<Slots<u32>> = Arc::new(Slots::new());
        // The event's current actor, about to passivate.
        let old = slots.get_or_create(7, |_| 0).generation;

        let requests: Vec<_> = (1..=2u32)
            .map(|who| {
                let s = slots.clone();
                thread::spawn(move || s.get_or_create(7, |_| who))
            })
            .collect();
        // The exiting actor leaves the registry twice, as the real one does: when it decides to
        // passivate (`retire`) and again from `stopped` — by then a successor may be in place.
        let exiting = {
            let s = slots.clone();
            thread::spawn(move || {
                s.remove_if_generation(7, old);
                s.remove_if_generation(7, old);
            })
        };
        let found: Vec<_> = requests.into_iter().map(|t| t.join().unwrap()).collect();
        exiting.join().unwrap();

        let successors: Vec<_> = found.iter().filter(|s| s.generation != old).collect();
        if let Some(first) = successors.first() {
            assert!(
                successors.iter().all(|s| *s == *first),
                "two successors spawned: {found:?}"
            );
            assert_eq!(
                slots.get(7).as_ref(),
                Some(*first),
                "the exiting actor removed its successor"
            );
        }
        assert!(slots.len() <= 1);
        // Whatever happened, the event is reachable again through one live slot.
        let now = slots.get_or_create(7, |_| 99);
        assert_eq!(slots.get(7), Some(now));
    });
}

#[test]
fn two_first_requests_for_a_new_event_create_one_actor() {
    loom::model(|| {
        let slots: Arc<Slots<u32>> = Arc::new(Slots::new());
        let t: Vec<_> = (1..=2u32)
            .map(|who| {
                let s = slots.clone();
                thread::spawn(move || s.get_or_create(1, |_| who))
            })
            .collect();
        let got: Vec<_> = t.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(got[0], got[1], "both requests reach the same actor");
        assert_eq!(slots.len(), 1);
    });
}
