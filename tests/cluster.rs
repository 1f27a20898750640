//! Cluster mode with real processes: a private redis-server, three replicas of the binary on one
//! database (a SQLite file, or a private PostgreSQL: `both_backends!`), nginx in front. Replicas
//! are SIGKILLed and SIGSTOPped, Redis is killed and restarted empty; the database must never
//! hold more than capacity, and must hold every booking a client was told about.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::{replicas, AnyRedis, Nginx, RedisProc, FAST};
use common::{booking_sums, count_status, event_counts, Resp, Sql, Store, Target};
use futures::future::join_all;
use serde_json::{json, Value};

/// These tests start many processes each; one at a time keeps the 2-core machine honest.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type Acks = Arc<Mutex<HashMap<i64, Value>>>;

/// Clients booking in a loop through `target` until the event sells out. 503 (Redis down, a
/// replica busy) and 502 (nginx lost a replica mid-request) are retried after a pause: the
/// client was told nothing. Returns acknowledged bookings and counts of 503 and 502.
fn hammer(
    target: &impl Target,
    event_id: i64,
    workers: usize,
) -> (Acks, Arc<AtomicUsize>, Vec<tokio::task::JoinHandle<()>>) {
    let acks: Acks = Arc::default();
    let retried = Arc::new(AtomicUsize::new(0));
    let tasks = (0..workers)
        .map(|w| {
            let (client, base, acks, retried) = (target.http().clone(), target.base(), acks.clone(), retried.clone());
            tokio::spawn(async move {
                let mut n = 0i64;
                loop {
                    n += 1;
                    let body = json!({"user_id": w as i64 * 1_000_000 + n, "event_id": event_id, "quantity": 1 + n % 2});
                    let r = match client.post(format!("{base}/book")).json(&body).send().await {
                        Ok(r) => r,
                        Err(_) => {
                            retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let status = r.status().as_u16();
                    let v: Value = r.json().await.unwrap_or(Value::Null);
                    match status {
                        200 => {
                            assert_eq!(v["user_id"], body["user_id"]);
                            acks.lock().unwrap().insert(v["id"].as_i64().unwrap(), v);
                        }
                        409 if v["detail"] == "Event is sold out." => return,
                        409 => {} // not enough seats for this quantity: try again
                        502..=504 => {
                            retried.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        other => panic!("unexpected {other}: {v}"),
                    }
                }
            })
        })
        .collect();
    (acks, retried, tasks)
}

async fn wait_acks(acks: &Acks, n: usize) {
    for _ in 0..3000 {
        if acks.lock().unwrap().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fewer than {n} acknowledged");
}

/// No oversell, the counters agree with the rows, every acknowledged booking is there as told.
fn check_db(store: &Store, event_id: i64, acks: &HashMap<i64, Value>) -> i64 {
    let db = store.db();
    let (booked, capacity, _) = event_counts(&db, event_id);
    assert!(booked <= capacity, "oversold: {booked} > {capacity}");
    assert_eq!(
        booking_sums(&db, event_id).0,
        booked,
        "booked_count equals the rows' seats"
    );
    for (id, v) in acks {
        let q = db.ints_opt(
            "SELECT user_id, quantity FROM bookings WHERE id = $1 AND event_id = $2",
            &[(*id).into(), event_id.into()],
        );
        assert_eq!(
            q,
            Some(vec![
                v["user_id"].as_i64().unwrap(),
                v["quantity"].as_i64().unwrap()
            ]),
            "ack {id}"
        );
    }
    booked
}

async fn all_finalized(store: &Store) {
    let db = store.db();
    assert!(
        common::eventually(Duration::from_secs(60), || count_status(&db, "PENDING")
            == 0)
        .await,
        "every booking ends FINALIZED"
    );
    let v = db.ints(
        &format!(
            "SELECT CAST(SUM({}) AS BIGINT), CAST(SUM(booked_count) AS BIGINT) FROM events",
            db.finalized()
        ),
        &[],
    );
    let (fin, booked) = (v[0], v[1]);
    assert_eq!(fin, booked, "every seat issued exactly once");
}

both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_three_thousand_clients_five_hundred_seats() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let redis = AnyRedis::get().await;
    let reps = replicas(3, &store, &redis.url, FAST).await;
    let lb = Nginx::start(&reps.iter().map(|r| r.port).collect::<Vec<_>>()).await;
    let event_id = lb.create_event("Cluster flash sale", 500).await;

    let lb = Arc::new(lb);
    let tasks = (1..=3000).map(|u| {
        let lb = lb.clone();
        tokio::spawn(async move {
            lb.post("/book", json!({"user_id": u, "event_id": event_id}))
                .await
        })
    });
    let rs: Vec<Resp> = join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let ok: Vec<&Resp> = rs.iter().filter(|r| r.status == 200).collect();
    let sold_out = rs.iter().filter(|r| r.status == 409).count();
    assert_eq!(
        (ok.len(), sold_out),
        (500, 2500),
        "{:?}",
        rs.iter().find(|r| r.status != 200 && r.status != 409)
    );

    let acks: HashMap<i64, Value> = ok
        .iter()
        .map(|r| (r.body["id"].as_i64().unwrap(), r.body.clone()))
        .collect();
    assert_eq!(acks.len(), 500);
    assert_eq!(check_db(&store, event_id, &acks), 500);
    assert_eq!(
        booking_sums(&store.db(), event_id).1,
        500,
        "exactly those 500 rows, none more"
    );
    all_finalized(&store).await;
}
}

both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_sigkilled_mid_sale() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let redis = RedisProc::start().await;
    let mut reps = replicas(3, &store, &redis.url(), FAST).await;
    let lb = Nginx::start(&reps.iter().map(|r| r.port).collect::<Vec<_>>()).await;
    let event_id = lb.create_event("Kill sale", 1500).await;
    let (acks, _, tasks) = hammer(&lb, event_id, 96);
    wait_acks(&acks, 200).await;
    let victim = reps.remove(1);
    victim.signal(libc::SIGKILL);
    assert_eq!(victim.wait().await, None);
    for t in tasks {
        t.await.unwrap();
    }
    let acks = acks.lock().unwrap().clone();
    let booked = check_db(&store, event_id, &acks);
    assert!(booked >= 1499, "the survivors sold the rest ({booked})");
    all_finalized(&store).await;
}
}

