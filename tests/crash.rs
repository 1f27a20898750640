//! The real binary as a child process: SIGKILL mid-sale and restart on the same file; SIGTERM
//! during a burst. What a client was told (200) must be what the database holds.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{booking_sums, codes, count_status, event_counts, Proc, Sql, Store, Target};
use serde_json::{json, Value};
use ticketd::ticket::{TicketFacts, TicketSigner};

/// Acknowledged bookings, by id.
type Acks = Arc<Mutex<HashMap<i64, Value>>>;

/// `workers` clients booking in a loop over `events` until told to stop or the server goes away;
/// a sold-out event (409) moves on to the next. Returns the acknowledged bookings and the number
/// of 503s.
fn hammer(
    p: &impl Target,
    events: &[i64],
    workers: usize,
    stop: Arc<AtomicBool>,
) -> (Acks, Arc<AtomicUsize>, Vec<tokio::task::JoinHandle<()>>) {
    let acks: Acks = Arc::default();
    let busy = Arc::new(AtomicUsize::new(0));
    let tasks = (0..workers)
        .map(|w| {
            let (client, base, acks, busy, stop) = (p.http().clone(), p.base(), acks.clone(), busy.clone(), stop.clone());
            let events = events.to_vec();
            tokio::spawn(async move {
                let mut n = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let event_id = events[(w + n as usize) % events.len()];
                    let body = json!({"user_id": (w as i64) * 100_000 + n, "event_id": event_id, "quantity": 1 + n % 3});
                    let Ok(r) = client.post(format!("{base}/book")).json(&body).send().await else { break };
                    let status = r.status().as_u16();
                    let Ok(v) = r.json::<Value>().await else { break };
                    match status {
                        200 => {
                            assert_eq!(v["user_id"], body["user_id"]);
                            acks.lock().unwrap().insert(v["id"].as_i64().unwrap(), v);
                        }
                        409 => {} // sold out (a small event): on to the next event
                        503 => {
                            busy.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        other => panic!("unexpected {other}: {v}"),
                    }
                }
            })
        })
        .collect();
    (acks, busy, tasks)
}

async fn wait_for_acks(acks: &Acks, n: usize) {
    for _ in 0..600 {
        if acks.lock().unwrap().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fewer than {n} bookings were acknowledged");
}

/// Every acknowledged booking is in the file, as it was acknowledged; the counters agree with
/// the rows and never pass capacity.
fn assert_acks_committed(db: &impl Sql, events: &[i64], acks: &HashMap<i64, Value>) {
    for (id, v) in acks {
        let row = db.ints_opt(
            "SELECT event_id, user_id, quantity FROM bookings WHERE id = $1",
            &[(*id).into()],
        );
        let expect = vec![
            v["event_id"].as_i64().unwrap(),
            v["user_id"].as_i64().unwrap(),
            v["quantity"].as_i64().unwrap(),
        ];
        assert_eq!(
            row,
            Some(expect),
            "acknowledged booking {id} is committed as acknowledged"
        );
    }
    for &event_id in events {
        let (booked, capacity, _) = event_counts(db, event_id);
        assert_eq!(
            booking_sums(db, event_id).0,
            booked,
            "booked_count agrees with the rows"
        );
        assert!(booked <= capacity);
    }
}

async fn all_finalized(store: &Store, timeout: Duration) -> bool {
    let db = store.db();
    common::eventually(timeout, || count_status(&db, "PENDING") == 0).await
}

both_backends! {
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_sale_loses_no_acknowledged_booking() {
    let store = Store::fresh();
    // Issuance is slow here, so the kill finds bookings both issued and not yet issued.
    let p = Proc::start(&store, &[("FINALIZE_DELAY_MS", "300")]).await;
    let event_id = p.create_event("Crash sale", 1_000_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, _, tasks) = hammer(&p, &[event_id], 48, stop.clone());
    wait_for_acks(&acks, 300).await;
    tokio::time::sleep(Duration::from_millis(400)).await; // let some tickets be issued
    p.signal(libc::SIGKILL);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(p.wait().await, None, "killed by the signal");
    let acks = acks.lock().unwrap().clone();

    let db = store.db();
    assert_acks_committed(&db, &[event_id], &acks);
    let issued_before = codes(&db);
    assert!(
        count_status(&db, "PENDING") > 0,
        "the kill caught bookings not yet issued"
    );
    drop(db);

    // Restart on the same database: the PENDING bookings are picked up and issued.
    let p = Proc::start(&store, &[("FINALIZE_DELAY_MS", "20")]).await;
    assert!(
        all_finalized(&store, Duration::from_secs(60)).await,
        "every booking ends FINALIZED"
    );
    let db = store.db();
    assert_acks_committed(&db, &[event_id], &acks);
    let (booked, _, finalized) = event_counts(&db, event_id);
    assert_eq!(
        finalized, booked,
        "each seat counted as issued exactly once"
    );
    let after = codes(&db);
    for (id, code) in &issued_before {
        assert_eq!(after.get(id), Some(code), "an issued code never changes");
    }
    let signer = TicketSigner::new(common::TEST_KEY.as_bytes());
    let rows: Vec<(TicketFacts, String)> = db
        .rows(
            "SELECT id, event_id, user_id, quantity, ticket_code FROM bookings",
            &[],
        )
        .into_iter()
        .map(|r| {
            (
                TicketFacts {
                    booking_id: r[0].int(),
                    event_id: r[1].int(),
                    user_id: r[2].int(),
                    quantity: r[3].int(),
                },
                r[4].text(),
            )
        })
        .collect();
    for (facts, code) in rows {
        assert!(
            signer.verify(&code, &facts),
            "booking {} has a genuine code",
            facts.booking_id
        );
    }
    // It keeps selling where it stopped.
    let r = p
        .post("/book", json!({"user_id": 1, "event_id": event_id}))
        .await;
    assert_eq!(r.status, 200);
}

/// SIGTERM while 64 clients book across 16 events: every acknowledged booking is committed, the
/// process exits 0, and no accepted request is answered 503. Event actors live on the HTTP
/// workers, which stop one by one: a request waiting in an actor whose worker stopped first is
/// re-routed to a live one, never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_a_burst_commits_every_acknowledged_booking() {
    graceful_stop_during_a_burst(libc::SIGTERM).await;
}

/// The same for SIGINT (Ctrl-C on `make run`): actix-server treats it as a *forced* stop, which
/// cut accepted requests whose bookings were committed without their 200; ticketd handles the
/// signal itself, as gracefully as SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigint_during_a_burst_commits_every_acknowledged_booking() {
    graceful_stop_during_a_burst(libc::SIGINT).await;
}
}

