//! The registry under real thread concurrency: concurrent first requests for one event find one
//! actor; a retiring actor removes only its own entry.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix::Arbiter;
use ticketd::actors::event::EventDeps;
use ticketd::actors::persistence::CreateEvent;
use ticketd::actors::{PersistenceActor, Registry};
use ticketd::coord::{Lease, LocalQueue, Outbox};
use ticketd::store::{self, ReadPool};
use ticketd::Tuning;

/// A writer on a fresh database and what event actors need, with an in-process lease of `ttl`.
fn writer_and_deps(path: &Path, ttl: Duration) -> (PersistenceActor, EventDeps) {
    let conn = store::open_writer(path).unwrap();
    let (queue, _lanes) = LocalQueue::new(1, 16, 5);
    let persistence = PersistenceActor::start(conn, 16, 16, Outbox::Local(queue));
    let deps = EventDeps {
        writer: persistence.writer(),
        reads: ReadPool::open(path, 1).unwrap(),
        lease: Lease::in_process(ttl),
        tuning: Arc::new(Tuning::default()),
    };
    (persistence, deps)
}

#[test]
fn concurrent_first_requests_spawn_one_actor_and_retire_is_generation_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    actix::System::new().block_on(async move {
        let (persistence, deps) = writer_and_deps(&path, Duration::from_secs(1));
        let arbiter = Arbiter::new();
        let registry = Registry::new(deps, vec![arbiter.handle()]);

        for event in 1..=20i64 {
            let barrier = Arc::new(std::sync::Barrier::new(8));
            let generations: Vec<u64> = (0..8)
                .map(|_| {
                    let (r, b) = (registry.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        r.get_or_spawn(event).generation
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            assert!(
                generations.iter().all(|g| *g == generations[0]),
                "one actor for event {event}: {generations:?}"
            );
        }
        assert_eq!(registry.len(), 20);

        let old = registry.get_or_spawn(1).generation;
        registry.retire(1, old + 1_000);
        assert_eq!(
            registry.get_or_spawn(1).generation,
            old,
            "a stranger's retire removes nothing"
        );
        registry.retire(1, old);
        let new = registry.get_or_spawn(1).generation;
        assert_ne!(
            new, old,
            "after its actor retired, the event gets a successor"
        );
        registry.retire(1, old);
        assert_eq!(
            registry.get_or_spawn(1).generation,
            new,
            "a late retire never removes the successor"
        );

        arbiter.stop();
        tokio::task::spawn_blocking(move || persistence.shutdown())
            .await
            .unwrap();
    });
}

/// Event actors live on the HTTP worker that first asked for them, and during a graceful
/// shutdown actix-server stops each worker's arbiter on its own schedule, taking its actors with
/// it. A booking waiting in such an actor's queue (here: for a lease held elsewhere) was never
/// written; it must be re-routed to a live actor and booked, not answered 503.
#[test]
fn a_booking_queued_in_an_actor_whose_arbiter_stops_is_rerouted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    actix::System::new().block_on(async move {
        let (persistence, deps) = writer_and_deps(&path, Duration::from_secs(30));
        let writer = persistence.writer();
        let lease = deps.lease.clone();
        // No arbiters given: actors start on the arbiter of whoever asks first, as in the server.
        let registry = Registry::new(deps, Vec::new());
        let event = writer
            .create_event(CreateEvent {
                title: "Rerouted".into(),
                capacity: 10,
                max_per_user: None,
                key: None,
            })
            .await
            .unwrap()
            .unwrap()
            .id;
        let stranger = 999_999;
        let token = lease.acquire_now(event, stranger, 0).flatten().expect("lease");

        let worker = Arbiter::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let r = registry.clone();
        worker.spawn(async move {
            let _ = tx.send(r.get_or_spawn(event).generation);
        });
        let first = rx.await.unwrap();
        let r = registry.clone();
        let booking = actix::spawn(async move {
            r.book(event, 7, 2, None).await
        });
        // The booking reaches the actor on `worker` and waits in its queue for the lease.
        tokio::time::sleep(Duration::from_millis(200)).await;
        worker.stop();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(lease.release_now(event, stranger, token));

        let booked = booking.await.unwrap().expect("booked after the re-route, not refused");
        assert_eq!((booked.event_id, booked.quantity), (event, 2));
        assert_ne!(
            registry.get_or_spawn(event).generation,
            first,
            "served by a successor"
        );
        tokio::task::spawn_blocking(move || persistence.shutdown())
            .await
            .unwrap();
        let db = rusqlite::Connection::open(&path).unwrap();
        let (rows, booked): (i64, i64) = db
            .query_row(
                "SELECT (SELECT COUNT(*) FROM bookings), (SELECT booked_count FROM events WHERE id = ?1)",
                [event],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((rows, booked), (1, 2), "booked once");
    });
}
