//! Model: the in-process lease table (`ticketd::coord::LeaseTable`): at most one live holder,
//! tokens strictly increasing, and a holder whose lease was taken over cannot release the new one.
#![cfg(ticketd_loom)]

use loom::sync::Arc;
use loom::thread;
use ticketd::coord::LeaseTable;

#[test]
fn at_most_one_holder_and_increasing_tokens() {
    loom::model(|| {
        let t = Arc::new(LeaseTable::new());
        let handles: Vec<_> = (1..=2u64)
            .map(|owner| {
                let t = t.clone();
                thread::spawn(move || {
                    let got = t.acquire(7, owner, 0, 0, 100);
                    if let Some(token) = got {
                        // While we hold it, nobody else does.
                        assert_eq!(t.holder(7, 1), Some(owner));
                        assert!(t.release(7, owner, token));
                    }
                    got
                })
            })
            .collect();
        let tokens: Vec<i64> = handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect();
        assert!(!tokens.is_empty());
        if tokens.len() == 2 {
            assert_ne!(tokens[0], tokens[1], "two holders never share a token");
        }
    });
}

#[test]
fn an_expired_holder_is_fenced_out() {
    loom::model(|| {
        let t = Arc::new(LeaseTable::new());
        let old = t.acquire(1, 1, 0, 0, 10).unwrap();
        let t2 = t.clone();
        // Owner 2 takes over after owner 1's lease expired (time 50 > 0 + 10)...
        let taker = thread::spawn(move || t2.acquire(1, 2, 0, 50, 10));
        // ...while owner 1, waking up late, tries to give "its" lease back.
        let _ = t.release(1, 1, old);
        let new = taker.join().unwrap().expect("expired lease can be taken");
        assert!(new > old, "tokens strictly increase");
        // Whichever came first, the late release never removes the new holder.
        assert_eq!(t.holder(1, 51), Some(2));
    });
}
