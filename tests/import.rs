//! `ticketd import --from sqlite://… --to postgres://…`: a sale run on SQLite goes on on
//! PostgreSQL where it stood — every booking with its status and ticket code, codes that verify,
//! secrets that open their bookings (the stored ticket key came along), keys that replay, limits
//! that count the old seats, fresh ids for new bookings and no oversell — and an import never
//! fills a database that is not empty, nor survives a source that breaks the schema's rules.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::postgres::PgServer;
use common::{connect_pg, open_db, send, Proc, Resp, Target};
use serde_json::{json, Value};

const ADMIN: &str = "organizer-token-0123456789";
const SHOP: &str = "shop-login-secret-0123456789";

/// A customer token of the shop (CUSTOMER_JWT_SECRET) for `user`.
fn token(user: i64) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let exp = chrono::Utc::now().timestamp() + 3600;
    encode(
        &Header::default(),
        &json!({"sub": user.to_string(), "exp": exp}),
        &EncodingKey::from_secret(SHOP.as_bytes()),
    )
    .expect("a token")
}

/// The binary on `database_url`, WITHOUT `TICKET_KEY` (unlike `Proc::start`'s default): the key
/// that signs codes and secrets is the one stored in the database — generated on SQLite, imported
/// into PostgreSQL — so the test sees whether it came along.
async fn start(database_url: &str, finalize_delay_ms: u64) -> Proc {
    let delay = finalize_delay_ms.to_string();
    let env = [
        ("TICKET_KEY", ""),
        ("ADMIN_TOKEN", ADMIN),
        ("CUSTOMER_JWT_SECRET", SHOP),
        ("FINALIZE_DELAY_MS", delay.as_str()),
        ("SWEEP_INTERVAL_MS", "200"),
    ];
    Proc::start(database_url, &env).await
}

/// A graceful stop (SIGTERM): every committed booking stays as it is.
async fn stop(p: Proc) {
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait().await, Some(0), "ticketd stopped cleanly");
}

