//! `GET /metrics`: the counters move by exactly what happened, the route label is the pattern
//! (never the raw path), and the organizer token guards it when set.
//!
//! Each test runs the real binary as a child process: the metrics recorder is one per process,
//! so a child of its own is the only way to read exact numbers (in-process apps of other tests
//! would count into the same series).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::cluster::{replicas, RedisProc};
use common::{Proc, Target};
use serde_json::json;

const ORGANIZER: &str = "organizer-token-0123456789";

/// One scrape: every sample line, `name{labels}` -> value.
#[derive(Debug)]
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut samples = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("a sample line: {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("a number: {line:?}"));
            samples.insert(series.to_string(), value);
        }
        Scrape(samples)
    }

    /// The value of one series (0 when absent: a counter never touched).
    fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// Series whose text contains `needle`.
    fn matching(&self, needle: &str) -> Vec<&String> {
        self.0.keys().filter(|k| k.contains(needle)).collect()
    }
}

async fn scrape(target: &impl Target) -> Scrape {
    let url = format!("{}/metrics", target.base());
    let r = common::send(target.as_organizer(target.http().get(url))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        r.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        r.content_type
    );
    Scrape::parse(r.body.as_str().expect("the text format, not JSON"))
}

fn http(route: &str, method: &str, status: u16) -> String {
    format!(
        "ticketd_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}}"
    )
}

fn refusals(reason: &str) -> String {
    format!("ticketd_booking_refusals_total{{reason=\"{reason}\"}}")
}

