//! Model: the write hand-off (`ticketd::handoff::WriteQueue`) between producers and the one
//! writer. Every submitted item is handed to the writer exactly once or given back to its
//! producer, also when shutdown (`close`) starts mid-flight. Nothing is lost or doubled.
#![cfg(ticketd_loom)]

use loom::sync::Arc;
use loom::thread;
use ticketd::handoff::{Refused, WriteQueue};

#[test]
fn every_item_is_acknowledged_exactly_once_through_shutdown() {
    loom::model(|| {
        let q = Arc::new(WriteQueue::new(8));
        let producers: Vec<_> = (0..2u32)
            .map(|p| {
                let q = q.clone();
                thread::spawn(move || {
                    // An item refused at the hand-off comes back: its producer answers it.
                    let mut given_back = Vec::new();
                    for i in 0..2u32 {
                        match q.submit(p * 10 + i) {
                            Ok(()) => {}
                            Err(Refused::Closed(x)) | Err(Refused::Full(x)) => given_back.push(x),
                        }
                    }
                    given_back
                })
            })
            .collect();
        let closer = {
            let q = q.clone();
            thread::spawn(move || q.close())
        };
        // The writer: drains groups until closed and empty.
        let mut written = Vec::new();
        while let Some(group) = q.next_group(3) {
            assert!(!group.is_empty() && group.len() <= 3);
            written.extend(group);
        }
        closer.join().unwrap();
        let mut acknowledged = written;
        for p in producers {
            acknowledged.extend(p.join().unwrap());
        }
        acknowledged.sort();
        assert_eq!(acknowledged, vec![0, 1, 10, 11], "each item exactly once");
    });
}

/// The writer sleeps when there is nothing to do, and producers notify it only when it says it
/// sleeps (a notification is a system call the busy writer does not need). No submit may slip
/// between "nothing there" and "asleep" unnoticed: loom reports a deadlock if one can.
#[test]
fn a_sleeping_writer_is_woken_by_every_submit() {
    loom::model(|| {
        let q = Arc::new(WriteQueue::new(8));
        let q2 = q.clone();
        let producer = thread::spawn(move || {
            q2.submit(1).unwrap();
            q2.submit(2).unwrap();
        });
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(q.next_group(8).expect("never closed here"));
        }
        producer.join().unwrap();
        assert_eq!(got, vec![1, 2]);
    });
}

#[test]
fn a_full_queue_gives_items_back_instead_of_growing() {
    loom::model(|| {
        let q = Arc::new(WriteQueue::new(1));
        let q2 = q.clone();
        let t = thread::spawn(move || q2.submit(1).is_ok() as u32 + q2.submit(2).is_ok() as u32);
        let taken = q.next_group(10).unwrap_or_default();
        let accepted = t.join().unwrap();
        q.close();
        let rest = q.next_group(10).unwrap_or_default();
        assert_eq!(taken.len() + rest.len(), accepted as usize);
        assert!(q.next_group(10).is_none());
    });
}
