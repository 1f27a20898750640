//! `make cluster DB=postgres` (scripts/cluster.sh: its own PostgreSQL, Redis, three replicas,
//! nginx in front) stopped by Ctrl-C under load, as a terminal sends it: SIGINT to the script's
//! whole process group. Every 200 answered through nginx is a row of the cluster's PostgreSQL,
//! every row was answered 200, no event is oversold, and nothing is left running: the server
//! stops last, after the replicas, and its data survives for the next run.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::postgres::wait_closed;
use common::{booking_sums, event_counts, Target, TestDb};
use serde_json::{json, Value};

/// Acknowledged bookings, by id.
type Acks = Arc<Mutex<HashMap<i64, Value>>>;
/// The 409s (sold out) answered for each of the two small events.
type SoldOut = Arc<[AtomicUsize; 2]>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ctrl_c_on_make_cluster_db_postgres_answers_every_committed_booking() {
    // The script chowns it to `postgres` (when we are root) and keeps the server's data in it.
    let pg_dir = tempfile::Builder::new()
        .prefix("ticketd-cluster-pg-")
        .tempdir()
        .unwrap();
    let script = ClusterScript::start(pg_dir.path()).await;
    // Big events, and two small ones the replicas sell out between them through one lease.
    let mut events = Vec::new();
    for i in 0..6 {
        events.push(
            script
                .create_event(&format!("PG cluster sale {i}"), 1_000_000)
                .await,
        );
    }
    let small = [
        script.create_event("PG cluster small 0", 300).await,
        script.create_event("PG cluster small 1", 300).await,
    ];
    events.extend(small);

    let stop = Arc::new(AtomicBool::new(false));
    let (acks, sold_out, tasks) = sell(&script, &events, &small, 48, stop.clone());
    let busy = common::eventually(Duration::from_secs(120), || {
        acks.lock().unwrap().len() >= 300 && sold_out.iter().all(|n| n.load(Ordering::Relaxed) > 0)
    })
    .await;
    assert!(
        busy,
        "300 bookings acknowledged and both small events sold out ({} acks)",
        acks.lock().unwrap().len()
    );
    script.ctrl_c();
    for t in tasks {
        t.await.unwrap();
    }
    let (port, redis_port, pg_port) = (script.port, script.redis_port, script.pg_port);
    let exit = script.wait().await;
    assert_eq!(exit, Some(0), "the script stops cleanly");
    for (p, what) in [
        (port, "nginx"),
        (port + 1, "replica 1"),
        (port + 2, "replica 2"),
        (port + 3, "replica 3"),
        (redis_port, "redis"),
        (pg_port, "PostgreSQL"),
    ] {
        assert!(
            wait_closed(p, Duration::from_secs(5)),
            "{what} is still listening on {p} after the script exited"
        );
    }

    // The cluster's server, started again on its data: what the replicas committed.
    let pg = PgAgain::start(pg_dir.path(), pg_port);
    let db = TestDb::Postgres(Mutex::new(Some(common::connect_pg(&pg.url()))));
    let acks = acks.lock().unwrap().clone();
    let rows = bookings(&pg.url());
    for (id, v) in &acks {
        let expect = (
            v["event_id"].as_i64().unwrap(),
            v["user_id"].as_i64().unwrap(),
            v["quantity"].as_i64().unwrap(),
        );
        assert_eq!(
            rows.get(id),
            Some(&expect),
            "acknowledged booking {id} is committed as acknowledged"
        );
    }
    assert_eq!(
        rows.len(),
        acks.len(),
        "every booking committed during Ctrl-C was answered through nginx"
    );
    for &event_id in &events {
        let (booked, capacity, _) = event_counts(&db, event_id);
        assert_eq!(
            booking_sums(&db, event_id).0,
            booked,
            "booked_count of event {event_id} agrees with its rows"
        );
        assert!(booked <= capacity, "event {event_id} oversold");
    }
    eprintln!(
        "{} bookings acknowledged, all committed; 409s on the small events: {:?}",
        acks.len(),
        sold_out
    );
    for &event_id in &small {
        let (booked, capacity, _) = event_counts(&db, event_id);
        // Sold out: what is left is less than the largest quantity asked (3).
        assert!(
            capacity - booked < 3,
            "small event {event_id}: {booked} of {capacity} seats sold after its 409s"
        );
    }
}

