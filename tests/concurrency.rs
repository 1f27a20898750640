//! Races with real concurrency: many clients at once on one event, over HTTP, and the database
//! agreeing with what the clients were told.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{booking_sums, event_counts, Resp, Sql, Target, TestApp};
use futures::future::join_all;
use serde_json::json;

/// Fires `bodies` at `/book` all at once; returns every response.
async fn burst(app: &Arc<TestApp>, bodies: Vec<serde_json::Value>) -> Vec<Resp> {
    let tasks = bodies.into_iter().map(|b| {
        let app = app.clone();
        tokio::spawn(async move { app.post("/book", b).await })
    });
    join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect()
}

fn statuses(rs: &[Resp]) -> (usize, usize, usize) {
    let ok = rs.iter().filter(|r| r.status == 200).count();
    let conflict = rs.iter().filter(|r| r.status == 409).count();
    (ok, conflict, rs.len() - ok - conflict)
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn four_hundred_clients_on_a_hundred_seats() {
        let app = Arc::new(TestApp::spawn());
        let id = app.create_event("Flash", 100).await;
        let rs = burst(
            &app,
            (1..=400)
                .map(|u| json!({"user_id": u, "event_id": id}))
                .collect(),
        )
        .await;
        assert_eq!(
            statuses(&rs),
            (100, 300, 0),
            "{:?}",
            rs.iter().find(|r| r.status != 200 && r.status != 409)
        );
        for r in rs.iter().filter(|r| r.status == 409) {
            assert_eq!(r.body, json!({"detail": "Event is sold out."}));
        }
        let mut ids: Vec<i64> = rs
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.body["id"].as_i64().unwrap())
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 100, "every acknowledged booking has its own id");

        let db = app.db();
        assert_eq!(event_counts(&db, id).0, 100);
        assert_eq!(booking_sums(&db, id), (100, 100));
        for bid in ids {
            let n = db.ints(
                "SELECT COUNT(*) FROM bookings WHERE id = $1 AND event_id = $2",
                &[bid.into(), id.into()],
            )[0];
            assert_eq!(n, 1, "acknowledged booking {bid} is in the database");
        }
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn ten_clients_one_seat() {
        let app = Arc::new(TestApp::spawn());
        for round in 0..5 {
            let id = app.create_event(&format!("Last seat {round}"), 1).await;
            let rs = burst(
                &app,
                (1..=10)
                    .map(|u| json!({"user_id": u, "event_id": id}))
                    .collect(),
            )
            .await;
            assert_eq!(statuses(&rs), (1, 9, 0));
            assert_eq!(booking_sums(&app.db(), id), (1, 1));
        }
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn mixed_quantities_never_exceed_capacity() {
        let app = Arc::new(TestApp::spawn());
        let id = app.create_event("Mixed", 50).await;
        let bodies: Vec<_> = (0..200)
            .map(|i| json!({"user_id": i + 1, "event_id": id, "quantity": 1 + (i * 7) % 5}))
            .collect();
        let rs = burst(&app, bodies.clone()).await;
        let (_, _, other) = statuses(&rs);
        assert_eq!(other, 0);
        let sold: i64 = rs
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.body["quantity"].as_i64().unwrap())
            .sum();
        let (booked, capacity, _) = event_counts(&app.db(), id);
        assert!(sold <= capacity);
        assert_eq!(
            booked, sold,
            "the database holds exactly what was acknowledged"
        );
        assert_eq!(booking_sums(&app.db(), id).0, sold);
        // Every refusal was right: the seats left at the end are fewer than any refused quantity.
        let left = capacity - booked;
        for (r, b) in rs.iter().zip(&bodies) {
            if r.status == 409 {
                assert!(
                    b["quantity"].as_i64().unwrap() > left,
                    "refused {b} while {left} seats are left"
                );
            }
        }
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_events_at_once_stay_independent() {
        let app = Arc::new(TestApp::spawn());
        let mut events = Vec::new();
        for i in 0..20 {
            events.push(app.create_event(&format!("E{i}"), 5).await);
        }
        let bodies: Vec<_> = (0..400)
            .map(|i| json!({"user_id": i + 1, "event_id": events[i % 20]}))
            .collect();
        let rs = burst(&app, bodies).await;
        assert_eq!(statuses(&rs), (100, 300, 0));
        let db = app.db();
        for id in events {
            assert_eq!(event_counts(&db, id).0, 5);
            assert_eq!(booking_sums(&db, id), (5, 5));
        }
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn overload_is_answered_at_once_with_retry_after() {
        // A tiny queue per event: most of a burst must be turned away with 503, never queued.
        let app = Arc::new(TestApp::spawn_with(|_, t| {
            t.event_queue_limit = 1;
            t.max_batch = 1;
        }));
        let id = app.create_event("Hot", 10_000).await;
        let rs = burst(
            &app,
            (1..=300)
                .map(|u| json!({"user_id": u, "event_id": id}))
                .collect(),
        )
        .await;
        let ok = rs.iter().filter(|r| r.status == 200).count();
        let busy: Vec<_> = rs.iter().filter(|r| r.status == 503).collect();
        assert_eq!(ok + busy.len(), rs.len(), "only 200 or 503");
        assert!(
            !busy.is_empty(),
            "a queue of one cannot hold a burst of 300"
        );
        for r in &busy {
            assert_eq!(r.retry_after.as_deref(), Some("1"));
            assert!(r.body["detail"].is_string());
        }
        assert_eq!(
            booking_sums(&app.db(), id),
            (ok as i64, ok as i64),
            "503s wrote nothing"
        );
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn idle_actors_passivate_and_come_back() {
        let app = Arc::new(TestApp::spawn_with(|_, t| {
            t.actor_idle = Duration::from_millis(100)
        }));
        let id = app.create_event("Sleepy", 1000).await;
        let mut acknowledged = 0;
        for round in 0..6 {
            // Bursts separated by pauses around the idle timeout: some land while an actor is
            // stopping, and must be re-routed to its successor, never lost or refused.
            let rs = burst(
                &app,
                (1..=30)
                    .map(|u| json!({"user_id": u, "event_id": id}))
                    .collect(),
            )
            .await;
            assert_eq!(statuses(&rs), (30, 0, 0), "round {round}");
            acknowledged += 30;
            tokio::time::sleep(Duration::from_millis(60 + 40 * (round % 3))).await;
        }
        let mut actors = None;
        for _ in 0..100 {
            actors = app.get("/ready").await.body["event_actors"].as_u64();
            if actors == Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(actors, Some(0), "idle actors leave the registry");
        assert_eq!(booking_sums(&app.db(), id), (acknowledged, acknowledged));
        let r = app
            .post("/book", json!({"user_id": 1, "event_id": id}))
            .await;
        assert_eq!(r.status, 200, "a new actor serves after passivation");
    }
}

both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_burst_for_an_unknown_event_is_all_404_and_the_event_can_appear_later() {
        let app = Arc::new(TestApp::spawn());
        let rs = burst(
            &app,
            (1..=200)
                .map(|u| json!({"user_id": u, "event_id": 1}))
                .collect(),
        )
        .await;
        for r in &rs {
            assert_eq!(
                (r.status.as_u16(), &r.body),
                (404, &json!({"detail": "Event not found"}))
            );
        }
        // Event 1 is created only now; its id was asked for before it existed.
        assert_eq!(app.create_event("Late", 5).await, 1);
        let rs = burst(
            &app,
            (1..=10)
                .map(|u| json!({"user_id": u, "event_id": 1}))
                .collect(),
        )
        .await;
        assert_eq!(statuses(&rs), (5, 5, 0));
    }
}