both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_paused_past_its_lease_then_resumed() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let redis = RedisProc::start().await;
    let reps = replicas(3, &store, &redis.url(), FAST).await;
    let lb = Nginx::start(&reps.iter().map(|r| r.port).collect::<Vec<_>>()).await;
    let event_id = lb.create_event("Pause sale", 1500).await;
    let (acks, _, tasks) = hammer(&lb, event_id, 96);
    wait_acks(&acks, 200).await;
    reps[0].signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(2500)).await; // > LEASE_TTL_MS
    reps[0].signal(libc::SIGCONT);
    for t in tasks {
        t.await.unwrap();
    }
    let acks = acks.lock().unwrap().clone();
    let booked = check_db(&store, event_id, &acks);
    assert!(booked >= 1499, "sold out ({booked})");
    all_finalized(&store).await;
}
}

both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fencing_refuses_a_holder_whose_lease_expired() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let redis = RedisProc::start().await;
    // A's writer stalls 2.5 s on its first seat batch: longer than its 500 ms lease.
    let a_env = [
        ("LEASE_TTL_MS", "500"),
        ("FAILPOINTS", "writer-before-begin=1*sleep(2500)"),
        ("FINALIZE_DELAY_MS", "50"),
    ];
    let a = replicas(1, &store, &redis.url(), &a_env).await.remove(0);
    let b = replicas(
        1,
        &store,
        &redis.url(),
        &[("LEASE_TTL_MS", "500"), ("FINALIZE_DELAY_MS", "50")],
    )
    .await
    .remove(0);
    // Room for everyone: only the fence, not the capacity, can refuse A's stale batch.
    let event_id = b.create_event("Fenced", 20).await;

    // A takes the lease, allocates 3 of 20 free seats in memory, and stalls.
    let (client, base) = (a.client.clone(), a.base());
    let stalled = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let r = common::send(
            client
                .post(format!("{base}/book"))
                .json(&json!({"user_id": 1, "event_id": event_id, "quantity": 3})),
        )
        .await;
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // A's lease has expired: B takes the lease with the next token and sells 8 seats in one
    // batch under it (one booking: one lease, one token — A's plus one, if tokens increase).
    let r = b
        .post(
            "/book",
            json!({"user_id": 100, "event_id": event_id, "quantity": 8}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let b_ids = [r.body["id"].as_i64().unwrap()];
    // A wakes. Its batch would fit (12 seats left), but it was allocated under a lease that has
    // passed to B: the store refuses the token, A takes a new lease above B's tokens and writes
    // the batch under it, after B's bookings.
    let (r, took) = stalled.await.unwrap();
    assert!(
        took >= Duration::from_millis(2000),
        "A really stalled ({took:?})"
    );
    assert_eq!(r.status, 200, "{:?}", r.body);
    let a_id = r.body["id"].as_i64().unwrap();
    assert!(
        b_ids.iter().all(|&b| b < a_id),
        "A's batch was written after B's, under a new lease"
    );
    let ready = a.get("/ready").await.body;
    assert_eq!(
        (&ready["fence_refusals"], &ready["seat_refusals"]),
        (&json!(1), &json!(0)),
        "the fence, not the capacity, refused A's stale batch: {ready}"
    );
    // A serves correctly from its reloaded view: 9 seats left.
    let r = a
        .post(
            "/book",
            json!({"user_id": 2, "event_id": event_id, "quantity": 9}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = a
        .post("/book", json!({"user_id": 3, "event_id": event_id}))
        .await;
    assert_eq!(
        (r.status.as_u16(), &r.body),
        (409, &json!({"detail": "Event is sold out."}))
    );
    let db = store.db();
    assert_eq!(event_counts(&db, event_id).0, 20);
    assert_eq!(booking_sums(&db, event_id), (20, 3));
}
}

both_backends! {
/// The capacity check of the fenced update, deterministically: A's view says 9 seats are free
/// when B has sold them all. A's batch carries a new, valid token, so the fence lets it through;
/// only `booked_count + n <= capacity` in the store stands between it and an oversell.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_view_cannot_sell_seats_another_replica_sold() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let redis = RedisProc::start().await;
    let mut reps = replicas(2, &store, &redis.url(), FAST).await;
    let (b, a) = (reps.remove(1), reps.remove(0));
    let event_id = a.create_event("Stale view", 10).await;
    let r = a
        .post("/book", json!({"user_id": 1, "event_id": event_id}))
        .await;
    assert_eq!(r.status, 200, "A loads its view: 1 of 10 sold");
    let r = b
        .post(
            "/book",
            json!({"user_id": 2, "event_id": event_id, "quantity": 9}),
        )
        .await;
    assert_eq!(r.status, 200, "B sells the other 9: {:?}", r.body);
    let r = a
        .post("/book", json!({"user_id": 3, "event_id": event_id}))
        .await;
    assert_eq!(
        (r.status.as_u16(), &r.body),
        (409, &json!({"detail": "Event is sold out."})),
        "A learns from the refusal that nothing is left"
    );
    let ready = a.get("/ready").await.body;
    assert_eq!(
        (&ready["fence_refusals"], &ready["seat_refusals"]),
        (&json!(0), &json!(1)),
        "the capacity, not the fence, refused A's batch: {ready}"
    );
    let db = store.db();
    assert_eq!(event_counts(&db, event_id).0, 10);
    assert_eq!(booking_sums(&db, event_id), (10, 2));
}
}

both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_empty_mid_sale() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let mut redis = RedisProc::start().await;
    let reps = replicas(3, &store, &redis.url(), FAST).await;
    let lb = Nginx::start(&reps.iter().map(|r| r.port).collect::<Vec<_>>()).await;
    let event_id = lb.create_event("Redis chaos", 1500).await;
    let (acks, retried, tasks) = hammer(&lb, event_id, 64);
    wait_acks(&acks, 200).await;

    redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = acks.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let during = acks.lock().unwrap().len();
    // Without Redis nobody may allocate: at most the batches already past their lease finish.
    assert!(
        during - before < 100,
        "bookings stop while Redis is down ({before} -> {during})"
    );
    assert!(
        retried.load(Ordering::Relaxed) > 0,
        "clients were told 503, not left waiting"
    );
    // Reads keep working.
    for r in &reps {
        let s = r.get(&format!("/event/{event_id}/stats")).await;
        assert_eq!(s.status, 200);
        assert_eq!(r.get("/ready").await.status, 503, "not ready without Redis");
    }

    // Redis comes back empty: the fence counters start over below the database's fences.
    redis.restart().await;
    for t in tasks {
        t.await.unwrap();
    }
    let acks = acks.lock().unwrap().clone();
    assert!(
        acks.len() > during,
        "bookings resumed without restarting a replica"
    );
    let booked = check_db(&store, event_id, &acks);
    assert!(booked >= 1499, "sold out after recovery ({booked})");
    for r in &reps {
        assert_eq!(r.get("/ready").await.status, 200);
    }
    all_finalized(&store).await;
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_a_hot_event_fairly() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let redis = AnyRedis::get().await;
    let reps = replicas(2, &store, &redis.url, FAST).await;
    let event_id = reps[0].create_event("Fair", 3000).await;
    // The same load straight at each replica (no balancer): each must get its share.
    let (a, _, ta) = hammer(&reps[0], event_id, 32);
    let (b, _, tb) = hammer(&reps[1], event_id, 32);
    for t in ta.into_iter().chain(tb) {
        t.await.unwrap();
    }
    let (a, b) = (a.lock().unwrap().len(), b.lock().unwrap().len());
    let total = a + b;
    assert!(
        a * 4 >= total && b * 4 >= total,
        "each replica sold at least a quarter: {a} vs {b}"
    );
    eprintln!("fairness: replica A sold {a} bookings, replica B {b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_protocol_on_redis_fences_and_takes_turns() {
    use ticketd::coord::{RedisLease, RedisLink};
    let _serial = SERIAL.lock().await;
    let mut redis = RedisProc::start().await;
    let lease = RedisLease::new(
        RedisLink::new(&redis.url()).unwrap(),
        Duration::from_millis(300),
    );

    let a = lease.acquire(9, "a", 0).await.unwrap().expect("free lease");
    assert_eq!(
        lease.acquire(9, "b", 0).await.unwrap(),
        None,
        "held by a; b now waits"
    );
    // a comes back for its next batch while b waits: it yields instead of renewing...
    assert_eq!(lease.acquire(9, "a", 0).await.unwrap(), None);
    // ...and may not take the free lease ahead of b.
    assert_eq!(lease.acquire(9, "a", 0).await.unwrap(), None);
    let b = lease.acquire(9, "b", 0).await.unwrap().expect("b's turn");
    assert!(b > a, "tokens strictly increase");
    // a's compare-and-delete cannot remove b's lease.
    lease.release(9, "a").await.unwrap();
    assert_eq!(lease.acquire(9, "c", 0).await.unwrap(), None);
    // Without anyone waiting, the holder renews (consecutive token: its view stays trusted).
    lease.release(9, "b").await.unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await; // c's place in the queue expires
    let b1 = lease.acquire(9, "b", 0).await.unwrap().unwrap();
    let b2 = lease.acquire(9, "b", 0).await.unwrap().unwrap();
    assert_eq!(b2, b1 + 1);
    // An expired lease is free for the next one, with a higher token.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let c = lease.acquire(9, "c", 0).await.unwrap().unwrap();
    assert!(c > b2);

    // Three replicas take turns in the order they asked: a queue, not one slot (with one slot
    // the two that had just held the lease kept taking it back, and the third starved).
    lease
        .acquire(10, "a", 0)
        .await
        .unwrap()
        .expect("free lease");
    assert_eq!(lease.acquire(10, "b", 0).await.unwrap(), None, "b queues");
    assert_eq!(
        lease.acquire(10, "c", 0).await.unwrap(),
        None,
        "c queues behind b"
    );
    assert_eq!(
        lease.acquire(10, "a", 0).await.unwrap(),
        None,
        "a yields, queues last"
    );
    assert_eq!(
        lease.acquire(10, "c", 0).await.unwrap(),
        None,
        "b's turn first"
    );
    lease.acquire(10, "b", 0).await.unwrap().expect("b's turn");
    assert_eq!(
        lease.acquire(10, "b", 0).await.unwrap(),
        None,
        "b yields to c"
    );
    assert_eq!(
        lease.acquire(10, "a", 0).await.unwrap(),
        None,
        "c asked before a"
    );
    lease.acquire(10, "c", 0).await.unwrap().expect("c's turn");
    assert_eq!(
        lease.acquire(10, "c", 0).await.unwrap(),
        None,
        "c yields to a"
    );
    lease.acquire(10, "a", 0).await.unwrap().expect("a's turn");

    // Redis restarts empty: the counter starts over, the floor (from the database) keeps the
    // tokens above every token ever written.
    redis.restart().await;
    let after = lease.acquire(9, "c", 41).await.unwrap().unwrap();
    assert_eq!(after, 42);
}

both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_on_a_new_file_all_come_up() {
    let _serial = SERIAL.lock().await;
    let store = Store::fresh();
    let redis = AnyRedis::get().await;
    let env = [("REDIS_URL", redis.url.as_str())];
    // Started at the same instant: the migrations must not run twice.
    let reps = join_all((0..3).map(|_| common::Proc::start(&store, &env))).await;
    for r in &reps {
        assert_eq!(r.get("/ready").await.status, 200);
    }
    let id = reps[0].create_event("Fresh", 3).await;
    for r in &reps {
        assert_eq!(
            r.post("/book", json!({"user_id": 1, "event_id": id}))
                .await
                .status,
            200
        );
    }
}
}