/// `workers` clients booking in a loop (quantity 1 to 3) over `events` until told to stop or
/// the cluster goes away; a 409 (sold out) moves on to the next event. Returns the acknowledged
/// bookings and, per event of `small`, the number of 409s.
fn sell(
    p: &impl Target,
    events: &[i64],
    small: &[i64; 2],
    workers: usize,
    stop: Arc<AtomicBool>,
) -> (Acks, SoldOut, Vec<tokio::task::JoinHandle<()>>) {
    let acks: Acks = Arc::default();
    let sold_out: SoldOut = Arc::new(Default::default());
    let tasks = (0..workers)
        .map(|w| {
            let (client, base) = (p.http().clone(), p.base());
            let (acks, sold_out, stop) = (acks.clone(), sold_out.clone(), stop.clone());
            let (events, small) = (events.to_vec(), *small);
            tokio::spawn(async move {
                let mut n = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let event_id = events[(w + n as usize) % events.len()];
                    let body = json!({
                        "user_id": (w as i64) * 100_000 + n,
                        "event_id": event_id,
                        "quantity": 1 + n % 3,
                    });
                    let Ok(r) = client.post(format!("{base}/book")).json(&body).send().await else {
                        break;
                    };
                    let status = r.status().as_u16();
                    let Ok(v) = r.json::<Value>().await else {
                        break;
                    };
                    match status {
                        200 => {
                            assert_eq!(v["user_id"], body["user_id"]);
                            acks.lock().unwrap().insert(v["id"].as_i64().unwrap(), v);
                        }
                        409 => {
                            let i = small.iter().position(|&e| e == event_id);
                            let i = i.unwrap_or_else(|| panic!("409 on a big event: {v}"));
                            sold_out[i].fetch_add(1, Ordering::Relaxed);
                        }
                        503 => tokio::time::sleep(Duration::from_millis(5)).await,
                        other => panic!("unexpected {other}: {v}"),
                    }
                }
            })
        })
        .collect();
    (acks, sold_out, tasks)
}

/// Every booking row: id -> (event_id, user_id, quantity).
fn bookings(url: &str) -> HashMap<i64, (i64, i64, i64)> {
    let url = url.to_string();
    // The blocking client runs a runtime of its own: not on a thread of the test's.
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connects");
        c.query("SELECT id, event_id, user_id, quantity FROM bookings", &[])
            .expect("bookings")
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
            .collect()
    })
    .join()
    .expect("query thread")
}

/// scripts/cluster.sh with `DB=postgres`, running the debug binary, in a process group of its
/// own (the test's Ctrl-C must not reach the test runner), on free ports.
struct ClusterScript {
    child: std::process::Child,
    port: u16,
    redis_port: u16,
    pg_port: u16,
    client: reqwest::Client,
    admin: String,
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

impl ClusterScript {
    async fn start(pg_dir: &Path) -> Self {
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
        let (redis_port, pg_port) = (common::free_port(), common::free_port());
        let admin = "cluster-script-organizer-token".to_string();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(script)
            .env("DB", "postgres")
            .env("PG_DIR", pg_dir)
            .env("PG_PORT", pg_port.to_string())
            .env_remove("DATABASE_URL")
            .env("TICKETD_BIN", env!("CARGO_BIN_EXE_ticketd"))
            .env("PORT", port.to_string())
            .env("REDIS_PORT", redis_port.to_string())
            .env("ADMIN_TOKEN", &admin)
            .env("TICKET_KEY", common::TEST_KEY)
            .env("FINALIZE_DELAY_MS", "1000")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .process_group(0);
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

    async fn wait(mut self) -> Option<i32> {
        common::wait_child(&mut self.child, "the script").await
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

/// The cluster's PostgreSQL started again on the data the script left (`$PG_DIR/data`), as the
/// script starts it; stopped on drop.
struct PgAgain {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl PgAgain {
    fn start(dir: &Path, port: u16) -> PgAgain {
        let pg = PgAgain {
            bin: pg_bin(),
            dir: dir.to_path_buf(),
            port,
        };
        let opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}'",
            dir.display()
        );
        let data = dir.join("data");
        let log = dir.join("again.log");
        let ok = pg.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            data.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-o",
            &opts,
        ]);
        assert!(
            ok,
            "the cluster's PostgreSQL starts again on its data: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        pg
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/ticketd", self.port)
    }

    /// Runs pg_ctl, as `postgres` when we are root (as the script does).
    fn pg_ctl(&self, args: &[&str]) -> bool {
        let pg_ctl = self.bin.join("pg_ctl");
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            std::process::Command::new(pg_ctl)
        };
        cmd.args(args)
            .current_dir(&self.dir)
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for PgAgain {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        self.pg_ctl(&["stop", "-w", "-m", "fast", "-D", data.to_str().unwrap()]);
    }
}

/// The server binaries, found as tests/common/postgres.rs and the script find them: `PG_BIN`,
/// else the newest `/usr/lib/postgresql/*/bin`, else `pg_config --bindir`.
fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BIN") {
        return PathBuf::from(dir);
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .max();
    if let Some((_, bin)) = newest {
        return bin;
    }
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("no PostgreSQL server found: install Debian's `postgresql` (make deps)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
