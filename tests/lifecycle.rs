//! A booking's life beyond the sale: cancellation (seats back, never issued afterwards),
//! idempotent retries (one booking per key, across crashes and replicas), per-customer limits
//! (enforced by the store, across replicas), and customer tokens.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::cluster::{replicas, Nginx, RedisProc, FAST};
use common::{send, Proc, Resp, Sql, Store, Target, TestApp};
use futures::future::join_all;
use serde_json::{json, Value};

/// These tests start processes; one at a time keeps the 2-core machine honest.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `POST /book` with an optional `Idempotency-Key`.
async fn book_keyed(t: &impl Target, body: Value, key: Option<&str>) -> (Resp, bool) {
    let mut req = t.http().post(format!("{}/book", t.base())).json(&body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let r = req.send().await.expect("request");
    let replayed = r.headers().get("idempotent-replayed").is_some();
    let status = r.status();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (
        Resp {
            status,
            body,
            content_type: String::new(),
            retry_after,
        },
        replayed,
    )
}

async fn cancel(t: &impl Target, id: i64, secret: &str) -> Resp {
    send(
        t.http()
            .post(format!("{}/book/{id}/cancel", t.base()))
            .header("X-Booking-Secret", secret),
    )
    .await
}

fn live_seats(db: &impl Sql, event: i64) -> (i64, i64) {
    let booked = db.ints(
        "SELECT booked_count FROM events WHERE id = $1",
        &[event.into()],
    )[0];
    let rows = db.ints(
        "SELECT CAST(COALESCE(SUM(quantity), 0) AS BIGINT) FROM bookings
         WHERE event_id = $1 AND status != 'CANCELLED'",
        &[event.into()],
    )[0];
    (booked, rows)
}

both_backends! {
    /// Capacity 100, 400 clients, 30 winners cancel while the sale runs (15 at once, 15 once their
    /// ticket is issued): the event ends with exactly 100 live seats, never more at any moment; the
    /// cancelled bookings are never FINALIZED afterwards and their codes stop verifying.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn cancellation_during_a_flash_sale() {
        let app = Arc::new(TestApp::spawn_with(|c, _| c.finalize_delay_ms = 20));
        let event = app.create_event("Refundable", 100).await;

        // A watcher reads the file all along: never more live seats than the capacity.
        let stop = Arc::new(AtomicBool::new(false));
        let worst = Arc::new(AtomicI64::new(0));
        // Stops the watcher however the test ends: a failed assertion must fail the test, not
        // leave the runtime waiting for a blocking loop that never ends.
        struct StopOnDrop(Arc<AtomicBool>);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop_watcher = StopOnDrop(stop.clone());
        let watcher = {
            let (app, stop, worst) = (app.clone(), stop.clone(), worst.clone());
            tokio::task::spawn_blocking(move || {
                let db = app.db();
                while !stop.load(Ordering::Relaxed) {
                    let (booked, rows) = live_seats(&db, event);
                    worst.fetch_max(booked.max(rows), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };

        let winners = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (1..=400).map(|u| {
            let (app, winners) = (app.clone(), winners.clone());
            tokio::spawn(async move {
                let r = app
                    .post("/book", json!({"user_id": u, "event_id": event}))
                    .await;
                match r.status.as_u16() {
                    200 => {
                        let (id, secret) = (
                            r.body["id"].as_i64().unwrap(),
                            r.body["secret"].as_str().unwrap().to_string(),
                        );
                        let nth = {
                            let mut w = winners.lock().unwrap();
                            w.push((id, secret.clone()));
                            w.len()
                        };
                        if nth <= 15 {
                            // Cancelled at once, while its ticket is being issued.
                            let c = cancel(&*app, id, &secret).await;
                            assert_eq!(
                                (c.status.as_u16(), &c.body["status"]),
                                (200, &json!("CANCELLED"))
                            );
                            Some((id, secret, None))
                        } else if nth <= 30 {
                            // Cancelled once issued: its code must stop verifying.
                            let mut code = None;
                            for _ in 0..400 {
                                let b = app.get_booking(id, &secret).await.body;
                                if b["status"] == "FINALIZED" {
                                    code = b["ticket_code"].as_str().map(str::to_string);
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            assert!(code.is_some(), "booking {id} was issued");
                            let c = cancel(&*app, id, &secret).await;
                            assert_eq!(c.status, 200);
                            Some((id, secret, code))
                        } else {
                            None
                        }
                    }
                    409 => None,
                    other => panic!("unexpected {other}: {:?}", r.body),
                }
            })
        });
        let cancelled: Vec<(i64, String, Option<String>)> = join_all(tasks)
            .await
            .into_iter()
            .filter_map(Result::unwrap)
            .collect();
        assert_eq!(cancelled.len(), 30);

        // The seats the cancellations freed are on sale again: late clients take them, and no more.
        let (mut late, mut sold_out) = (0, false);
        for u in 1000..1100 {
            let r = app
                .post("/book", json!({"user_id": u, "event_id": event}))
                .await;
            match r.status.as_u16() {
                200 => late += 1,
                409 => {
                    sold_out = true;
                    break;
                }
                other => panic!("unexpected {other}: {:?}", r.body),
            }
        }
        assert!(
            sold_out && late >= 1,
            "freed seats were sold again ({late}), and no more"
        );
        assert!(
            common::eventually(Duration::from_secs(20), || {
                common::count_status(&app.db(), "PENDING") == 0
            })
            .await
        );
        stop.store(true, Ordering::Relaxed);
        watcher.await.unwrap();
        assert!(
            worst.load(Ordering::Relaxed) <= 100,
            "never more than capacity"
        );

        let db = app.db();
        assert_eq!(live_seats(&db, event), (100, 100), "exactly 100 live seats");
        let (_, _, finalized) = common::event_counts(&db, event);
        assert_eq!(finalized, 100, "issued seats count live bookings only");
        let stats = app.get(&format!("/event/{event}/stats")).await.body;
        assert_eq!(
            (&stats["booked_count"], &stats["finalized_count"]),
            (&json!(100), &json!(100))
        );
        for (id, secret, code) in &cancelled {
            let b = app.get_booking(*id, secret).await.body;
            assert_eq!(b["status"], "CANCELLED", "booking {id} stays cancelled");
            // Twice is the same answer.
            let again = cancel(&*app, *id, secret).await;
            assert_eq!((again.status.as_u16(), &again.body), (200, &b));
            if let Some(code) = code {
                let v = app.post("/ticket/verify", json!({"code": code})).await.body;
                assert_eq!(
                    (&v["valid"], &v["detail"]),
                    (&json!(false), &json!("The booking was cancelled"))
                );
            }
        }
        assert!(
            cancelled.iter().filter(|c| c.2.is_some()).count() == 15,
            "15 codes were issued before their cancellation"
        );
        // A stranger cannot cancel: the 404 of an unknown booking.
        let (id, _, _) = &cancelled[0];
        let r = cancel(&*app, *id, "not-the-secret").await;
        assert_eq!(
            (r.status.as_u16(), &r.body),
            (404, &json!({"detail": "Booking not found"}))
        );
    }
}

both_backends! {
    /// 100 concurrent requests with one key make one booking: every 200 names it, the others are
    /// 409 "in flight" (with Retry-After) or replays; the key with another body is 422; a malformed
    /// key is 422 naming the header; a refusal is not remembered; a retry after the event sold out
    /// still gets its booking.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_key_one_booking() {
        let app = Arc::new(TestApp::spawn());
        let event = app.create_event("Retries", 3).await;
        let body = json!({"user_id": 7, "event_id": event, "quantity": 1});
        let rs = join_all((0..100).map(|_| {
            let (app, body) = (app.clone(), body.clone());
            tokio::spawn(async move { book_keyed(&*app, body, Some("order-7-attempt")).await })
        }))
        .await;
        let mut ids = HashSet::new();
        let (mut in_flight, mut replays) = (0, 0);
        let mut first = None;
        for r in rs {
            let (r, replayed) = r.unwrap();
            match r.status.as_u16() {
                200 => {
                    ids.insert(r.body["id"].as_i64().unwrap());
                    if replayed {
                        replays += 1;
                    } else {
                        first = Some(r.body.clone());
                    }
                }
                409 => {
                    assert_eq!(r.retry_after.as_deref(), Some("1"), "{:?}", r.body);
                    in_flight += 1;
                }
                other => panic!("unexpected {other}: {:?}", r.body),
            }
        }
        assert_eq!(ids.len(), 1, "one booking, named by every 200");
        assert_eq!(in_flight + replays + 1, 100);
        let first = first.expect("one request booked");
        let db = app.db();
        assert_eq!(common::booking_sums(&db, event), (1, 1));

        // A replay is the same body, secret included.
        let (r, replayed) = book_keyed(&*app, body.clone(), Some("order-7-attempt")).await;
        assert!(replayed);
        assert_eq!((r.status.as_u16(), &r.body), (200, &first));
        // The same key with another body, or the same body formatted otherwise.
        let (r, _) = book_keyed(
            &*app,
            json!({"user_id": 7, "event_id": event, "quantity": 2}),
            Some("order-7-attempt"),
        )
        .await;
        assert_eq!(r.status, 422);
        assert_eq!(
            r.body["detail"][0]["loc"],
            json!(["header", "idempotency-key"])
        );
        let (r, replayed) = book_keyed(
            &*app,
            json!({"event_id": event, "user_id": 7}),
            Some("order-7-attempt"),
        )
        .await;
        assert!(replayed && r.status == 200, "same meaning, same request");
        // Keys are per customer: another user's identical key is another booking.
        let (r, replayed) = book_keyed(
            &*app,
            json!({"user_id": 8, "event_id": event}),
            Some("order-7-attempt"),
        )
        .await;
        assert!(!replayed && r.status == 200);
        let (last, _) = book_keyed(&*app, json!({"user_id": 9, "event_id": event}), Some("k9")).await;
        assert_eq!(last.status, 200);
        // Sold out now: a refusal is not remembered...
        let (r, _) = book_keyed(
            &*app,
            json!({"user_id": 10, "event_id": event}),
            Some("k10"),
        )
        .await;
        assert_eq!(r.status, 409);
        // ...but a retry of a request that did book gets its booking, not "sold out".
        let (r, replayed) =
            book_keyed(&*app, json!({"user_id": 9, "event_id": event}), Some("k9")).await;
        assert!(replayed);
        assert_eq!((r.status.as_u16(), &r.body), (200, &last.body));
        // A seat comes back: the refused key is free to book it.
        let c = cancel(
            &*app,
            first["id"].as_i64().unwrap(),
            first["secret"].as_str().unwrap(),
        )
        .await;
        assert_eq!(c.status, 200);
        let (r, replayed) = book_keyed(
            &*app,
            json!({"user_id": 10, "event_id": event}),
            Some("k10"),
        )
        .await;
        assert!(!replayed && r.status == 200, "{:?}", r.body);

        // Malformed keys: 422 naming the header.
        for bad in ["", &"k".repeat(256), "tab\there"] {
            let r = send(
                app.client
                    .post(format!("{}/book", app.base()))
                    .header("Idempotency-Key", bad)
                    .json(&json!({"user_id": 11, "event_id": event})),
            )
            .await;
            assert_eq!(r.status, 422, "{bad:?}");
            assert_eq!(
                r.body["detail"][0]["loc"],
                json!(["header", "idempotency-key"])
            );
        }
        let r = send(
            app.client
                .post(format!("{}/book", app.base()))
                .header(
                    "Idempotency-Key",
                    reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
                )
                .json(&json!({"user_id": 11, "event_id": event})),
        )
        .await;
        assert_eq!(r.status, 422);

        // Events too: the organizer's key gives back the event it created.
        let create = |title: &str| {
            app.client
                .post(format!("{}/event", app.base()))
                .header("Idempotency-Key", "launch-1")
                .json(&json!({"title": title, "capacity": 10}))
        };
        let a = send(create("Launch")).await;
        let b = send(create("Launch")).await;
        assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
        assert_eq!(a.body, b.body);
        assert_eq!(send(create("Other")).await.status, 422);
    }
}

both_backends! {
/// A customer who cancels the last seat and books it again at once gets it, even before the
/// event's actor has heard of the commit (failpoint `actor-before-outcome` holds that news back
/// 300 ms while the writer answers the clients): the seat must not be refused by the sold-out
/// fast path meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_seat_can_be_booked_again_at_once() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let p = Proc::start(
        &store,
        &[("FAILPOINTS", "actor-before-outcome=return(300)")],
    )
    .await;
    let event = p.create_event("Last seat", 1).await;
    let (first, _) = book_keyed(&p, json!({"user_id": 1, "event_id": event}), None).await;
    assert_eq!(first.status, 200);
    // Sold out, and the actor knows it (its news of the first commit has arrived by now).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (refused, _) = book_keyed(&p, json!({"user_id": 2, "event_id": event}), None).await;
    assert_eq!(refused.status, 409);
    let id = first.body["id"].as_i64().unwrap();
    let c = cancel(&p, id, first.body["secret"].as_str().unwrap()).await;
    assert_eq!(c.status, 200);
    let (again, _) = book_keyed(&p, json!({"user_id": 2, "event_id": event}), None).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
}
}

both_backends! {
/// Promise 2 with retries: the binary dies between COMMIT and the reply (failpoint
/// `writer-after-commit` aborts it); after a restart, the retry with the same key gets the
/// original booking, and there is exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_after_a_crash_gets_the_original_booking() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let p = Proc::start(&store, &[]).await;
    let event = p.create_event("Crash retry", 10).await;
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait().await, Some(0));

    let body = json!({"user_id": 5, "event_id": event, "quantity": 2});
    let p = Proc::start(&store, &[("FAILPOINTS", "writer-after-commit=return")]).await;
    let lost = p
        .client
        .post(format!("{}/book", p.base()))
        .header("Idempotency-Key", "checkout-5")
        .json(&body)
        .send()
        .await;
    assert!(lost.is_err(), "the process died before answering: {lost:?}");
    assert_eq!(p.wait().await, None, "killed (abort) by the failpoint");
    let db = store.db();
    let committed = db
        .ints_opt("SELECT id FROM bookings WHERE user_id = 5", &[])
        .expect("the booking was committed")[0];

    let p = Proc::start(&store, &[]).await;
    let (r, replayed) = book_keyed(&p, body.clone(), Some("checkout-5")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(replayed);
    assert_eq!(r.body["id"], committed);
    assert_eq!(r.body["quantity"], 2);
    assert_eq!(
        common::booking_sums(&db, event),
        (2, 1),
        "exactly one booking"
    );
    // Its secret works: the customer can read what they bought.
    let secret = r.body["secret"].as_str().unwrap();
    assert_eq!(p.get_booking(committed, secret).await.status, 200);
}
}

both_backends! {
/// The same across replicas: the first attempt reaches a replica that dies after its COMMIT;
/// the retry goes through nginx to the survivors and gets the original booking.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_through_nginx_after_a_replica_died_gets_the_original_booking() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let redis = RedisProc::start().await;
    let mut reps = replicas(2, &store, &redis.url(), FAST).await;
    let mut crashing_env = FAST.to_vec();
    crashing_env.push(("FAILPOINTS", "writer-after-commit=return"));
    let doomed = replicas(1, &store, &redis.url(), &crashing_env)
        .await
        .remove(0);
    let lb = Nginx::start(&[reps[0].port, reps[1].port, doomed.port]).await;
    let event = reps[0].create_event("Cluster retry", 10).await;
    let body = json!({"user_id": 77, "event_id": event});
    let lost = doomed
        .client
        .post(format!("{}/book", doomed.base()))
        .header("Idempotency-Key", "cart-77")
        .json(&body)
        .send()
        .await;
    assert!(lost.is_err());
    assert_eq!(doomed.wait().await, None);
    for _ in 0..3 {
        let (r, replayed) = book_keyed(&lb, body.clone(), Some("cart-77")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert!(replayed);
    }
    let db = store.db();
    assert_eq!(
        common::booking_sums(&db, event),
        (1, 1),
        "exactly one booking"
    );
    reps.clear();
}
}

async fn limited_burst(targets: &[&Proc], event: i64, user: i64, n: usize) -> (usize, Vec<Value>) {
    let rs = join_all((0..n).map(|i| {
        let t = targets[i % targets.len()];
        let (client, base) = (t.client.clone(), t.base());
        async move {
            common::send(
                client
                    .post(format!("{base}/book"))
                    .json(&json!({"user_id": user, "event_id": event})),
            )
            .await
        }
    }))
    .await;
    let ok = rs.iter().filter(|r| r.status == 200).count();
    let refused: Vec<Value> = rs
        .iter()
        .filter(|r| r.status == 409)
        .map(|r| r.body.clone())
        .collect();
    assert_eq!(ok + refused.len(), n, "only 200 or 409");
    (ok, refused)
}

both_backends! {
/// `max_per_user: 4`: 50 concurrent requests of one customer get exactly 4 seats, in one process
/// and across two replicas at once; after a cancellation they may book again up to the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_per_customer_limit_holds_under_concurrency_and_across_replicas() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let redis = RedisProc::start().await;
    let reps = replicas(2, &store, &redis.url(), FAST).await;
    let (a, b) = (&reps[0], &reps[1]);
    let r = a
        .post(
            "/event",
            json!({"title": "Limited", "capacity": 1000, "max_per_user": 4}),
        )
        .await;
    assert_eq!(r.body["max_per_user"], 4);
    let event = r.body["id"].as_i64().unwrap();

    let (ok, refused) = limited_burst(&[a], event, 1, 50).await;
    assert_eq!(ok, 4);
    assert!(refused
        .iter()
        .all(|b| b["detail"] == "Limit of 4 seats per customer reached; you may book 0 more."));
    let (ok, _) = limited_burst(&[a, b], event, 2, 50).await;
    assert_eq!(ok, 4, "two replicas at once: still 4");
    let db = store.db();
    let per_user: HashMap<i64, i64> = db
        .rows(
            "SELECT user_id, CAST(SUM(quantity) AS BIGINT) FROM bookings WHERE event_id = $1
             GROUP BY user_id",
            &[event.into()],
        )
        .into_iter()
        .map(|r| (r[0].int(), r[1].int()))
        .collect();
    assert_eq!(per_user, HashMap::from([(1, 4), (2, 4)]));

    // A request that would pass the limit names what is left; a cancellation makes room.
    let r = b
        .post(
            "/book",
            json!({"user_id": 3, "event_id": event, "quantity": 3}),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = a
        .post(
            "/book",
            json!({"user_id": 3, "event_id": event, "quantity": 2}),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), &r.body),
        (
            409,
            &json!({"detail": "Limit of 4 seats per customer reached; you may book 1 more."})
        )
    );
    let (id, secret): (i64, String) = {
        let r = a
            .post(
                "/book",
                json!({"user_id": 3, "event_id": event, "quantity": 1}),
            )
            .await;
        assert_eq!(r.status, 200);
        (
            r.body["id"].as_i64().unwrap(),
            r.body["secret"].as_str().unwrap().into(),
        )
    };
    assert_eq!(cancel(b, id, &secret).await.status, 200);
    let (ok, _) = limited_burst(&[a, b], event, 3, 10).await;
    assert_eq!(ok, 1, "room for exactly the cancelled seat");
    // Bad limits are 422.
    for bad in [json!(0), json!(1001), json!("4")] {
        let r = a
            .post(
                "/event",
                json!({"title": "Bad", "capacity": 1000, "max_per_user": bad}),
            )
            .await;
        assert_eq!(r.status, 422, "{bad}");
    }
}
}

