//! The PostgreSQL backend, black-box: what only a server database does — stop, crash, restart,
//! lose a connection mid-COMMIT. Every test starts its own server (`common::postgres`); the
//! suites shared with SQLite run on it through `both_backends!`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::postgres::{wait_closed, PgServer};
use common::{booking_sums, count_status, event_counts, Backend, Proc, Sql, Store, Target};
use futures::future::join_all;
use serde_json::{json, Value};

/// The harness: a private server starts, takes connections with fsync on, and is gone after drop
/// (its port closed, its directory deleted).
#[test]
fn a_private_server_starts_and_is_gone_after_drop() {
    let pg = PgServer::start();
    let (port, data) = (pg.port(), pg.data_dir().to_path_buf());
    assert_ne!(port, 5432, "never the machine's instance");
    let mut c = postgres::Client::connect(&pg.url(), postgres::NoTls).expect("connects");
    let one: i32 = c.query_one("SELECT 1", &[]).unwrap().get(0);
    assert_eq!(one, 1);
    for setting in ["fsync", "synchronous_commit"] {
        let v: String = c.query_one(&format!("SHOW {setting}"), &[]).unwrap().get(0);
        assert_eq!(v, "on", "{setting}: durability is a promise");
    }
    let db: String = c
        .query_one("SELECT current_database()", &[])
        .unwrap()
        .get(0);
    assert_eq!(db, "ticketd");
    drop(c);
    drop(pg);
    assert!(
        wait_closed(port, Duration::from_secs(5)),
        "the server stopped"
    );
    assert!(!data.exists(), "its directory was deleted");
}

const ORGANIZER: &str = "organizer-token-0123456789";

/// What a client ended with for one `Idempotency-Key`: the booking, or sold out.
#[derive(Debug, Default)]
struct Tally {
    /// Booking id by key, for the keys answered 200.
    booked: HashMap<String, (i64, i64)>,
    /// 503s seen, and how many came without `Retry-After`.
    unavailable: usize,
    without_retry_after: usize,
    /// 503s that said the outcome was unknown (a COMMIT cut off).
    unknown: usize,
}

