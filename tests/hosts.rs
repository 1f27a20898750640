//! Hosts (issue 15): three replicas, each in its own network namespace with its own address,
//! PostgreSQL and Redis in another, all on one bridge; nginx in front, in the root namespace with
//! the clients. Faults are planted for real: `kill -9` of a replica, a replica's cable cut
//! (`ip link set … down`) past its lease while the others sell, `pg_ctl stop -m immediate` then
//! start, Redis SIGKILLed and started again empty on the same address. (The cut replica's writer
//! is slowed by a failpoint, so that the cut finds a batch between its lease and PostgreSQL:
//! see `R0_SLOW_WRITER_MS`.)
//!
//! After each: never oversold; every acknowledged booking present as told; no customer booked
//! twice; no row that no client was told about, except where the reply was lost (or, for a
//! 503, where PostgreSQL died under its COMMIT: see `On503`), and none at all for clients that
//! retry with an `Idempotency-Key` until they hear the outcome (see `Sale`); all rows
//! FINALIZED, each seat issued once.
//!
//! Needs root and `ip netns`: on a machine without them every test here fails loudly
//! (`netns::cannot`), never passes silently.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Nginx;
use common::Target;
use futures::future::join_all;
use netns::{Host, Net, NsPg, NsRedis, Replica};
use serde_json::{json, Value};

/// Each test starts a network, PostgreSQL, Redis, three replicas and nginx: one at a time keeps
/// the 2-core machine honest (and the timings meaningful).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ADMIN: &str = "hosts-admin-token";
/// The replicas' lease: a cut longer than this is "past its lease".
const LEASE_TTL_MS: u64 = 1000;

/// Three hosts of replicas, one of PostgreSQL + Redis, nginx. Fields drop in order: nginx, the
/// replicas, Redis, PostgreSQL, and the network last (its Drop kills whatever is left in it).
struct Site {
    lb: Nginx,
    reps: Vec<Replica>,
    redis: NsRedis,
    pg: NsPg,
    net: Net,
}

impl Site {
    async fn start() -> Site {
        Site::start_with(&[]).await
    }