both_backends! {
/// Cancelled seats reopen a sold-out event in every replica: the other replica's fast path hears
/// of it (Redis) and its actor reads the row before refusing anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancellation_reopens_a_sold_out_event_on_every_replica() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let redis = RedisProc::start().await;
    let reps = replicas(2, &store, &redis.url(), FAST).await;
    let (a, b) = (&reps[0], &reps[1]);
    let event = a.create_event("Reopens", 2).await;
    let first = a
        .post(
            "/book",
            json!({"user_id": 1, "event_id": event, "quantity": 2}),
        )
        .await;
    assert_eq!(first.status, 200);
    for p in [a, b] {
        let r = p
            .post("/book", json!({"user_id": 2, "event_id": event}))
            .await;
        assert_eq!(r.status, 409, "sold out everywhere");
    }
    let c = cancel(
        a,
        first.body["id"].as_i64().unwrap(),
        first.body["secret"].as_str().unwrap(),
    )
    .await;
    assert_eq!(c.status, 200);
    let mut sold = None;
    for _ in 0..100 {
        let r = b
            .post("/book", json!({"user_id": 2, "event_id": event}))
            .await;
        if r.status == 200 {
            sold = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sold.is_some(), "replica B sells the returned seats");
    let r = a
        .post("/book", json!({"user_id": 3, "event_id": event}))
        .await;
    assert_eq!(r.status, 200, "and A the last one: {:?}", r.body);
    let r = b
        .post("/book", json!({"user_id": 4, "event_id": event}))
        .await;
    assert_eq!(r.status, 409);
    let db = store.db();
    assert_eq!(live_seats(&db, event), (2, 2));
}
}

