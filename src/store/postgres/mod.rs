//! PostgreSQL storage (`DATABASE_URL=postgres://…`): the same schema, queries and promises as
//! SQLite's, for replicas on several hosts.
//!
//! Crates: `tokio-postgres` for the writer — the one writer thread of the process drives it on
//! its own current-thread runtime and *pipelines* a whole group on one connection (every op's
//! statement sent before the first answer is awaited), which the blocking `postgres` wrapper
//! cannot do; `postgres` (that blocking wrapper) with `r2d2_postgres` for reads and migrations,
//! which run blocking closures on the blocking pool exactly as SQLite's pool does (r2d2 is
//! already the read pool's crate). No TLS yet (`NoTls`): PostgreSQL on a private network.

pub mod queries;
pub mod schema;
pub mod writer;

#[cfg(test)]
#[path = "../../../tests/common/postgres.rs"]
pub(crate) mod testpg;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod schema_tests {
    use super::schema::{migrate, MigrateError, MIGRATIONS};
    use super::testpg::PgServer;

    fn connect(url: &str) -> postgres::Client {
        postgres::Client::connect(url, postgres::NoTls).expect("connects")
    }

    /// Replicas starting together: every one migrates, one schema results (the advisory lock),
    /// and a database newer than the binary is refused.
    #[test]
    fn replicas_migrating_at_once_end_with_one_schema() {
        let pg = PgServer::start();
        let url = pg.url();
        let starters: Vec<_> = (0..6)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || migrate(&mut connect(&url)))
            })
            .collect();
        for s in starters {
            s.join().unwrap().expect("migrates");
        }
        let mut c = connect(&url);
        let versions: Vec<i32> = c
            .query("SELECT version FROM ticketd_schema ORDER BY version", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let all: Vec<i32> = (1..=MIGRATIONS.len() as i32).collect();
        assert_eq!(versions, all, "each migration ran once");
        let totals: i64 = c
            .query_one("SELECT COUNT(*) FROM report_totals", &[])
            .unwrap()
            .get(0);
        assert_eq!(totals, 1, "the totals were filled once");
        migrate(&mut c).expect("again: nothing to do");

        c.execute("INSERT INTO ticketd_schema (version) VALUES (99)", &[])
            .unwrap();
        assert!(matches!(
            migrate(&mut c),
            Err(MigrateError::TooNew { at: 99, .. })
        ));
    }

    /// The last lines of defence are the database's own: whoever writes, no oversell and no
    /// customer past the limit.
    #[test]
    fn the_database_refuses_oversell_and_a_customer_past_the_limit() {
        let pg = PgServer::start();
        let mut c = connect(&pg.url());
        migrate(&mut c).unwrap();
        c.batch_execute(
            "INSERT INTO events (id, title, capacity, max_per_user) VALUES (1, 'Limited', 10, 4);
             INSERT INTO customer_seats (event_id, user_id, seats, max_seats) VALUES (1, 7, 3, 4);",
        )
        .unwrap();
        let oversell = c.execute("UPDATE events SET booked_count = 11 WHERE id = 1", &[]);
        let err = oversell.expect_err("refused");
        assert_eq!(
            err.as_db_error().map(|e| e.constraint()),
            Some(Some("events_never_oversell"))
        );
        c.execute("UPDATE events SET booked_count = 10 WHERE id = 1", &[])
            .unwrap();
        let past = c.execute("UPDATE customer_seats SET seats = 5 WHERE user_id = 7", &[]);
        assert!(past.is_err(), "the database refuses a 5th seat");
        c.execute("UPDATE customer_seats SET seats = 4 WHERE user_id = 7", &[])
            .unwrap();
        let status = c.execute("INSERT INTO bookings (event_id, user_id, status, created_at) VALUES (1, 7, 'LOST', now())", &[]);
        assert!(status.is_err(), "a status is one of the three");
    }

    /// Migration 3 as it shipped: the totals' trigger counting in the backend pid's slot (a
    /// fixture: the migration's text now includes `totals.sql`, the function's latest).
    const MIGRATION_3_AS_SHIPPED: &str = r#"
    CREATE FUNCTION ticketd_totals() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        slot INTEGER := pg_backend_pid() % 64;
        d_events INTEGER := 0;
        d_capacity BIGINT := NEW.capacity;
        d_booked BIGINT := NEW.booked_count;
        d_finalized BIGINT := NEW.finalized_count;
    BEGIN
        IF TG_OP = 'INSERT' THEN
            d_events := 1;
        ELSE
            d_capacity := NEW.capacity - OLD.capacity;
            d_booked := NEW.booked_count - OLD.booked_count;
            d_finalized := NEW.finalized_count - OLD.finalized_count;
            IF d_capacity = 0 AND d_booked = 0 AND d_finalized = 0 THEN
                RETURN NULL;
            END IF;
        END IF;
        INSERT INTO report_totals AS t (id, events, capacity, booked, finalized)
        VALUES (slot, d_events, d_capacity, d_booked, d_finalized)
        ON CONFLICT (id) DO UPDATE SET events = t.events + excluded.events,
            capacity = t.capacity + excluded.capacity, booked = t.booked + excluded.booked,
            finalized = t.finalized + excluded.finalized;
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER events_report_totals AFTER INSERT OR UPDATE ON events
        FOR EACH ROW EXECUTE FUNCTION ticketd_totals();
    "#;

    /// A database of schema 3 in the middle of a sale (issued seats on the event row) moves to
    /// 4: its counts stay what they were, tickets issued after count on top of them, and its
    /// totals' trigger counts in the writer's claimed slot from then on.
    #[test]
    fn a_sale_under_way_keeps_its_counts_through_migration_4() {
        use crate::store::queries::IssuedTicket;
        use crate::ticket::TicketFacts;
        let pg = PgServer::start();
        let mut c = connect(&pg.url());
        c.batch_execute(
            "CREATE TABLE ticketd_schema (version INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .unwrap();
        let shipped = [MIGRATIONS[0], MIGRATIONS[1], MIGRATION_3_AS_SHIPPED];
        for (i, sql) in shipped.iter().enumerate() {
            c.batch_execute(sql).unwrap();
            c.execute(
                "INSERT INTO ticketd_schema (version) VALUES ($1)",
                &[&(i as i32 + 1)],
            )
            .unwrap();
        }
        c.batch_execute(
            "INSERT INTO events (id, title, capacity, booked_count, finalized_count)
                 VALUES (1, 'old', 10, 5, 3);
             INSERT INTO bookings (id, event_id, user_id, quantity, status, created_at,
                 ticket_code, finalized_at)
             VALUES (1, 1, 7, 3, 'FINALIZED', now(), 'C1', now()),
                    (2, 1, 8, 2, 'PENDING', now(), NULL, NULL)",
        )
        .unwrap();
        migrate(&mut c).expect("migrates");
        let totals: String = c
            .query_one("SELECT pg_get_functiondef('ticketd_totals'::regproc)", &[])
            .unwrap()
            .get(0);
        assert!(totals.contains("ticketd_slot()"), "{totals}");
        let stats = |c: &mut postgres::Client| {
            let e = super::queries::event(c, 1).unwrap().unwrap();
            let r = super::queries::report(c).unwrap();
            (e.finalized_count, r.total_finalized, r.total_reserved)
        };
        assert_eq!(stats(&mut c), (3, 3, 5));
        let mut w = super::writer::PgWriter::connect(&pg.url()).unwrap();
        let b = super::queries::booking(&mut c, 2).unwrap().unwrap();
        let tickets = [IssuedTicket {
            facts: TicketFacts::from(&b),
            code: "C2".into(),
        }];
        let op = super::writer::PgOp::Finalize {
            tickets: &tickets,
            at: "2024-01-01 00:00:05.000000",
        };
        w.commit_group(&[op]).expect("commits");
        assert_eq!(stats(&mut c), (5, 5, 5));
    }
}
