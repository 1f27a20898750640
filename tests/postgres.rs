//! The PostgreSQL backend, black-box. Every test starts its own server (`common::postgres`).

mod common;

use std::time::Duration;

use common::postgres::{wait_closed, PgServer};

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