mod customer_tokens {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "shop-login-secret-0123456789";

    fn token(sub: &str, exp_in: i64, key: &str) -> String {
        let exp = chrono::Utc::now().timestamp() + exp_in;
        encode(
            &Header::default(),
            &json!({"sub": sub, "exp": exp}),
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    }

    fn unsigned(sub: &str) -> String {
        use data_encoding::BASE64URL_NOPAD as B64;
        let exp = chrono::Utc::now().timestamp() + 600;
        format!(
            "{}.{}.",
            B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            B64.encode(json!({"sub": sub, "exp": exp}).to_string().as_bytes())
        )
    }

    async fn book_as(app: &TestApp, bearer: Option<&str>, body: Value) -> Resp {
        let mut req = app.client.post(format!("{}/book", app.base())).json(&body);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        send(req).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bookings_need_the_customers_token_and_it_reads_their_own() {
        let app = TestApp::spawn_with(|c, _| c.customer_jwt_secret = Some(SECRET.into()));
        let event = app.create_event("Members", 10).await;
        let body = json!({"user_id": 42, "event_id": event});
        let no_exp = encode(
            &Header::default(),
            &json!({"sub": "42"}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        for (what, bearer) in [
            ("missing", None),
            ("malformed", Some("not-a-jwt".to_string())),
            ("expired", Some(token("42", -3600, SECRET))),
            ("forged", Some(token("42", 600, "another-key-0123456789"))),
            ("alg none", Some(unsigned("42"))),
            ("no exp", Some(no_exp)),
            ("sub not a user id", Some(token("alice", 600, SECRET))),
            ("sub with a sign", Some(token("+42", 600, SECRET))),
        ] {
            let r = book_as(&app, bearer.as_deref(), body.clone()).await;
            assert_eq!(r.status, 401, "{what}: {:?}", r.body);
        }
        let mine = token("42", 600, SECRET);
        let r = book_as(&app, Some(&mine), json!({"user_id": 43, "event_id": event})).await;
        assert_eq!(r.status, 403, "user_id other than the token's");
        let r = book_as(&app, Some(&mine), body.clone()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let r = book_as(&app, Some(&mine), json!({"event_id": event, "quantity": 2})).await;
        assert_eq!((r.status.as_u16(), &r.body["user_id"]), (200, &json!(42)));
        let id = r.body["id"].as_i64().unwrap();
        assert_eq!(
            common::booking_sums(&app.db(), event),
            (3, 2),
            "refused requests wrote nothing"
        );

        // The token reads and cancels the customer's own bookings, not anyone else's.
        let read = |bearer: String| {
            send(
                app.client
                    .get(format!("{}/book/{id}", app.base()))
                    .bearer_auth(bearer),
            )
        };
        assert_eq!(read(mine.clone()).await.status, 200);
        let other = read(token("43", 600, SECRET)).await;
        assert_eq!(
            (other.status.as_u16(), &other.body),
            (404, &json!({"detail": "Booking not found"}))
        );
        let r = send(
            app.client
                .post(format!("{}/book/{id}/cancel", app.base()))
                .bearer_auth(&mine),
        )
        .await;
        assert_eq!(
            (r.status.as_u16(), &r.body["status"]),
            (200, &json!("CANCELLED"))
        );
    }
}

both_backends! {
    /// One process, either backend: 50 concurrent requests of one customer on `max_per_user: 4`
    /// get exactly 4 seats; the others are 409 naming the limit; another customer still books.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_per_customer_limit_holds_in_one_process() {
        let app = Arc::new(TestApp::spawn());
        let r = app
            .post(
                "/event",
                json!({"title": "Limited", "capacity": 1000, "max_per_user": 4}),
            )
            .await;
        let event = r.body["id"].as_i64().expect("id");
        let tasks = (0..50).map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                app.post("/book", json!({"user_id": 9, "event_id": event}))
                    .await
            })
        });
        let rs: Vec<Resp> = futures::future::join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.expect("task"))
            .collect();
        let ok = rs.iter().filter(|r| r.status == 200).count();
        assert_eq!(ok, 4, "exactly the limit");
        assert!(
            rs.iter().all(|r| r.status == 200 || r.status == 409),
            "{:?}",
            rs.iter().find(|r| r.status != 200 && r.status != 409)
        );
        assert_eq!(common::booking_sums(&app.db(), event), (4, 4));
        let other = app
            .post("/book", json!({"user_id": 10, "event_id": event}))
            .await;
        assert_eq!(other.status, 200);
    }
}