    /// With `r0_env` added to the first replica's environment.
    async fn start_with(r0_env: &[(&str, &str)]) -> Site {
        let started = Instant::now();
        let mut net = Net::new();
        let db = net.host("db");
        let hosts: Vec<Host> = (0..3).map(|i| net.host(&format!("r{i}"))).collect();
        let pg = tokio::task::block_in_place(|| NsPg::start(&db));
        let redis = NsRedis::start(&db, &net.log_path("redis")).await;
        let (pg_url, redis_url) = (pg.url(), redis.url());
        let lease = LEASE_TTL_MS.to_string();
        let env = [
            ("DATABASE_URL", pg_url.as_str()),
            ("REDIS_URL", redis_url.as_str()),
            ("ADMIN_TOKEN", ADMIN),
            ("LEASE_TTL_MS", lease.as_str()),
            ("FINALIZE_DELAY_MS", "50"),
            ("FINALIZE_VISIBILITY_MS", "2000"),
            ("SWEEP_INTERVAL_MS", "300"),
        ];
        let logs: Vec<_> = hosts.iter().map(|h| net.log_path(&h.role)).collect();
        let r0_env: Vec<(&str, &str)> = env.iter().chain(r0_env).copied().collect();
        let reps =
            join_all(
                hosts.iter().zip(&logs).enumerate().map(|(i, (h, log))| {
                    Replica::start(h, if i == 0 { &r0_env } else { &env }, log)
                }),
            )
            .await;
        let lb = Nginx::start_hosts(
            &reps
                .iter()
                .map(|r| format!("{}:{}", r.host.addr, r.port))
                .collect::<Vec<_>>(),
        )
        .await;
        eprintln!(
            "hosts: network {} (bridge {}), PostgreSQL + Redis on {}, replicas on {}; up in {:?}",
            net.cidr(),
            net.gateway(),
            db.addr,
            reps.iter()
                .map(|r| r.host.addr.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            started.elapsed()
        );
        Site {
            lb,
            reps,
            redis,
            pg,
            net,
        }
    }

    async fn create_event(&self, title: &str, capacity: i64) -> i64 {
        self.reps[0].create_event(title, capacity).await
    }

    /// The database, read from the root namespace through the bridge (a fresh connection each
    /// time: PostgreSQL may have restarted since).
    fn db<T: Send>(&self, f: impl FnOnce(&mut postgres::Client) -> T + Send) -> T {
        let url = self.pg.url();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut c = postgres::Client::connect(&url, postgres::NoTls)
                    .unwrap_or_else(|e| panic!("{url}: {e}"));
                f(&mut c)
            })
            .join()
            .expect("db thread")
        })
    }

    /// `(booked_count, capacity, finalized_count)`.
    fn counts(&self, event_id: i64) -> (i64, i64, i64) {
        self.db(|c| {
            let r = c
                .query_one(
                    "SELECT booked_count, capacity, ticketd_finalized(events) FROM events WHERE id = $1",
                    &[&event_id],
                )
                .unwrap();
            (r.get(0), r.get(1), r.get(2))
        })
    }

    fn rows(&self, event_id: i64) -> Vec<Row> {
        self.db(|c| {
            c.query(
                "SELECT id, user_id, quantity, status, ticket_code IS NOT NULL,
                        CAST(EXTRACT(EPOCH FROM created_at) * 1000 AS BIGINT)
                 FROM bookings WHERE event_id = $1",
                &[&event_id],
            )
            .unwrap()
            .iter()
            .map(|r| Row {
                id: r.get(0),
                user: r.get(1),
                quantity: r.get(2),
                status: r.get(3),
                coded: r.get(4),
                created_ms: r.get(5),
            })
            .collect()
        })
    }

    /// Polls Redis (from the root namespace) until `replica` holds the lease of `event_id`
    /// (the lease's value names the owner); how long that took.
    async fn wait_lease_holder(&self, event_id: i64, replica: &str) -> Duration {
        let started = Instant::now();
        let client = redis::Client::open(self.redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let key = format!("ticketd:lease:{{{event_id}}}");
        // The owner is `<REPLICA_ID>-<pid>-<random>:<actor>` (startup.rs, lease.rs).
        let prefix = format!("{replica}-");
        let mut seen = HashMap::<Option<String>, usize>::new();
        loop {
            let holder: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut c)
                .await
                .unwrap();
            if holder.as_ref().is_some_and(|h| h.starts_with(&prefix)) {
                return started.elapsed();
            }
            *seen.entry(holder).or_default() += 1;
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{replica} did not hold the lease of event {event_id} in 10 s; seen: {seen:?}"
            );
            tokio::task::yield_now().await;
        }
    }

    /// A replica's fence refusals so far (`/ready`'s organizer detail), if it answers.
    async fn fence_refusals(&self, i: usize) -> Option<u64> {
        let r = tokio::time::timeout(Duration::from_secs(3), self.reps[i].ready())
            .await
            .ok()?;
        r.body["fence_refusals"].as_u64()
    }
}

#[derive(Debug)]
struct Row {
    id: i64,
    user: i64,
    quantity: i64,
    status: String,
    coded: bool,
    /// `created_at` in Unix ms: the writer stamps it when it starts the group's transaction.
    created_ms: i64,
}

/// What the clients were told. Every request is a new customer (`user_id`), so a row names the
/// request that wrote it.
#[derive(Default, Debug)]
struct Told {
    /// 200: booking id -> (user, quantity).
    acks: HashMap<i64, (i64, i64)>,
    /// 503: the service said "not written" (users).
    unavailable: HashSet<i64>,
    /// 503s without a Retry-After.
    unavailable_without_retry_after: usize,
    /// No reply (a transport error) or nginx's 502/504: the outcome is unknown (users).
    lost: HashSet<i64>,
    /// What the first few lost replies were, for the summary.
    lost_how: Vec<String>,
    /// Users whose requests carried an `Idempotency-Key` (retried until 200 or sold out).
    keyed: HashSet<i64>,
    sold_out: usize,
    /// Anything else: a failure of the test.
    other: Vec<String>,
}

type Shared = Arc<Mutex<Told>>;