async fn graceful_stop_during_a_burst(signal: i32) {
    let store = Store::fresh();
    let p = Proc::start(&store, &[("FINALIZE_DELAY_MS", "1000")]).await;
    let mut events = Vec::new();
    for i in 0..16 {
        events.push(
            p.create_event(&format!("Shutdown sale {i}"), 1_000_000)
                .await,
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, unavailable, tasks) = hammer(&p, &events, 64, stop.clone());
    wait_for_acks(&acks, 200).await;
    p.signal(signal);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(p.wait().await, Some(0), "a graceful stop exits 0");
    assert_eq!(
        unavailable.load(Ordering::Relaxed),
        0,
        "every request accepted before the stop is answered for real"
    );
    // A graceful stop answers what it committed: no row without its 200.
    assert_acked_exactly(
        &store.db(),
        &events,
        &acks,
        "every committed booking was answered",
    );
}

/// Every 200 is committed and every committed booking got its 200: the rows are the acks.
fn assert_acked_exactly(db: &impl Sql, events: &[i64], acks: &Acks, what: &str) {
    let acks = acks.lock().unwrap().clone();
    assert_acks_committed(db, events, &acks);
    let rows: i64 = events.iter().map(|&e| booking_sums(db, e).1).sum();
    assert_eq!(rows as usize, acks.len(), "{what}");
}

both_backends! {
/// `make cluster` (scripts/cluster.sh: Redis, three replicas, nginx in front; with `DB=postgres`
/// its own PostgreSQL) stopped by Ctrl-C under load, as a terminal sends it: SIGINT to the
/// script's whole process group. Every booking committed got its 200 through nginx, every 200 is
/// committed, no event is oversold (two small ones sell out meanwhile), and nothing is left
/// running. Before, the group's SIGINT reached nginx too (its fast shutdown cut the clients whose
/// bookings the replicas were committing), and the script's cleanup signalled the replicas a
/// second time (a forced stop). On PostgreSQL the server stops last, its data kept: the test
/// starts it again on that data to read what the replicas committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ctrl_c_on_make_cluster_answers_every_committed_booking() {
    let script = ClusterScript::start().await;
    let mut events = Vec::new();
    for i in 0..6 {
        events.push(
            script
                .create_event(&format!("Cluster sale {i}"), 1_000_000)
                .await,
        );
    }
    let small = [
        script.create_event("Cluster small 0", 300).await,
        script.create_event("Cluster small 1", 300).await,
    ];
    events.extend(small);
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, _busy, tasks) = hammer(&script, &events, 48, stop.clone());
    // Sold out: fewer seats left than the largest quantity asked (3).
    let seats_of = |e: i64| -> i64 {
        let acks = acks.lock().unwrap();
        acks.values()
            .filter(|v| v["event_id"] == e)
            .map(|v| v["quantity"].as_i64().unwrap())
            .sum()
    };
    let busy = common::eventually(Duration::from_secs(120), || {
        acks.lock().unwrap().len() >= 300 && small.iter().all(|&e| seats_of(e) > 297)
    })
    .await;
    assert!(busy, "300 bookings acknowledged, both small events sold out");
    script.ctrl_c();
    for t in tasks {
        t.await.unwrap();
    }
    let mut script = script;
    assert_eq!(script.wait().await, Some(0), "the script stops cleanly");
    for (port, what) in script.ports() {
        assert!(
            common::postgres::wait_closed(port, Duration::from_secs(5)),
            "{what} is still listening on {port} after the script exited"
        );
    }
    let db = script.left();
    assert_acked_exactly(
        &db.db,
        &events,
        &acks,
        "every booking committed during Ctrl-C was answered through nginx",
    );
    for e in small {
        let (booked, capacity, _) = event_counts(&db.db, e);
        assert!(capacity - booked < 3, "event {e} sold out: {booked} of {capacity}");
    }
}
}