/// `ticketd import` as an operator runs it.
async fn import(from: &str, to: &str) -> Output {
    let (from, to) = (from.to_string(), to.to_string());
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ticketd"))
            .env_clear()
            .args(["import", "--from", &from, "--to", &to])
            .output()
            .expect("run ticketd import")
    })
    .await
    .expect("import thread")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn create_event(p: &Proc, title: &str, capacity: i64, limit: Option<i64>) -> i64 {
    let mut body = json!({"title": title, "capacity": capacity});
    if let Some(l) = limit {
        body["max_per_user"] = json!(l);
    }
    let req = p.http().post(format!("{}/event", p.base())).json(&body);
    let r = send(p.as_organizer(req)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["id"].as_i64().expect("an id")
}

/// `POST /event` as the organizer, with an `Idempotency-Key`.
async fn create_event_keyed(p: &Proc, body: Value, key: &str) -> Resp {
    let req = p
        .http()
        .post(format!("{}/event", p.base()))
        .header("idempotency-key", key)
        .json(&body);
    send(p.as_organizer(req)).await
}

async fn book(p: &Proc, user: i64, event: i64, quantity: i64, key: Option<&str>) -> Resp {
    let mut req = p
        .http()
        .post(format!("{}/book", p.base()))
        .bearer_auth(token(user))
        .json(&json!({"user_id": user, "event_id": event, "quantity": quantity}));
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    send(req).await
}

/// A booking made in the test: its id and secret.
#[derive(Debug, Clone)]
struct Made {
    id: i64,
    secret: String,
}

async fn book_ok(p: &Proc, user: i64, event: i64, quantity: i64, key: Option<&str>) -> Made {
    let r = book(p, user, event, quantity, key).await;
    assert_eq!(r.status, 200, "user {user} books {quantity}: {:?}", r.body);
    Made {
        id: r.body["id"].as_i64().expect("an id"),
        secret: r.body["secret"].as_str().expect("a secret").to_string(),
    }
}

async fn verify(p: &impl Target, code: &str) -> Value {
    let r = p.post("/ticket/verify", json!({ "code": code })).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

/// Every booking of the SQLite file: id -> (status, ticket code).
fn sqlite_bookings(db: &Path) -> Vec<(i64, String, Option<String>)> {
    let c = open_db(db);
    let mut st = c
        .prepare("SELECT id, status, ticket_code FROM bookings ORDER BY id")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Bookings, their seats, the highest id and the events on PostgreSQL, straight from the tables.
fn pg_state(url: &str) -> Vec<i64> {
    let url = url.to_string();
    std::thread::spawn(move || {
        let mut c = connect_pg(&url);
        let r = c
            .query_one(
                "SELECT (SELECT COUNT(*) FROM bookings),
                        (SELECT COALESCE(SUM(quantity), 0)::bigint FROM bookings),
                        (SELECT COALESCE(MAX(id), 0) FROM bookings),
                        (SELECT COUNT(*) FROM events),
                        (SELECT COUNT(*) FROM idempotency_keys)",
                &[],
            )
            .expect("counts");
        (0..5).map(|i| r.get::<_, i64>(i)).collect()
    })
    .join()
    .expect("pg thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_moves_from_sqlite_to_postgres_and_goes_on_where_it_stood() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ticket.db");
    let sqlite_url = format!("sqlite://{}", db.display());

    // On SQLite: two events, bookings with and without keys, all issued.
    let p = start(&sqlite_url, 0).await;
    let open = create_event(&p, "Open air", 10, None).await;
    // The organizer's key (scope 0 on SQLite, `organizer` on PostgreSQL) moves too.
    let limited_body = json!({"title": "Limited", "capacity": 100, "max_per_user": 3});
    let r = create_event_keyed(&p, limited_body.clone(), "ev-limited").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let limited = r.body["id"].as_i64().expect("an id");
    let b1 = book_ok(&p, 1, open, 2, Some("k-1")).await;
    let b2 = book_ok(&p, 2, open, 1, None).await;
    let b3 = book_ok(&p, 3, open, 3, Some("k-3")).await;
    let b7 = book_ok(&p, 7, limited, 2, Some("k-7")).await;
    for b in [&b1, &b2, &b3, &b7] {
        let issued = common::eventually(Duration::from_secs(30), || {
            std::fs::metadata(&db).is_ok() && {
                let c = open_db(&db);
                c.query_row(
                    "SELECT status = 'FINALIZED' FROM bookings WHERE id = ?1",
                    [b.id],
                    |r| r.get::<_, bool>(0),
                )
                .unwrap_or(false)
            }
        })
        .await;
        assert!(issued, "booking {} issued on SQLite", b.id);
    }
    stop(p).await;

    // Again on SQLite, issuing held back: two bookings stay PENDING, an issued one is cancelled.
    let p = start(&sqlite_url, 600_000).await;
    let b4 = book_ok(&p, 4, open, 2, None).await;
    let b5 = book_ok(&p, 5, open, 1, Some("k-5")).await;
    let r = send(
        p.http()
            .post(format!("{}/book/{}/cancel", p.base(), b2.id))
            .header("x-booking-secret", &b2.secret),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    stop(p).await;
    let before = sqlite_bookings(&db);
    let statuses: Vec<&str> = before.iter().map(|(_, s, _)| s.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "FINALIZED",
            "CANCELLED",
            "FINALIZED",
            "FINALIZED",
            "PENDING",
            "PENDING"
        ],
        "the sale as it stands on SQLite"
    );
    let code = |b: &Made| {
        before
            .iter()
            .find(|(id, _, _)| *id == b.id)
            .and_then(|(_, _, c)| c.clone())
            .expect("an issued booking has its code")
    };
    let max_old_id = before.iter().map(|(id, _, _)| *id).max().unwrap();

    // The move, onto a database a replica has already started on (as `docker-compose up` before
    // the import would): it generated a ticket key of its own, which the source's replaces —
    // the imported codes and secrets were signed with the source's.
    let pg = PgServer::start();
    stop(start(&pg.url(), 600_000).await).await;
    let out = import(&sqlite_url, &pg.url()).await;
    eprintln!("{}", text(&out));
    assert!(out.status.success(), "the import failed: {}", text(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("2 events, 6 bookings, 5 idempotency keys, 1 customer counts"),
        "{summary}"
    );
    assert!(
        summary.contains("ticket key copied over the target's"),
        "{summary}"
    );

    // On PostgreSQL, the same binary, no TICKET_KEY: the imported key signs and verifies.
    let p = start(&pg.url(), 600_000).await;
    for (b, (id, status, ticket)) in [&b1, &b2, &b3, &b7, &b4, &b5].into_iter().zip(&before) {
        assert_eq!(b.id, *id);
        let r = p.get_booking(b.id, &b.secret).await;
        assert_eq!(
            r.status, 200,
            "booking {} opens with its secret: {:?}",
            b.id, r.body
        );
        assert_eq!(
            r.body["status"].as_str(),
            Some(status.as_str()),
            "{:?}",
            r.body
        );
        assert_eq!(
            r.body["ticket_code"].as_str(),
            ticket.as_deref(),
            "{:?}",
            r.body
        );
    }
    let v = verify(&p, &code(&b1)).await;
    assert_eq!(v["valid"], json!(true), "an imported ticket verifies: {v}");
    assert_eq!(v["booking_id"], json!(b1.id));
    let v = verify(&p, &code(&b2)).await;
    assert_eq!(v["valid"], json!(false), "a cancelled one does not: {v}");

    // An imported Idempotency-Key replays its booking; with another body it is a 422.
    let r = book(&p, 1, open, 2, Some("k-1")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body["id"].as_i64(),
        Some(b1.id),
        "the same booking, replayed"
    );
    let r = book(&p, 1, open, 1, Some("k-1")).await;
    assert_eq!(
        r.status, 422,
        "the key's fingerprint came along: {:?}",
        r.body
    );

    // So does the organizer's: the same event, not a second one; another body is a 422.
    let r = create_event_keyed(&p, limited_body.clone(), "ev-limited").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body["id"].as_i64(),
        Some(limited),
        "the same event, replayed"
    );
    let r = create_event_keyed(&p, json!({"title": "Other", "capacity": 1}), "ev-limited").await;
    assert_eq!(r.status, 422, "{:?}", r.body);

    // The per-customer limit counts the imported seats: user 7 holds 2 of 3.
    let r = book(&p, 7, limited, 2, None).await;
    assert_eq!(
        r.status, 409,
        "past the limit with the imported seats: {:?}",
        r.body
    );
    let fresh = book_ok(&p, 7, limited, 1, None).await;
    assert!(
        fresh.id > max_old_id,
        "a new booking gets a new id: {} after {max_old_id}",
        fresh.id
    );

    // 8 of 10 seats were sold on SQLite: 2 are left, and then none.
    let last = book_ok(&p, 6, open, 2, Some("k-6")).await;
    assert!(last.id > fresh.id);
    let r = book(&p, 8, open, 1, None).await;
    assert_eq!(r.status, 409, "no oversell after the move: {:?}", r.body);
    let stats = p.get(&format!("/event/{open}/stats")).await;
    assert_eq!(stats.body["booked_count"], json!(10), "{:?}", stats.body);
    assert_eq!(stats.body["finalized_count"], json!(5), "{:?}", stats.body);
    let report = p.admin_get("/report").await;
    assert_eq!(report.status, 200);
    assert_eq!(
        (
            &report.body["total_capacity"],
            &report.body["total_reserved"],
            &report.body["total_finalized"]
        ),
        (&json!(110), &json!(13), &json!(7)),
        "the report's totals came along: {:?}",
        report.body
    );
    stop(p).await;

    // A second import into the now non-empty database is refused and changes nothing.
    let state = pg_state(&pg.url());
    assert_eq!(state[0], 8, "6 imported bookings and 2 new ones");
    let again = import(&sqlite_url, &pg.url()).await;
    assert!(!again.status.success(), "{}", text(&again));
    let err = String::from_utf8_lossy(&again.stderr);
    eprintln!("{err}");
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(
        pg_state(&pg.url()),
        state,
        "the refused import wrote nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_refuses_a_missing_source_a_sqlite_target_and_rows_that_break_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let out = import(
        &format!("sqlite://{}", missing.display()),
        "postgres://postgres@127.0.0.1:1/none",
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(
        err.contains("no such file") && err.contains(&missing.display().to_string()),
        "{err}"
    );

    // A SQLite file of this ticketd, with an oversold event in it (the trigger bypassed).
    let db = dir.path().join("oversold.db");
    let c = ticketd::store::open_writer(&db).expect("a ticketd file");
    c.execute_batch(
        "DROP TRIGGER events_never_oversell;
         INSERT INTO events (id, title, capacity, booked_count) VALUES (1, 'Oversold', 1, 2);
         INSERT INTO bookings (id, event_id, user_id, quantity, status, created_at)
         VALUES (1, 1, 1, 1, 'PENDING', '2024-05-01 10:00:00.000000'),
                (2, 1, 2, 1, 'PENDING', '2024-05-01 10:00:01.000000');",
    )
    .unwrap();
    drop(c);
    let from = format!("sqlite://{}", db.display());

    let out = import(
        &from,
        &format!("sqlite://{}", dir.path().join("b.db").display()),
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(err.contains("--to") && err.contains("PostgreSQL"), "{err}");

    let pg = PgServer::start();
    let out = import(&from, &pg.url()).await;
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(
        err.contains("events_never_oversell") && err.contains("nothing was imported"),
        "{err}"
    );
    assert_eq!(pg_state(&pg.url()), [0, 0, 0, 0, 0], "all or nothing");
}

/// An import taken while SQLite keeps selling: the source is read as of one commit, so the copy
/// holds every booking acknowledged before the import started and each event's count is the sum
/// of its live bookings — and the sale on SQLite never noticed (read-only, WAL: no lock taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_import_of_a_live_database_is_one_commit_of_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("live.db");
    let sqlite_url = format!("sqlite://{}", db.display());
    let p = Arc::new(start(&sqlite_url, 50).await);
    let events = [
        create_event(&p, "Live A", 1_000_000, None).await,
        create_event(&p, "Live B", 1_000_000, Some(1_000)).await,
    ];
    let acked: Arc<Mutex<Vec<i64>>> = Arc::default();
    let stop_selling = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8i64 {
        let (p, acked, stop_selling) = (p.clone(), acked.clone(), stop_selling.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0i64;
            while !stop_selling.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("live-{c}-{n}");
                let r = book(&p, c, events[(n % 2) as usize], 1, Some(&key)).await;
                if r.status == 200 {
                    acked
                        .lock()
                        .unwrap()
                        .push(r.body["id"].as_i64().expect("an id"));
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = acked.lock().unwrap().clone();
    let pg = PgServer::start();
    let out = import(&sqlite_url, &pg.url()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_selling.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    eprintln!("{}", text(&out));
    assert!(out.status.success(), "{}", text(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("; ticket key copied") && !summary.contains("over the target's"),
        "a fresh target had no key to replace: {summary}"
    );
    assert!(
        before.len() > 20,
        "the sale was under way: {}",
        before.len()
    );
    let after = acked.lock().unwrap().len();

    let url = pg.url();
    let (missing, torn, copied) = std::thread::spawn(move || {
        let mut c = connect_pg(&url);
        let missing: i64 = c
            .query_one(
                "SELECT COUNT(*) FROM unnest($1::bigint[]) AS a(id)
                 WHERE NOT EXISTS (SELECT 1 FROM bookings b WHERE b.id = a.id)",
                &[&before],
            )
            .unwrap()
            .get(0);
        let torn: i64 = c
            .query_one(
                "SELECT COUNT(*) FROM events e WHERE e.booked_count <> (SELECT
                     COALESCE(SUM(quantity), 0) FROM bookings b
                     WHERE b.event_id = e.id AND b.status <> 'CANCELLED')",
                &[],
            )
            .unwrap()
            .get(0);
        let copied: i64 = c
            .query_one("SELECT COUNT(*) FROM bookings", &[])
            .unwrap()
            .get(0);
        (missing, torn, copied)
    })
    .join()
    .unwrap();
    assert_eq!(
        missing, 0,
        "a booking acknowledged before the import is missing"
    );
    assert_eq!(
        torn, 0,
        "an event's count disagrees with its bookings in the copy"
    );
    eprintln!("copied {copied} bookings; {after} were acknowledged by the end of the sale");
    assert!(
        (copied as usize) < after,
        "the sale went on during the import"
    );
    let p = Arc::into_inner(p).expect("the clients are done");
    stop(p).await;
}

/// The rate of an import: 200,000 bookings over 100 events (a quarter issued, some cancelled,
/// a tenth with keys, one limited event). `cargo test --features ticketd/failpoints --test
/// import -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn import_rate_of_200k_bookings() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("big.db");
    let mut c = ticketd::store::open_writer(&db).expect("a ticketd file");
    let tx = c.transaction().unwrap();
    const EVENTS: i64 = 100;
    const PER_EVENT: i64 = 2_000;
    for e in 1..=EVENTS {
        let limit = (e == 1).then_some(4i64);
        tx.execute(
            "INSERT INTO events (id, title, capacity, booked_count, finalized_count, fence,
                 max_per_user)
             VALUES (?1, ?2, 100000, 0, 0, 7, ?3)",
            rusqlite::params![e, format!("Event\t{e} \\ \"quoted\"\n"), limit],
        )
        .unwrap();
    }
    let mut id = 0i64;
    for e in 1..=EVENTS {
        let (mut booked, mut issued) = (0i64, 0i64);
        for n in 0..PER_EVENT {
            id += 1;
            let q = 1 + n % 3;
            let user = if e == 1 { n + 1 } else { 1 + id % 50_000 };
            let q = if e == 1 { 1 } else { q };
            let (status, code, fin, can) = match n % 8 {
                0 | 1 => (
                    "FINALIZED",
                    Some(format!("TK-{id}-ABCDEFGHIJKLMNOPQRSTUVWXYZ")),
                    Some("2024-05-01 10:00:05.000000"),
                    None,
                ),
                2 => ("CANCELLED", None, None, Some("2024-05-01 10:00:06.000000")),
                _ => ("PENDING", None, None, None),
            };
            if status != "CANCELLED" {
                booked += q;
            }
            if status == "FINALIZED" {
                issued += q;
            }
            tx.execute(
                "INSERT INTO bookings (id, event_id, user_id, quantity, status, created_at,
                     ticket_code, finalized_at, cancelled_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, '2024-05-01 10:00:00.123456', ?6, ?7, ?8)",
                rusqlite::params![id, e, user, q, status, code, fin, can],
            )
            .unwrap();
            if e == 1 && status != "CANCELLED" {
                tx.execute(
                    "INSERT INTO customer_seats (event_id, user_id, seats, max_seats)
                     VALUES (1, ?1, 1, 4)",
                    [user],
                )
                .unwrap();
            }
            if n % 10 == 0 {
                tx.execute(
                    "INSERT INTO idempotency_keys (scope, key, fingerprint, booking_id,
                         created_ms)
                     VALUES (?1, ?2, 'f', ?3, 1714557600000)",
                    rusqlite::params![user, format!("k-{id}"), id],
                )
                .unwrap();
            }
        }
        tx.execute(
            "UPDATE events SET booked_count = ?2, finalized_count = ?3 WHERE id = ?1",
            [e, booked, issued],
        )
        .unwrap();
    }
    tx.execute("DELETE FROM report_totals", []).unwrap();
    ticketd::store::sqlite::ensure_totals(&tx).unwrap();
    tx.commit().unwrap();
    drop(c);

    let pg = PgServer::start();
    let started = Instant::now();
    let out = import(&format!("sqlite://{}", db.display()), &pg.url()).await;
    let took = started.elapsed();
    eprintln!("{}", text(&out));
    assert!(out.status.success());
    eprintln!(
        "{} bookings in {:.2} s wall (the process, start to exit): {:.0} bookings/s",
        id,
        took.as_secs_f64(),
        id as f64 / took.as_secs_f64()
    );
    assert_eq!(pg_state(&pg.url())[0], id);
}