async fn book(p: &Proc, event_id: i64, user_id: i64, quantity: i64) -> common::Resp {
    p.post(
        "/book",
        json!({"user_id": user_id, "event_id": event_id, "quantity": quantity}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_exactly_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(&dir.path().join("t.db"), &[("FINALIZE_DELAY_MS", "0")]).await;
    let three = p.create_event("Three seats", 3).await;
    let r = p
        .post(
            "/event",
            json!({"title": "One each", "capacity": 10, "max_per_user": 1}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let limited = r.body["id"].as_i64().unwrap();
    let before = scrape(&p).await;

    // Three bookings (4 seats) committed; a sold-out, a limit and an unknown-event refusal.
    let mut secrets = Vec::new();
    for (event, user, quantity) in [(three, 1, 1), (three, 2, 2), (limited, 5, 1)] {
        let r = book(&p, event, user, quantity).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        secrets.push((
            r.body["id"].as_i64().unwrap(),
            r.body["secret"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(book(&p, three, 3, 1).await.status, 409, "sold out");
    assert_eq!(book(&p, limited, 5, 1).await.status, 409, "limit");
    assert_eq!(book(&p, 999_999, 1, 1).await.status, 404, "no such event");
    // Every ticket issued before the cancellation, so that the issued count is exact.
    for (id, secret) in &secrets {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while p.get_booking(*id, secret).await.body["status"] != "FINALIZED" {
            assert!(std::time::Instant::now() < deadline, "booking {id} issued");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // One cancellation, sent twice: counted once. A 404 on a routed path and on an unknown one.
    let (id, secret) = &secrets[1];
    for _ in 0..2 {
        let r = common::send(
            p.client
                .post(format!("{}/book/{id}/cancel", p.base()))
                .header("x-booking-secret", secret),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(p.get("/book/987654").await.status, 404);
    assert_eq!(p.get("/no/such/path/123").await.status, 404);
    let after = scrape(&p).await;

    let delta = |series: &str| after.get(series) - before.get(series);
    assert_eq!(delta("ticketd_bookings_committed_total"), 3.0);
    assert_eq!(delta("ticketd_seats_sold_total"), 4.0);
    assert_eq!(delta("ticketd_cancellations_total"), 1.0);
    assert_eq!(delta("ticketd_seats_returned_total"), 2.0);
    assert_eq!(delta(&refusals("sold_out")), 1.0);
    assert_eq!(delta(&refusals("limit")), 1.0);
    assert_eq!(delta(&refusals("unknown_event")), 1.0);
    assert_eq!(delta(&refusals("overloaded")), 0.0);
    assert_eq!(delta(&refusals("unavailable")), 0.0);
    assert_eq!(delta("ticketd_tickets_issued_total"), 3.0);
    assert_eq!(delta("ticketd_finalize_dead_lettered_total"), 0.0);

    // Requests by route pattern, method and status; the latency histogram counts the same.
    assert_eq!(delta(&http("/book", "POST", 200)), 3.0);
    assert_eq!(delta(&http("/book", "POST", 409)), 2.0);
    assert_eq!(delta(&http("/book", "POST", 404)), 1.0);
    assert_eq!(delta(&http("/book/{id}/cancel", "POST", 200)), 2.0);
    assert_eq!(delta(&http("/book/{id}", "GET", 404)), 1.0);
    assert_eq!(delta(&http("unmatched", "GET", 404)), 1.0);
    assert_eq!(
        delta("ticketd_http_request_duration_seconds_count{route=\"/book\",method=\"POST\"}"),
        6.0
    );
    assert!(
        after.get("ticketd_http_request_duration_seconds_sum{route=\"/book\",method=\"POST\"}")
            > 0.0
    );
    // Never one series per id or per unknown path.
    for raw in ["/book/987654", "/no/such", &format!("/book/{id}/cancel")] {
        assert!(
            after.matching(&format!("route=\"{raw}")).is_empty(),
            "{raw}: {:?}",
            after.matching(raw)
        );
    }

    // The writer and the lease moved; the gauges read the state.
    assert!(delta("ticketd_group_commit_ops_count") >= 1.0);
    assert!(delta("ticketd_group_commit_duration_seconds_count") >= 1.0);
    assert!(delta("ticketd_batch_requests_count") >= 1.0);
    assert!(delta("ticketd_lease_acquisitions_total") >= 1.0);
    assert!(after.get("ticketd_event_actors") >= 1.0);
    assert_eq!(after.get("ticketd_finalize_queue_depth"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_organizer_token_when_one_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::start(&dir.path().join("t.db"), &[("ADMIN_TOKEN", ORGANIZER)]).await;
    let url = format!("{}/metrics", p.base());
    let r = common::send(p.client.get(&url)).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    let r = common::send(p.client.get(&url).bearer_auth("organizer-token-012345678X")).await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    let r = common::send(p.client.get(&url).bearer_auth(ORGANIZER)).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body
            .as_str()
            .is_some_and(|t| t.contains("# TYPE ticketd_seats_sold_total counter")),
        "{:?}",
        r.body
    );
    // Every metric is there from the start, at 0, before anything happened to it.
    let text = r.body.as_str().unwrap_or_default();
    for name in [
        "ticketd_bookings_committed_total counter",
        "ticketd_cancellations_total counter",
        "ticketd_seats_returned_total counter",
        "ticketd_booking_refusals_total counter",
        "ticketd_group_commit_ops histogram",
        "ticketd_group_commit_duration_seconds histogram",
        "ticketd_group_commit_failures_total counter",
        "ticketd_batch_requests histogram",
        "ticketd_batch_refusals_total counter",
        "ticketd_wal_checkpoints_total counter",
        "ticketd_lease_acquisitions_total counter",
        "ticketd_lease_waits_total counter",
        "ticketd_lease_unavailable_total counter",
        "ticketd_tickets_issued_total counter",
        "ticketd_finalize_failures_total counter",
        "ticketd_finalize_retries_total counter",
        "ticketd_finalize_dead_lettered_total counter",
        "ticketd_finalize_queue_depth gauge",
        "ticketd_finalize_dead_letters gauge",
        "ticketd_event_actors gauge",
        "ticketd_event_actors_started_total counter",
        "ticketd_writer_backlog gauge",
        "ticketd_open_connections gauge",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name}")),
            "{name} missing:\n{text}"
        );
    }
    // The refused scrapes were counted too, under their route.
    let s = scrape(&p).await;
    assert!(s.get(&http("/metrics", "GET", 401)) >= 1.0);
    assert!(s.get(&http("/metrics", "GET", 403)) >= 1.0);
}

/// Cluster mode: a replica whose writer stalls past its lease has its batch refused by the
/// fence (counted there), takes a new lease and sells; the tickets of both replicas are issued
/// from the shared stream, and its queue drains to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_counts_fence_refusals_leases_and_issuance() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ticket.db");
    let redis = RedisProc::start().await;
    let a = replicas(
        1,
        &db,
        &redis.url(),
        &[
            ("LEASE_TTL_MS", "500"),
            ("FAILPOINTS", "writer-before-begin=1*sleep(2500)"),
            ("FINALIZE_DELAY_MS", "50"),
        ],
    )
    .await
    .remove(0);
    let b = replicas(
        1,
        &db,
        &redis.url(),
        &[("LEASE_TTL_MS", "500"), ("FINALIZE_DELAY_MS", "50")],
    )
    .await
    .remove(0);
    let event_id = b.create_event("Fenced", 20).await;
    let (a_before, b_before) = (scrape(&a).await, scrape(&b).await);

    let (client, base) = (a.client.clone(), a.base());
    let stalled = tokio::spawn(async move {
        common::send(
            client
                .post(format!("{base}/book"))
                .json(&json!({"user_id": 1, "event_id": event_id, "quantity": 3})),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(book(&b, event_id, 100, 8).await.status, 200);
    assert_eq!(stalled.await.unwrap().status, 200);

    let fenced = "ticketd_batch_refusals_total{reason=\"fence\"}";
    let a_after = scrape(&a).await;
    let a_delta = |s: &str| a_after.get(s) - a_before.get(s);
    assert_eq!(a_delta(fenced), 1.0, "A's stale batch refused by the fence");
    assert_eq!(
        a_delta("ticketd_batch_refusals_total{reason=\"seats\"}"),
        0.0
    );
    assert!(
        a_delta("ticketd_lease_acquisitions_total") >= 2.0,
        "A took a lease, lost it, took another"
    );
    assert_eq!(a_delta("ticketd_bookings_committed_total"), 1.0);
    assert_eq!(a_delta("ticketd_seats_sold_total"), 3.0);

    // Both bookings are issued, by whichever replica's consumer read them; the stream drains.
    let issued = |s: &Scrape, before: &Scrape| {
        s.get("ticketd_tickets_issued_total") - before.get("ticketd_tickets_issued_total")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (sa, sb) = (scrape(&a).await, scrape(&b).await);
        let total = issued(&sa, &a_before) + issued(&sb, &b_before);
        if total == 2.0 && sb.get("ticketd_finalize_queue_depth") == 0.0 {
            assert_eq!(sb.get(fenced) - b_before.get(fenced), 0.0);
            assert_eq!(sb.get("ticketd_finalize_dead_letters"), 0.0);
            break;
        }
        assert!(total <= 2.0, "issued once each: {total}");
        assert!(
            std::time::Instant::now() < deadline,
            "issued {total} of 2; queue {}",
            sb.get("ticketd_finalize_queue_depth")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