/// scripts/cluster.sh running the debug binary, in a process group of its own (the test's
/// Ctrl-C must not reach the test runner), on free ports, on the test's backend.
struct ClusterScript {
    child: std::process::Child,
    port: u16,
    redis_port: u16,
    /// The script's own PostgreSQL (`DB=postgres`).
    pg_port: Option<u16>,
    client: reqwest::Client,
    admin: String,
    dir: tempfile::TempDir,
}

impl Target for ClusterScript {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn http(&self) -> &reqwest::Client {
        &self.client
    }
    fn admin_token(&self) -> Option<&str> {
        Some(&self.admin)
    }
}

/// What the script left: its database, to read.
struct Left {
    db: common::TestDb,
    /// The cluster's PostgreSQL, started again on its data.
    _pg: Option<common::postgres::PgServer>,
    /// The SQLite file's directory.
    _dir: Option<tempfile::TempDir>,
}

impl ClusterScript {
    async fn start() -> Self {
        use std::os::unix::process::CommandExt;
        // nginx on `port`, the replicas on the three ports after it: all four must be free.
        let port = loop {
            let p = common::free_port();
            if p < 65000
                && (1..=3).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok())
            {
                break p;
            }
        };
        // The script chowns it to `postgres` (when we are root) and keeps the server's data in it.
        let dir = tempfile::Builder::new()
            .prefix("ticketd-cluster-")
            .tempdir()
            .unwrap();
        let redis_port = common::free_port();
        let pg_port =
            (common::Backend::current() == common::Backend::Postgres).then(common::free_port);
        let admin = "cluster-script-organizer-token".to_string();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(script)
            .env("TICKETD_BIN", env!("CARGO_BIN_EXE_ticketd"))
            .env("PORT", port.to_string())
            .env("REDIS_PORT", redis_port.to_string())
            .env("ADMIN_TOKEN", &admin)
            .env("TICKET_KEY", common::TEST_KEY)
            .env("FINALIZE_DELAY_MS", "1000")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .process_group(0);
        match pg_port {
            None => cmd.env(
                "DATABASE_URL",
                format!("sqlite://{}", dir.path().join("cluster.db").display()),
            ),
            Some(pg_port) => cmd
                .env("DB", "postgres")
                .env("PG_DIR", dir.path())
                .env("PG_PORT", pg_port.to_string())
                .env_remove("DATABASE_URL"),
        };
        // A terminal's foreground job takes SIGINT: so does the script, even when this test runs
        // where SIGINT is ignored (a background job of a script), which bash could not trap.
        // SAFETY: signal() is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                libc::signal(libc::SIGQUIT, libc::SIG_DFL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("run scripts/cluster.sh");
        let s = ClusterScript {
            child,
            port,
            redis_port,
            pg_port,
            client: common::client(),
            admin,
            dir,
        };
        // Up when nginx reaches all three replicas (after initdb and the server's start).
        let ready = common::eventually(Duration::from_secs(180), || {
            (1..=3).all(|i| std::net::TcpStream::connect(("127.0.0.1", port + i)).is_ok())
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
        assert!(ready, "the cluster script did not come up");
        s
    }

    /// What a terminal does on Ctrl-C: SIGINT to the foreground process group.
    fn ctrl_c(&self) {
        let rc = unsafe { libc::kill(-(self.child.id() as i32), libc::SIGINT) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// The ports of everything the script started.
    fn ports(&self) -> Vec<(u16, &'static str)> {
        let mut ports = vec![
            (self.port, "nginx"),
            (self.port + 1, "replica 1"),
            (self.port + 2, "replica 2"),
            (self.port + 3, "replica 3"),
            (self.redis_port, "redis"),
        ];
        ports.extend(self.pg_port.map(|p| (p, "PostgreSQL")));
        ports
    }

    /// Waits for the script to exit; its exit code.
    async fn wait(&mut self) -> Option<i32> {
        common::wait_child(&mut self.child, "the script").await
    }

    /// The database the script left (PostgreSQL: its server started again on the data).
    fn left(mut self) -> Left {
        let dir = tempfile::Builder::new().tempdir().unwrap();
        let dir = std::mem::replace(&mut self.dir, dir);
        let left = match self.pg_port {
            None => Left {
                db: common::TestDb::Sqlite(common::open_db(&dir.path().join("cluster.db"))),
                _pg: None,
                _dir: Some(dir),
            },
            Some(port) => {
                let pg = common::postgres::PgServer::adopt(dir, port);
                Left {
                    db: common::TestDb::Postgres(Mutex::new(Some(common::connect_pg(&pg.url())))),
                    _pg: Some(pg),
                    _dir: None,
                }
            }
        };
        left
    }
}

impl Drop for ClusterScript {
    /// A failed test: the script's own cleanup stops everything, its PostgreSQL too.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

both_backends! {
/// Promise 2, deterministically: the writer's COMMIT fails for twenty groups in a row (failpoint
/// `writer-commit`, what a full disk or an I/O error does) while 64 clients book. Every client of
/// a failed group gets 503 and nothing of it is written; every 200 has its row; every row was
/// answered 200. A writer that answered before COMMIT returned would have told the clients of the
/// failed groups 200 for rows that do not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_commit_acknowledges_nothing() {
    let store = Store::fresh();
    let p = Proc::start(&store, &[]).await;
    let event_id = p.create_event("Failing disk", 1_000_000).await;
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait().await, Some(0));

    // Issuance waits a minute, so every group of this test is a group of bookings.
    let p = Proc::start(
        &store,
        &[
            ("FAILPOINTS", "writer-commit=20*return"),
            ("FINALIZE_DELAY_MS", "60000"),
        ],
    )
    .await;
    let tasks: Vec<_> = (0..64i64)
        .map(|w| {
            let (client, base) = (p.client.clone(), p.base());
            tokio::spawn(async move {
                let (mut acked, mut refused) = (Vec::new(), Vec::new());
                for n in 0..25i64 {
                    let user_id = w * 1000 + n + 1;
                    let body =
                        json!({"user_id": user_id, "event_id": event_id, "quantity": 1 + n % 2});
                    let r = common::send(client.post(format!("{base}/book")).json(&body)).await;
                    match r.status.as_u16() {
                        200 => acked.push(r.body),
                        503 => {
                            assert!(r.retry_after.is_some(), "503 says when to retry");
                            refused.push(user_id);
                        }
                        other => panic!("unexpected {other}: {:?}", r.body),
                    }
                }
                (acked, refused)
            })
        })
        .collect();
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    for t in tasks {
        let (a, r) = t.await.unwrap();
        acked.extend(a);
        refused.extend(r);
    }
    assert!(
        refused.len() >= 20,
        "each of the 20 failed groups refused its clients ({} refused)",
        refused.len()
    );
    assert!(!acked.is_empty(), "the writer recovered after the failures");

    let db = store.db();
    let acks: HashMap<i64, Value> = acked
        .into_iter()
        .map(|v| (v["id"].as_i64().unwrap(), v))
        .collect();
    assert_acks_committed(&db, &[event_id], &acks);
    let (seats, rows) = booking_sums(&db, event_id);
    assert_eq!(
        rows as usize,
        acks.len(),
        "every row written was answered 200"
    );
    let acked_seats: i64 = acks.values().map(|v| v["quantity"].as_i64().unwrap()).sum();
    assert_eq!(seats, acked_seats);
    for user_id in refused {
        let n = db.ints(
            "SELECT COUNT(*) FROM bookings WHERE user_id = $1",
            &[user_id.into()],
        )[0];
        assert_eq!(n, 0, "user {user_id} was answered 503 but has a booking");
    }
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_configuration_stops_the_start_with_one_line() {
    for (name, value) in [
        ("PORT", "eighty"),
        ("FINALIZER_WORKERS", "0"),
        ("FINALIZE_DELAY_MS", "-1"),
        ("DATABASE_URL", "mysql://x"),
        ("RUST_LOG", "[[["),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ticketd"))
            .env_clear()
            .env(name, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{name}: one line: {err}");
        assert!(err.contains(name), "{name} is named: {err}");
    }
}