fn record(told: &Shared, user: i64, quantity: i64, outcome: Result<(u16, bool, Value), String>) {
    let mut t = told.lock().unwrap();
    match outcome {
        Ok((200, _, v)) => {
            let (id, u, q) = (
                v["id"].as_i64(),
                v["user_id"].as_i64(),
                v["quantity"].as_i64(),
            );
            match (id, u, q) {
                (Some(id), Some(u), Some(q)) if u == user && q == quantity => {
                    if let Some(&(other, _)) = t.acks.get(&id).filter(|a| a.0 != u) {
                        t.other.push(format!(
                            "booking {id} acknowledged to users {other} and {u}"
                        ));
                    }
                    t.acks.insert(id, (u, q));
                }
                _ => t.other.push(format!("user {user}: 200 {v}")),
            }
        }
        Ok((409, _, v)) if v["detail"] == "Event is sold out." => t.sold_out += 1,
        Ok((503, retry_after, _)) => {
            t.unavailable.insert(user);
            if !retry_after {
                t.unavailable_without_retry_after += 1;
            }
        }
        Ok((status @ (502 | 504), _, _)) => {
            t.lost.insert(user);
            if t.lost_how.len() < 3 {
                t.lost_how.push(format!("{status} from nginx"));
            }
        }
        Ok((status, _, v)) => t.other.push(format!("user {user}: {status} {v}")),
        Err(e) => {
            t.lost.insert(user);
            if t.lost_how.len() < 3 {
                t.lost_how.push(e);
            }
        }
    }
}