/// `workers` customers booking through `p` until the event is sold out. Each booking has its own
/// `Idempotency-Key` and is retried with it after a 503 (or a lost connection) until it gets
/// 200 or 409, as a client should: a retry never books twice, and after an unknown outcome it
/// learns the truth.
fn customers(
    p: &Proc,
    event_id: i64,
    workers: usize,
) -> (Arc<Mutex<Tally>>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let tasks = (0..workers)
        .map(|w| {
            let (client, base, tally) = (p.client.clone(), p.base(), tally.clone());
            tokio::spawn(async move {
                for n in 0.. {
                    let key = format!("w{w}-n{n}");
                    let body = json!({"user_id": w * 100_000 + n + 1, "event_id": event_id,
                                      "quantity": 1 + n % 2});
                    loop {
                        let sent = client
                            .post(format!("{base}/book"))
                            .header("Idempotency-Key", &key)
                            .json(&body)
                            .send()
                            .await;
                        let r = match sent {
                            Ok(r) => r,
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        };
                        let status = r.status().as_u16();
                        let retry_after = r.headers().contains_key("retry-after");
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        match status {
                            200 => {
                                assert_eq!(v["user_id"], body["user_id"], "{v}");
                                let id = v["id"].as_i64().expect("id");
                                let q = v["quantity"].as_i64().expect("quantity");
                                tally.lock().unwrap().booked.insert(key, (id, q));
                                break;
                            }
                            409 if v["detail"] == "Event is sold out." => return,
                            409 => break, // not enough seats for 2: the next booking asks for 1
                            503 => {
                                {
                                    let mut t = tally.lock().unwrap();
                                    t.unavailable += 1;
                                    t.without_retry_after += usize::from(!retry_after);
                                    let detail = v["detail"].as_str().unwrap_or_default();
                                    t.unknown += usize::from(detail.contains("may or may not"));
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            other => panic!("unexpected {other}: {v}"),
                        }
                    }
                }
            })
        })
        .collect();
    (tally, tasks)
}

/// Polls `path` until it answers `status`, for at most `within`; true if it did.
async fn answers(p: &Proc, path: &str, status: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if p.admin_get(path).await.status == status {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Every key answered 200 is exactly one row, as answered; no other rows; the counters agree,
/// never past capacity; every booking is issued once.
async fn the_rows_are_the_answers(store: &Store, event_id: i64, tally: &Tally) {
    let db = store.db();
    for (key, (id, q)) in &tally.booked {
        let row = db.ints_opt(
            "SELECT quantity FROM bookings WHERE id = $1 AND event_id = $2",
            &[(*id).into(), event_id.into()],
        );
        assert_eq!(row, Some(vec![*q]), "key {key}: booking {id} as answered");
    }
    let (seats, rows) = booking_sums(&db, event_id);
    assert_eq!(
        rows as usize,
        tally.booked.len(),
        "one row per key answered 200, none without its 200"
    );
    let (booked, capacity, _) = event_counts(&db, event_id);
    assert_eq!(seats, booked, "booked_count agrees with the rows");
    assert!(booked <= capacity, "oversold: {booked} > {capacity}");
    assert!(
        common::eventually(Duration::from_secs(60), || count_status(&db, "PENDING")
            == 0)
        .await,
        "every booking ends FINALIZED"
    );
    assert_eq!(event_counts(&db, event_id).2, booked, "issued exactly once");
}

/// Issue 15's faults: PostgreSQL stopped in the middle of a sale, then started again. Meanwhile
/// bookings answer 503 with `Retry-After` (nothing hangs), reads answer 503, `/ready` says 503;
/// when the server is back everything resumes by itself, without restarting ticketd. Clients
/// retrying with their key end with exactly one booking each; nothing acknowledged is lost,
/// nothing oversold, every booking issued once. Played twice: a clean stop (`-m fast`) and a
/// crash (`-m immediate`, recovery from the WAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_mid_sale_answers_503_and_resumes_by_itself() {
    for crash in [false, true] {
        let _on = Backend::Postgres.select();
        let mut store = Store::fresh();
        let env = [("ADMIN_TOKEN", ORGANIZER), ("FINALIZE_DELAY_MS", "20")];
        let p = Proc::start(&store, &env).await;
        let event_id = p.create_event("Server restart", 1_500).await;
        let (tally, tasks) = customers(&p, event_id, 32);
        while tally.lock().unwrap().booked.len() < 150 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let some_booking = *tally.lock().unwrap().booked.values().next().unwrap();
        if crash {
            store.pg().crash();
        } else {
            store.pg().stop();
        }
        // Down: answers come quickly and say so.
        assert!(
            answers(&p, "/ready", 503, Duration::from_secs(5)).await,
            "/ready says 503 while the database is down"
        );
        let started = Instant::now();
        let r = p.admin_get(&format!("/book/{}", some_booking.0)).await;
        assert_eq!(r.status, 503, "a read fails cleanly: {:?}", r.body);
        assert!(r.retry_after.is_some());
        assert!(started.elapsed() < Duration::from_secs(5), "and soon");
        let during = tally.lock().unwrap().booked.len();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        {
            let t = tally.lock().unwrap();
            assert!(
                t.unavailable > 0,
                "bookings were answered 503 while it was down"
            );
            assert_eq!(t.without_retry_after, 0, "every 503 says when to retry");
            assert!(
                t.booked.len() <= during + 32,
                "nothing sells without the database"
            );
        }
        // Back: everything resumes by itself.
        store.pg().restart();
        assert!(
            answers(&p, "/ready", 200, Duration::from_secs(15)).await,
            "/ready says 200 again once the database is back"
        );
        // The sale ends (sold out) within a minute of the server's return, or it did not resume.
        let ended = tokio::time::timeout(Duration::from_secs(60), join_all(tasks)).await;
        assert!(
            ended.is_ok(),
            "the sale resumed and sold out after the restart"
        );
        ended.unwrap().into_iter().for_each(|t| t.unwrap());
        let tally = std::mem::take(&mut *tally.lock().unwrap());
        assert!(tally.booked.len() > during, "the sale resumed");
        let r = p.admin_get(&format!("/book/{}", some_booking.0)).await;
        assert_eq!(r.status, 200, "reads resumed: {:?}", r.body);
        the_rows_are_the_answers(&store, event_id, &tally).await;
        let (booked, capacity, _) = event_counts(&store.db(), event_id);
        assert_eq!(booked, capacity, "sold out (crash: {crash})");
        eprintln!(
            "crash={crash}: {} bookings, {} 503s ({} with an unknown outcome)",
            tally.booked.len(),
            tally.unavailable,
            tally.unknown
        );
    }
}

/// A COMMIT whose answer is lost (failpoint `pg-commit-answer-lost`: the group commits, then the
/// server ends the writer's session before the writer reads the answer). The writer cannot know
/// whether it committed: the client is told exactly that (503, `Retry-After`), and its retry
/// with the same `Idempotency-Key` gets the truth — here, the booking that was written, replayed,
/// and there is one. The writer reconnects by itself for the next bookings.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_whose_answer_is_lost_is_answered_unknown_and_the_retry_tells() {
    let _on = Backend::Postgres.select();
    let store = Store::fresh();
    let p = Proc::start(&store, &[("ADMIN_TOKEN", ORGANIZER)]).await;
    let event_id = p.create_event("Lost answer", 10).await;
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait().await, Some(0));

    // The first group of this process is the booking's.
    let env = [
        ("ADMIN_TOKEN", ORGANIZER),
        ("FAILPOINTS", "pg-commit-answer-lost=1*return"),
    ];
    let p = Proc::start(&store, &env).await;
    let body = json!({"user_id": 7, "event_id": event_id, "quantity": 3});
    let book = || {
        common::send(
            p.client
                .post(format!("{}/book", p.base()))
                .header("Idempotency-Key", "order-7")
                .json(&body),
        )
    };
    let first = book().await;
    assert_eq!(first.status, 503, "{:?}", first.body);
    assert!(first.retry_after.is_some());
    assert_eq!(
        first.body["detail"],
        "The database connection was lost while this request was being committed: it may or \
         may not have taken effect. Retry with the same Idempotency-Key to learn which."
    );
    let db = store.db();
    assert_eq!(
        booking_sums(&db, event_id),
        (3, 1),
        "the COMMIT had gone through"
    );

    let mut retry = book().await;
    for _ in 0..50 {
        if retry.status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        retry = book().await;
    }
    assert_eq!(retry.status, 200, "{:?}", retry.body);
    assert_eq!(retry.body["quantity"], 3);
    let id = db.ints("SELECT id FROM bookings WHERE user_id = 7", &[])[0];
    assert_eq!(
        retry.body["id"], id,
        "the retry is told the booking that was written"
    );
    assert_eq!(booking_sums(&db, event_id), (3, 1), "and there is one");

    // The writer is connected again: the next customer books the rest, and no more.
    let r = p
        .post(
            "/book",
            json!({"user_id": 8, "event_id": event_id, "quantity": 7}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = p
        .post("/book", json!({"user_id": 9, "event_id": event_id}))
        .await;
    assert_eq!(r.status, 409);
    assert_eq!(event_counts(&db, event_id).0, 10);
}