/// Publishes `event` on the lease-free channel until the watcher reports it (a subscription
/// takes a moment to be in place), for at most `within`.
async fn notified(
    redis: &RedisProc,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<i64>,
    event: i64,
    within: Duration,
) -> bool {
    let client = redis::Client::open(redis.url()).unwrap();
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            let _: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(ticketd::coord::redis::LEASE_FREE)
                .arg(event)
                .query_async(&mut c)
                .await;
        }
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            if got == event {
                return true;
            }
        }
    }
    false
}

/// Connection ids of the pub/sub clients of `redis`.
async fn pubsub_clients(redis: &RedisProc) -> Vec<String> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut c)
        .await
        .unwrap();
    list.lines()
        .filter_map(|l| {
            l.split(' ')
                .find(|f| f.starts_with("id="))
                .map(str::to_string)
        })
        .collect()
}

/// The lease notifications (a hint that saves the waiting replica its poll interval) keep
/// arriving across the subscription's keepalive pings and across a Redis restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_notifications_survive_keepalives_and_a_redis_restart() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisProc::start().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let client = redis::Client::open(redis.url()).unwrap();
    let watcher = tokio::spawn(ticketd::coord::redis::watch_notifications(
        client,
        move |e| {
            let _ = tx.send(e);
        },
        |_| {},
    ));
    assert!(
        notified(&redis, &mut rx, 7, Duration::from_secs(5)).await,
        "first notification"
    );
    let subscriber = pubsub_clients(&redis).await;
    assert_eq!(subscriber.len(), 1, "one subscription: {subscriber:?}");
    // Past one keepalive period: the ping in subscribed mode must not tear the subscription down.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        pubsub_clients(&redis).await,
        subscriber,
        "same connection after a keepalive"
    );
    assert!(
        notified(&redis, &mut rx, 8, Duration::from_secs(1)).await,
        "after a keepalive"
    );
    redis.restart().await;
    assert!(
        notified(&redis, &mut rx, 9, Duration::from_secs(10)).await,
        "after a restart"
    );
    watcher.abort();
}
