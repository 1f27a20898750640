//! Model: the sold-out fast path (`ticketd::slots::SoldOut`). The actor records the committed
//! count and then marks the event sold out; a route that sees the mark answers 409 without asking
//! the actor, so whatever it reads next (the count) must already show the event full.
#![cfg(ticketd_loom)]

use loom::sync::atomic::{AtomicI64, Ordering};
use loom::sync::Arc;
use loom::thread;
use ticketd::slots::SoldOut;

#[test]
fn a_route_that_sees_sold_out_sees_the_full_count() {
    loom::model(|| {
        let flag = Arc::new(SoldOut::new());
        let booked = Arc::new(AtomicI64::new(0));
        let actor = {
            let (flag, booked) = (flag.clone(), booked.clone());
            thread::spawn(move || {
                booked.store(10, Ordering::Relaxed); // the commit the actor learned of
                flag.mark();
            })
        };
        if flag.is_sold_out() {
            assert_eq!(
                booked.load(Ordering::Relaxed),
                10,
                "409 before the count is full"
            );
        }
        actor.join().unwrap();
        assert!(flag.is_sold_out(), "once marked, stays marked");
    });
}