/// One booking of one seat for `user` (with `key` as its `Idempotency-Key`, if any): (status,
/// has Retry-After, body), or the transport error.
async fn book(
    http: &reqwest::Client,
    base: &str,
    event_id: i64,
    user: i64,
    key: Option<&str>,
) -> Result<(u16, bool, Value), String> {
    let mut req = http
        .post(format!("{base}/book"))
        .json(&json!({"user_id": user, "event_id": event_id, "quantity": 1}));
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let r = req.send().await.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let retry_after = r.headers().contains_key("retry-after");
    let text = r.text().await.map_err(|e| e.to_string())?;
    Ok((
        status,
        retry_after,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// Clients booking one seat at a time through nginx until the event sells out (or `stop`).
/// Without a key, a 503 or a lost reply is retried as a new customer after a pause; a keyed
/// client (every `keyed_every`-th worker) retries the same request with the same
/// `Idempotency-Key` until it hears 200 or "sold out": its booking, if written, is never lost
/// to a lost reply, nor written twice.
struct Sale {
    told: Shared,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Sale {
    /// `workers` clients through nginx.
    fn start(site: &Site, event_id: i64, workers: usize, keyed_every: usize) -> Sale {
        Sale::start_at(&[site.lb.base()], event_id, workers, keyed_every)
    }

    /// `workers` clients, worker `w` sending to `bases[w % bases.len()]`, with keys when
    /// `w % keyed_every == 0` (none when 0).
    fn start_at(bases: &[String], event_id: i64, workers: usize, keyed_every: usize) -> Sale {
        let told: Shared = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let http = common::client();
        let tasks = (0..workers)
            .map(|w| {
                let (http, base, told, stop) = (
                    http.clone(),
                    bases[w % bases.len()].clone(),
                    told.clone(),
                    stop.clone(),
                );
                let keyed = keyed_every != 0 && w % keyed_every == 0;
                tokio::spawn(async move {
                    let (mut n, mut retrying) = (0, false);
                    while !stop.load(Ordering::Relaxed) {
                        if !retrying {
                            n += 1;
                        }
                        let user = (w as i64 + 1) * 1_000_000 + n;
                        let key = keyed.then(|| format!("hosts-{user}"));
                        if keyed {
                            told.lock().unwrap().keyed.insert(user);
                        }
                        let outcome = book(&http, &base, event_id, user, key.as_deref()).await;
                        retrying = false;
                        match &outcome {
                            Ok((200, _, _)) => {}
                            Ok((409, _, v)) if v["detail"] == "Event is sold out." => {
                                record(&told, user, 1, outcome);
                                return;
                            }
                            // The first attempt with this key is still being served.
                            Ok((409, _, _)) if keyed => {
                                retrying = true;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                            _ => {
                                retrying = keyed;
                                record(&told, user, 1, outcome);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                        }
                        record(&told, user, 1, outcome);
                    }
                })
            })
            .collect();
        Sale { told, stop, tasks }
    }

    fn acks(&self) -> usize {
        self.told.lock().unwrap().acks.len()
    }

    fn unavailable(&self) -> usize {
        self.told.lock().unwrap().unavailable.len()
    }

    async fn wait_acks(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.acks() < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} acknowledged within {within:?} ({})",
                self.acks()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every client has heard "sold out"; panics after `within`.
    async fn until_sold_out(self, within: Duration) -> Told {
        let deadline = tokio::time::Instant::now() + within;
        for t in self.tasks {
            match tokio::time::timeout_at(deadline, t).await {
                Ok(r) => r.expect("client task"),
                Err(_) => {
                    self.stop.store(true, Ordering::Relaxed);
                    let told = self.told.lock().unwrap();
                    panic!(
                        "the sale did not sell out within {within:?}: {} acknowledged, {} × 503, \
                         {} lost replies",
                        told.acks.len(),
                        told.unavailable.len(),
                        told.lost.len()
                    );
                }
            }
        }
        Arc::try_unwrap(self.told)
            .expect("tasks done")
            .into_inner()
            .unwrap()
    }
}

/// Whether a 503 may have written its row: only when PostgreSQL went away while a COMMIT was on
/// the wire (`src/actors/persistence/postgres.rs`: "A group whose COMMIT was cut off may or may
/// not have committed: its clients hear 503"). Such a group was stamped before the server went
/// away: `WrittenIfBefore(t)` allows a 503's row only if its `created_at` is before `t` (Unix
/// ms, when `pg_ctl stop -m immediate` returned): a 503 for a group that began after that and
/// yet was written is a broken promise.
#[derive(Clone, Copy, PartialEq, Debug)]
enum On503 {
    NotWritten,
    WrittenIfBefore(i64),
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Never oversold; the counter is the rows; every 200 a row as told; no row without a 200 but
/// those whose reply was lost (or, with `WrittenIfBefore`, a 503's). Returns `booked_count`.
fn check_db(site: &Site, event_id: i64, told: &Told, on503: On503) -> i64 {
    assert!(
        told.other.is_empty(),
        "unexpected replies: {:?}",
        told.other
    );
    assert_eq!(
        told.unavailable_without_retry_after, 0,
        "every 503 carries Retry-After"
    );
    let (booked, capacity, _) = site.counts(event_id);
    assert!(booked <= capacity, "OVERSOLD: {booked} > {capacity}");
    let rows = site.rows(event_id);
    assert_eq!(
        rows.iter().map(|r| r.quantity).sum::<i64>(),
        booked,
        "booked_count equals the rows' seats"
    );
    let by_id: HashMap<i64, &Row> = rows.iter().map(|r| (r.id, r)).collect();
    for (id, &(user, quantity)) in &told.acks {
        let row = by_id
            .get(id)
            .unwrap_or_else(|| panic!("LOST: acknowledged booking {id} (user {user}) has no row"));
        assert_eq!(
            (row.user, row.quantity),
            (user, quantity),
            "booking {id} as acknowledged"
        );
    }
    let unacked: Vec<&Row> = rows
        .iter()
        .filter(|r| !told.acks.contains_key(&r.id))
        .collect();
    let mut per_user: HashMap<i64, usize> = HashMap::new();
    for r in &rows {
        *per_user.entry(r.user).or_default() += 1;
    }
    if let Some((user, n)) = per_user.iter().find(|(_, &n)| n > 1) {
        panic!("DOUBLE BOOKED: user {user} has {n} rows, and asked for one booking");
    }
    for r in &unacked {
        // A keyed client retried until it heard how its request ended: a row it was not told
        // about is a booking its retries did not find.
        assert!(
            !told.keyed.contains(&r.user),
            "row {r:?} of a keyed client that was never told 200 (it heard {})",
            if told.unavailable.contains(&r.user) {
                "503"
            } else {
                "nothing: lost replies"
            }
        );
        let explained = told.lost.contains(&r.user)
            || matches!(on503, On503::WrittenIfBefore(t)
                if told.unavailable.contains(&r.user) && r.created_ms <= t);
        assert!(
            explained,
            "row {r:?} was written for a client told {} ({on503:?})",
            if told.unavailable.contains(&r.user) {
                "503 (\"not written\")"
            } else {
                "nothing of it (no request of that user failed)"
            }
        );
    }
    if let (On503::WrittenIfBefore(t), false) = (on503, unacked.is_empty()) {
        let ages: Vec<i64> = unacked.iter().map(|r| t - r.created_ms).collect();
        eprintln!(
            "{} rows of clients told 503, stamped {}..{} ms before PostgreSQL's stop returned",
            unacked.len(),
            ages.iter().min().unwrap(),
            ages.iter().max().unwrap()
        );
    }
    if matches!(on503, On503::WrittenIfBefore(_)) {
        // Rows: at least the 200s; at most the 200s plus the 503s (and lost replies) whose
        // COMMIT was cut by the lost connection and went through anyway.
        assert!(rows.len() >= told.acks.len());
        assert!(rows.len() <= told.acks.len() + told.unavailable.len() + told.lost.len());
    }
    eprintln!(
        "event {event_id}: booked {booked}/{capacity}; {} × 200, {} rows ({} without a 200), \
         {} × 503, {} lost replies {:?}, {} × sold out; {} clients keyed",
        told.acks.len(),
        rows.len(),
        unacked.len(),
        told.unavailable.len(),
        told.lost.len(),
        told.lost_how,
        told.sold_out,
        told.keyed.len()
    );
    booked
}

/// Every booking of the event ends FINALIZED with a ticket code, each seat counted once.
async fn all_finalized(site: &Site, event_id: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = site.rows(event_id);
        let pending = rows.iter().filter(|r| r.status != "FINALIZED").count();
        if pending == 0 {
            assert!(rows.iter().all(|r| r.coded), "every ticket has its code");
            let seats: i64 = rows.iter().map(|r| r.quantity).sum();
            let (booked, _, finalized) = site.counts(event_id);
            assert_eq!(
                (finalized, booked),
                (seats, seats),
                "finalized_count is the FINALIZED rows' seats: each issued once"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pending} bookings still not FINALIZED after 60 s: {:?}",
            rows.iter().find(|r| r.status != "FINALIZED")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flash_sale_three_thousand_clients_five_hundred_seats() {
    let _serial = SERIAL.lock().await;
    let site = Site::start().await;
    let event_id = site.create_event("Hosts flash sale", 500).await;
    let http = common::client();
    let told: Shared = Arc::default();
    let started = Instant::now();
    join_all((1..=3000).map(|user| {
        let (http, base, told) = (http.clone(), site.lb.base(), told.clone());
        tokio::spawn(async move {
            let outcome = book(&http, &base, event_id, user, None).await;
            record(&told, user, 1, outcome);
        })
    }))
    .await
    .into_iter()
    .for_each(|r| r.expect("client"));
    let told = Arc::try_unwrap(told).unwrap().into_inner().unwrap();
    eprintln!("3000 clients answered in {:?}", started.elapsed());
    assert_eq!(
        (
            told.acks.len(),
            told.sold_out,
            told.unavailable.len(),
            told.lost.len()
        ),
        (500, 2500, 0, 0),
        "exactly 500 sold, 2500 told sold out: {:?}",
        told.other
    );
    assert_eq!(check_db(&site, event_id, &told, On503::NotWritten), 500);
    assert_eq!(site.rows(event_id).len(), 500, "exactly the 500 rows");
    all_finalized(&site, event_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_sigkilled_mid_sale() {
    let _serial = SERIAL.lock().await;
    let mut site = Site::start().await;
    let capacity = 1500;
    let event_id = site.create_event("Hosts kill", capacity).await;
    let sale = Sale::start(&site, event_id, 96, 2);
    sale.wait_acks(200, Duration::from_secs(30)).await;
    site.reps[1].kill9();
    let at_kill = sale.acks();
    let told = sale.until_sold_out(Duration::from_secs(60)).await;
    eprintln!("r1 SIGKILLed after {at_kill} acknowledged bookings");
    assert!(told.acks.len() > at_kill, "the survivors kept selling");
    for i in [0, 2] {
        assert_eq!(site.reps[i].get("/ready").await.status, 200);
    }
    assert_eq!(
        check_db(&site, event_id, &told, On503::NotWritten),
        capacity,
        "the survivors sold the rest"
    );
    all_finalized(&site, event_id).await;
}

/// r0's writer pauses before each group (the failpoint `writer-before-begin`: a slow disk, a
/// stalled thread), so r0 spends most of its turns between allocating a batch under its lease
/// and sending it to PostgreSQL. Without it that window is a fraction of a millisecond and a cut
/// at a random instant would nearly always find r0 idle or its batch already in PostgreSQL.
const R0_SLOW_WRITER_MS: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_cut_off_past_its_lease_then_reconnected() {
    let _serial = SERIAL.lock().await;
    let failpoints = format!("writer-before-begin=sleep({R0_SLOW_WRITER_MS})");
    let site = Site::start_with(&[("FAILPOINTS", failpoints.as_str())]).await;
    let capacity = 4000;
    let event_id = site.create_event("Hosts partition", capacity).await;
    // Half the clients through nginx (those it sends to r0 while r0 is cut off wait for it:
    // nginx cannot retry a POST it has sent), half straight at r1 and r2: they show that the
    // others keep selling meanwhile.
    let bases = [
        site.lb.base(),
        site.reps[1].base(),
        site.lb.base(),
        site.reps[2].base(),
    ];
    let sale = Sale::start_at(&bases, event_id, 48, 0);
    sale.wait_acks(200, Duration::from_secs(30)).await;
    let victim = &site.reps[0].host;
    // Cut r0 off (its cable's switch end down: every packet dropped, no RST) for three leases.
    // A cut that catches a batch between r0's lease and PostgreSQL holds it back; r1 and r2
    // take the lease meanwhile and raise the fence; when r0 is plugged back in, TCP's
    // retransmission delivers the stale batch, and the fenced update must refuse it. Cut again
    // if a cut caught r0 between batches (its refusal counter did not move).
    let mut refused = None;
    for attempt in 1..=4 {
        let before = site.fence_refusals(0).await.expect("r0 answers /ready");
        // Cut when r0 holds the event's lease: then it is (most likely) in its slow writer with
        // a batch allocated under that lease.
        let waited = site.wait_lease_holder(event_id, "r0").await;
        site.net.cut(victim);
        let a0 = sale.acks();
        tokio::time::sleep(Duration::from_millis(3 * LEASE_TTL_MS)).await;
        let a1 = sale.acks();
        site.net.reconnect(victim);
        let back = Instant::now();
        assert!(
            a1 > a0 + 10,
            "the other replicas kept selling while r0 was cut off ({a0} -> {a1})"
        );
        // TCP retransmits with backoff: the held-back segments may take a few seconds more.
        let mut after = before;
        while back.elapsed() < Duration::from_secs(8) {
            if let Some(n) = site.fence_refusals(0).await {
                after = n;
                if n > before {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "cut {attempt} (r0 held the lease after {waited:?}): r0's fence refusals \
             {before} -> {after} ({:?} after reconnecting); the others sold {} meanwhile",
            back.elapsed(),
            a1 - a0
        );
        if after > before {
            refused = Some(attempt);
            break;
        }
        if (sale.acks() as i64) > capacity - 2500 {
            break; // not enough left for another cut to happen mid-sale
        }
    }
    let told = sale.until_sold_out(Duration::from_secs(90)).await;
    assert_eq!(
        check_db(&site, event_id, &told, On503::NotWritten),
        capacity
    );
    all_finalized(&site, event_id).await;
    assert!(
        refused.is_some(),
        "no cut caught r0 with a batch on its way: the fence was not exercised"
    );
    let ready = site.reps[0].ready().await;
    assert_eq!(ready.status, 200, "r0 is ready again: {:?}", ready.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_mid_sale() {
    let _serial = SERIAL.lock().await;
    let mut site = Site::start().await;
    let capacity = 2000;
    let event_id = site
        .create_event("Hosts PostgreSQL restart", capacity)
        .await;
    let sale = Sale::start(&site, event_id, 96, 2);
    sale.wait_acks(200, Duration::from_secs(30)).await;

    tokio::task::block_in_place(|| site.pg.stop_immediate());
    let stopped = Instant::now();
    let stopped_ms = unix_ms();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (a0, u0) = (sale.acks(), sale.unavailable());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (a1, u1) = (sale.acks(), sale.unavailable());
    assert_eq!(a0, a1, "nothing is acknowledged while PostgreSQL is down");
    assert!(u1 > u0, "clients are told 503 while PostgreSQL is down");
    assert_eq!(
        sale.told.lock().unwrap().unavailable_without_retry_after,
        0,
        "every 503 carries Retry-After"
    );
    // Reads and readiness answer (503) instead of hanging while the database is away.
    for path in [format!("/event/{event_id}/stats"), "/ready".to_string()] {
        let asked = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), site.reps[1].admin_get(&path))
            .await
            .unwrap_or_else(|_| panic!("{path} hangs while PostgreSQL is down"));
        eprintln!(
            "{path} while PostgreSQL is down: {} in {:?}",
            r.status,
            asked.elapsed()
        );
        assert_eq!(
            r.status, 503,
            "{path} while PostgreSQL is down: {:?}",
            r.body
        );
        assert!(r.retry_after.is_some(), "{path}: 503 with Retry-After");
    }

    assert_eq!(
        sale.acks(),
        a1,
        "nothing is acknowledged while PostgreSQL is down"
    );
    tokio::task::block_in_place(|| site.pg.start_again());
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(30);
    while sale.acks() == a1 {
        assert!(
            Instant::now() < deadline,
            "the sale did not resume within 30 s of PostgreSQL's restart (down {:?})",
            restarted - stopped
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "PostgreSQL down {:?}; the sale resumed {:?} after it was back",
        restarted - stopped,
        restarted.elapsed()
    );
    let told = sale.until_sold_out(Duration::from_secs(90)).await;
    assert_eq!(
        check_db(&site, event_id, &told, On503::WrittenIfBefore(stopped_ms)),
        capacity
    );
    for r in &site.reps {
        let s = r.get(&format!("/event/{event_id}/stats")).await;
        assert_eq!(
            (s.status.as_u16(), &s.body["booked_count"]),
            (200, &json!(capacity)),
            "reads work again, without a restart of the replica"
        );
        assert_eq!(
            r.get("/ready").await.status,
            200,
            "{} ready again",
            r.host.role
        );
    }
    all_finalized(&site, event_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_empty_mid_sale() {
    let _serial = SERIAL.lock().await;
    let mut site = Site::start().await;
    let capacity = 2000;
    let event_id = site.create_event("Hosts Redis restart", capacity).await;
    let sale = Sale::start(&site, event_id, 96, 2);
    sale.wait_acks(200, Duration::from_secs(30)).await;

    site.redis.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (a0, u0) = (sale.acks(), sale.unavailable());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (a1, u1) = (sale.acks(), sale.unavailable());
    // Without Redis nobody may allocate: at most batches already past their lease finish.
    assert!(
        a1 - a0 < 50,
        "bookings stop while Redis is down ({a0} -> {a1})"
    );
    assert!(u1 > u0, "clients are told 503 while Redis is down");
    for r in &site.reps {
        let s = r.get(&format!("/event/{event_id}/stats")).await;
        assert_eq!(s.status, 200, "reads keep working without Redis");
    }

    site.redis.restart().await;
    let restarted = Instant::now();
    while sale.acks() == a1 {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "the sale did not resume within 30 s of Redis's restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "Redis down {:?}; the sale resumed {:?} after it was back",
        Duration::from_millis(1800),
        restarted.elapsed()
    );
    let told = sale.until_sold_out(Duration::from_secs(90)).await;
    assert!(
        told.acks.len() > a1,
        "the sale resumed without restarting a replica"
    );
    assert_eq!(
        check_db(&site, event_id, &told, On503::NotWritten),
        capacity
    );
    for r in &site.reps {
        assert_eq!(r.get("/ready").await.status, 200);
    }
    all_finalized(&site, event_id).await;
}

/// The fixture itself: a test that panics leaves no namespace, link or process behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_is_removed_even_when_a_test_panics() {
    let _serial = SERIAL.lock().await;
    let made = std::thread::spawn(|| {
        let made = Arc::new(Mutex::new(None));
        let seen = made.clone();
        let unwound = std::panic::catch_unwind(move || {
            let mut net = Net::new();
            let a = net.host("a");
            net.host("b");
            *seen.lock().unwrap() = Some(net.names());
            // A process inside, as a replica would be (not a child of ours: `Drop` must find it).
            let mut sleeper = a.command("sleep");
            sleeper.arg("600").stdin(std::process::Stdio::null());
            std::mem::forget(sleeper.spawn().expect("sleep in the namespace"));
            panic!("a test fails with its network up");
        });
        assert!(unwound.is_err());
        let names = made.lock().unwrap().take();
        names.expect("the network was made")
    })
    .join()
    .expect("probe thread");
    let (namespaces, links) = made;
    let listed = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    for ns in &namespaces {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "namespace {ns} left behind: {listed}"
        );
    }
    for link in &links {
        let out = std::process::Command::new("ip")
            .args(["link", "show", link])
            .output()
            .unwrap();
        assert!(!out.status.success(), "link {link} left behind");
    }
}

/// Without the privileges to build its network, a hosts test fails with the loud message — it
/// never passes. (This binary again, its bounding set without CAP_SYS_ADMIN and CAP_NET_ADMIN.)
#[test]
fn without_namespaces_the_hosts_test_fails_loudly() {
    let out = std::process::Command::new("setpriv")
        .args([
            "--bounding-set=-sys_admin,-net_admin",
            "--inh-caps=-sys_admin,-net_admin",
            "--",
        ])
        .arg(std::env::current_exe().unwrap())
        .args([
            "flash_sale_three_thousand_clients_five_hundred_seats",
            "--exact",
            "--test-threads=1",
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("setpriv (util-linux) runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "it must not pass: {text}");
    assert!(
        text.contains("THE HOSTS TEST CANNOT RUN HERE"),
        "it says why: {text}"
    );
}

/// The database host (PostgreSQL and Redis) cut off from every replica mid-sale, past the lease,
/// then reconnected. Meanwhile bookings must be answered — 503 with Retry-After, quickly
/// (DESIGN: "overload is answered quickly (503 + Retry-After), never with unbounded … latency")
/// — and not held until the network returns; after it, the sale resumes and every promise holds.
/// r0's writer is slow (`R0_SLOW_WRITER_MS`), and the cut comes while r0 holds the lease, so
/// that the cut finds r0's writer with a group on its way to PostgreSQL. (Before the connections
/// bounded their silence, r0's probes were held until TCP's retries found the network back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_database_host_cut_off_mid_sale() {
    let _serial = SERIAL.lock().await;
    let failpoints = format!("writer-before-begin=sleep({R0_SLOW_WRITER_MS})");
    let site = Site::start_with(&[("FAILPOINTS", failpoints.as_str())]).await;
    let capacity = 2000;
    let event_id = site.create_event("Hosts database cut", capacity).await;
    let sale = Sale::start(&site, event_id, 96, 2);
    sale.wait_acks(200, Duration::from_secs(30)).await;
    let db_host = site.pg.host.clone();
    site.wait_lease_holder(event_id, "r0").await;
    site.net.cut(&db_host);
    let cut_at = Instant::now();
    // Probes straight at each replica (new customers, counted with the sale's) while the
    // database host is away.
    let http = common::client();
    let mut probes = Vec::new();
    for round in 0..2i64 {
        for (i, r) in site.reps.iter().enumerate() {
            let (http, base, told) = (http.clone(), r.base(), sale.told.clone());
            probes.push(tokio::spawn(async move {
                let t = Instant::now();
                let user = 900_000_000 + round * 10 + i as i64;
                let res = book(&http, &base, event_id, user, None).await;
                let (took, status) = (t.elapsed(), res.as_ref().map(|r| r.0).ok());
                record(&told, user, 1, res);
                (round, i, Instant::now(), took, status)
            }));
        }
        tokio::time::sleep(Duration::from_millis(3000)).await;
    }
    // 11 s in all: a connection counts as lost after 5 s of silence (`store::pg_config`), the
    // writer's reconnect attempt may take its 2 s connect timeout, and r0's writer is slow: its
    // first probe is answered after ~7.7 s.
    tokio::time::sleep(Duration::from_millis(5000)).await;
    site.net.reconnect(&db_host);
    let (reconnected, cut_for) = (Instant::now(), cut_at.elapsed());
    let mut held = Vec::new();
    for p in probes {
        let (round, i, done, took, status) = p.await.unwrap();
        eprintln!("probe {round} at r{i} during the cut: {status:?} after {took:?}");
        if done > reconnected {
            held.push(format!(
                "r{i}: {status:?} after {took:?}, {:?} after the network was back",
                done - reconnected
            ));
        }
    }
    let told = sale.until_sold_out(Duration::from_secs(90)).await;
    assert!(check_db(&site, event_id, &told, On503::NotWritten) <= capacity);
    all_finalized(&site, event_id).await;
    assert!(
        held.is_empty(),
        "SERVICE: bookings sent while the database host was cut off ({cut_for:?}) were held \
         until after it was back, instead of being answered 503: {held:?}"
    );
}
