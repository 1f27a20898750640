//! `ticketd backup --to FILE` while the service sells: the copy holds every booking acknowledged
//! before the backup started, is consistent as of one commit (each event's count is the sum of
//! its live bookings), and a backup never overwrites a file.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{open_db, Proc, Target};
use serde_json::json;

/// Runs the binary's backup of `db` to `to`; its exit status and output.
fn run_backup(db: &Path, to: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ticketd"))
        .env_clear()
        .env("DATABASE_URL", format!("sqlite://{}", db.display()))
        .args(["backup", "--to"])
        .arg(to)
        .output()
        .expect("run ticketd backup")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_mid_sale_holds_every_acknowledged_booking() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("live.db");
    let p = Arc::new(Proc::start(&db, &[("FINALIZE_DELAY_MS", "50")]).await);
    let events = [
        p.create_event("Backup A", 1_000_000).await,
        p.create_event("Backup B", 1_000_000).await,
    ];
    // Clients book without pause; every 200 is recorded with its quantity.
    let acked: Arc<Mutex<HashMap<i64, i64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..16i64 {
        let (p, acked, stop) = (p.clone(), acked.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let body = json!({
                    "user_id": c * 1_000_000 + n,
                    "event_id": events[(n % 2) as usize],
                    "quantity": 1 + n % 3,
                });
                let r = p.post("/book", body).await;
                if r.status == 200 {
                    let id = r.body["id"].as_i64().expect("an id");
                    let q = r.body["quantity"].as_i64().expect("a quantity");
                    acked.lock().unwrap().insert(id, q);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before: HashMap<i64, i64> = acked.lock().unwrap().clone();
    let copy = dir.path().join("copy.db");
    let (db2, copy2) = (db.clone(), copy.clone());
    let out = tokio::task::spawn_blocking(move || run_backup(&db2, &copy2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the backup failed");
    assert!(
        before.len() > 100,
        "the sale was under way: {}",
        before.len()
    );

    let c = open_db(&copy);
    let verdict: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(verdict, "ok");
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete", "the copy is one file, no WAL beside it");
    let mut st = c
        .prepare("SELECT quantity FROM bookings WHERE id = ?1")
        .unwrap();
    for (id, quantity) in &before {
        let q: Option<i64> = st.query_row([id], |r| r.get(0)).ok();
        assert_eq!(
            q,
            Some(*quantity),
            "booking {id} acknowledged before the backup"
        );
    }
    // As of one commit: each event's count is the sum of its live bookings.
    let torn: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM events e WHERE e.booked_count != (SELECT COALESCE(SUM(quantity), 0) \
             FROM bookings b WHERE b.event_id = e.id AND b.status != 'CANCELLED')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        torn, 0,
        "an event's count disagrees with its bookings in the copy"
    );
    let (copied, all): (i64, i64) = (
        c.query_row("SELECT COUNT(*) FROM bookings", [], |r| r.get(0))
            .unwrap(),
        open_db(&db)
            .query_row("SELECT COUNT(*) FROM bookings", [], |r| r.get(0))
            .unwrap(),
    );
    eprintln!(
        "{} acknowledged before the backup; the copy holds {copied}; the live file {all}",
        before.len()
    );
    assert!(copied < all, "the sale went on after the backup");
    assert!(stdout.contains(&format!("{copied} bookings")), "{stdout}");

    // A backup never overwrites.
    let again = run_backup(&db, &copy);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    assert_eq!(
        open_db(&copy)
            .query_row("SELECT COUNT(*) FROM bookings", [], |r| r.get::<_, i64>(0))
            .unwrap(),
        copied
    );
}
