//! The registry under real thread concurrency: concurrent first requests for one event find one
//! actor; a retiring actor removes only its own entry.

use std::sync::Arc;
use std::time::Duration;

use actix::Arbiter;
use ticketd::actors::event::EventDeps;
use ticketd::actors::{PersistenceActor, Registry};
use ticketd::coord::{Lease, LocalQueue, Outbox};
use ticketd::store::{self, ReadPool};
use ticketd::Tuning;

#[test]
fn concurrent_first_requests_spawn_one_actor_and_retire_is_generation_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    actix::System::new().block_on(async move {
        let conn = store::open_writer(&path).unwrap();
        let (queue, _lanes) = LocalQueue::new(1, 16, 5);
        let persistence = PersistenceActor::start(conn, 16, 16, Outbox::Local(queue));
        let arbiter = Arbiter::new();
        let deps = EventDeps {
            writer: persistence.writer(),
            reads: ReadPool::open(&path, 1).unwrap(),
            lease: Lease::in_process(Duration::from_secs(1)),
            tuning: Arc::new(Tuning::default()),
        };
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
