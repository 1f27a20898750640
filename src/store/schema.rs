//! Schema and migrations, run at every start before anything reads or writes.
//!
//! The first migration is the old service's schema, written with `IF NOT EXISTS`: pointed at the
//! old service's `ticket.db`, ticketd adopts its rows instead of starting over. Later migrations
//! add columns, an index and a trigger, and drop only ticketd's own index on `bookings(event_id)`
//! (the old service never had it), so the old reports keep working on the same file.
//!
//! `PRAGMA user_version` only moves forward: a ticketd binary older than the file's schema
//! refuses to start on it (rusqlite_migration's "database too far ahead"). In cluster mode, roll
//! replicas forward, not back, across a release that adds a migration.

use rusqlite_migration::{Migrations, M};

/// The migrations, in order; `PRAGMA user_version` records how far a file has come.
pub fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            "CREATE TABLE IF NOT EXISTS events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                title VARCHAR(200) NOT NULL,
                capacity INTEGER NOT NULL,
                booked_count INTEGER NOT NULL DEFAULT 0
            );
            CREATE TABLE IF NOT EXISTS bookings (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                event_id INTEGER NOT NULL REFERENCES events(id),
                user_id INTEGER NOT NULL,
                quantity INTEGER NOT NULL DEFAULT 1,
                status VARCHAR(9) NOT NULL DEFAULT 'PENDING',
                created_at DATETIME NOT NULL
            );",
        ),
        M::up(
            "ALTER TABLE events ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
            ALTER TABLE events ADD COLUMN finalized_count INTEGER NOT NULL DEFAULT 0;
            ALTER TABLE bookings ADD COLUMN ticket_code TEXT;
            ALTER TABLE bookings ADD COLUMN finalized_at DATETIME;
            UPDATE events SET finalized_count = (
                SELECT COALESCE(SUM(b.quantity), 0) FROM bookings b
                WHERE b.event_id = events.id AND b.status = 'FINALIZED');
            CREATE INDEX IF NOT EXISTS ix_bookings_event_id ON bookings(event_id);
            CREATE INDEX IF NOT EXISTS ix_bookings_pending ON bookings(id) WHERE status = 'PENDING';
            CREATE TABLE IF NOT EXISTS ticketd_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            -- Last line behind the fenced update: the file itself refuses an oversell, whoever writes.
            CREATE TRIGGER IF NOT EXISTS events_never_oversell
            BEFORE UPDATE OF booked_count ON events
            WHEN NEW.booked_count > NEW.capacity OR NEW.booked_count < 0
            BEGIN SELECT RAISE(ABORT, 'booked_count would exceed capacity'); END;",
        ),
        // No query of ticketd reads bookings by event (the counters live on the event row), and
        // the index cost every booking a write to a random leaf page: with bookings spread over
        // 10,000 events it was the largest part of each group's log (make bench, scenario 4:
        // 24,000 → 33,000 bookings/s without it). The old service never had it.
        M::up("DROP INDEX IF EXISTS ix_bookings_event_id;"),
        // Cancellation, per-customer limits and idempotency keys (all written by the fenced
        // transaction of the event's batch, so they hold across replicas and crashes).
        M::up(
            "ALTER TABLE events ADD COLUMN max_per_user INTEGER;
            ALTER TABLE bookings ADD COLUMN cancelled_at DATETIME;
            -- Live seats per customer, kept only for events with a limit.
            CREATE TABLE IF NOT EXISTS customer_seats (
                event_id INTEGER NOT NULL,
                user_id INTEGER NOT NULL,
                seats INTEGER NOT NULL CHECK (seats >= 0),
                PRIMARY KEY (event_id, user_id)
            ) WITHOUT ROWID;
            -- Last line behind the conditional upsert, as the oversell trigger is for capacity.
            CREATE TRIGGER IF NOT EXISTS customer_seats_within_limit_on_insert
            BEFORE INSERT ON customer_seats
            WHEN NEW.seats > (SELECT max_per_user FROM events WHERE id = NEW.event_id)
            BEGIN SELECT RAISE(ABORT, 'seats would exceed the per-customer limit'); END;
            CREATE TRIGGER IF NOT EXISTS customer_seats_within_limit_on_update
            BEFORE UPDATE OF seats ON customer_seats
            WHEN NEW.seats > (SELECT max_per_user FROM events WHERE id = NEW.event_id)
            BEGIN SELECT RAISE(ABORT, 'seats would exceed the per-customer limit'); END;
            -- Idempotency-Key of POST /book (scope user:<id>) and POST /event (scope organizer),
            -- written in the transaction of what it names; live 24 hours (created_ms: Unix ms).
            -- No index by age: the writer's purge walks the table in key order instead.
            CREATE TABLE IF NOT EXISTS idempotency_keys (
                scope TEXT NOT NULL,
                key TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                booking_id INTEGER,
                event_id INTEGER,
                created_ms INTEGER NOT NULL,
                PRIMARY KEY (scope, key)
            ) WITHOUT ROWID;",
        ),
        // The per-customer limit's last line becomes a CHECK on the row (`max_seats`, copied from
        // the event when the customer's first seats are written; an event's limit never changes)
        // instead of two triggers that read the event row on every write: the triggers cost the
        // writer ~1.6 µs of its ~12.5 µs per keyed, limited booking (make bench, scenario 2b).
        M::up(
            "CREATE TABLE customer_seats_v5 (
                event_id INTEGER NOT NULL,
                user_id INTEGER NOT NULL,
                seats INTEGER NOT NULL,
                max_seats INTEGER NOT NULL,
                PRIMARY KEY (event_id, user_id),
                CHECK (seats >= 0 AND seats <= max_seats)
            ) WITHOUT ROWID;
            INSERT INTO customer_seats_v5 (event_id, user_id, seats, max_seats)
                SELECT c.event_id, c.user_id, c.seats, e.max_per_user
                FROM customer_seats c JOIN events e ON e.id = c.event_id
                WHERE e.max_per_user IS NOT NULL;
            DROP TRIGGER customer_seats_within_limit_on_insert;
            DROP TRIGGER customer_seats_within_limit_on_update;
            DROP TABLE customer_seats;
            ALTER TABLE customer_seats_v5 RENAME TO customer_seats;",
        ),
        // Totals of GET /report, kept by every commit instead of summed per call (a scan of
        // every event, and SQLite's SUM overflowed past i64): decimal text, 128-bit in Rust.
        // Filled from the events by the writer at start (`queries::ensure_totals`).
        M::up(
            "CREATE TABLE report_totals (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                events TEXT NOT NULL,
                capacity TEXT NOT NULL,
                booked TEXT NOT NULL,
                finalized TEXT NOT NULL
            );",
        ),
        // A key's scope becomes an integer (`KeyScope::code`: 0 the organizer, else the user id)
        // instead of the text `user:<id>`: shorter records, integer compares, and a customer's
        // keys next to each other in the B-tree. A keyed booking cost the writer about 1 µs
        // less (make bench, row 2b). Only ticketd writes this table: every scope it wrote is one
        // of the two forms. The CHECK refuses the text form: a replica still running an older
        // binary on the same file (cluster mode, mid-rollout) gets an error (503) for a keyed
        // request instead of writing a key the new replicas would not find — a retry landing on
        // the other version would book twice.
        M::up(
            "CREATE TABLE idempotency_keys_v7 (
                scope INTEGER NOT NULL CHECK (typeof(scope) = 'integer'),
                key TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                booking_id INTEGER,
                event_id INTEGER,
                created_ms INTEGER NOT NULL,
                PRIMARY KEY (scope, key)
            ) WITHOUT ROWID;
            INSERT INTO idempotency_keys_v7
                (scope, key, fingerprint, booking_id, event_id, created_ms)
                SELECT CASE WHEN scope = 'organizer' THEN 0
                            ELSE CAST(substr(scope, 6) AS INTEGER) END,
                       key, fingerprint, booking_id, event_id, created_ms
                FROM idempotency_keys
                WHERE scope = 'organizer'
                   OR (scope GLOB 'user:[1-9]*' AND NOT substr(scope, 6) GLOB '*[^0-9]*');
            DROP TABLE idempotency_keys;
            ALTER TABLE idempotency_keys_v7 RENAME TO idempotency_keys;",
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::KeyScope;

    #[test]
    fn migrations_are_valid() {
        migrations().validate().expect("migrations validate");
    }

    #[test]
    fn the_limit_check_survives_the_move_off_triggers() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        migrations().to_version(&mut conn, 4).unwrap();
        conn.execute_batch(
            "INSERT INTO events (title, capacity, max_per_user) VALUES ('Limited', 10, 4);
             INSERT INTO customer_seats (event_id, user_id, seats) VALUES (1, 7, 3);",
        )
        .unwrap();
        migrations().to_latest(&mut conn).unwrap();
        let max: i64 = conn
            .query_row(
                "SELECT max_seats FROM customer_seats WHERE event_id = 1 AND user_id = 7",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(max, 4, "the event's limit is copied to its customers' rows");
        let past = "UPDATE customer_seats SET seats = 5 WHERE user_id = 7";
        assert!(
            conn.execute(past, []).is_err(),
            "the file refuses a 5th seat"
        );
        conn.execute("UPDATE customer_seats SET seats = 4 WHERE user_id = 7", [])
            .unwrap();
    }

    #[test]
    fn key_scopes_become_codes_and_keys_still_replay() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        migrations().to_version(&mut conn, 6).unwrap();
        conn.execute_batch(
            "INSERT INTO idempotency_keys (scope, key, fingerprint, booking_id, event_id, created_ms)
             VALUES ('user:7', 'k', 'f7', 70, NULL, 5), ('user:12', 'k', 'f12', 120, NULL, 6),
                    ('organizer', 'k', 'fo', NULL, 3, 7),
                    ('user:9223372036854775807', 'k', 'fmax', 80, NULL, 8);",
        )
        .unwrap();
        migrations().to_latest(&mut conn).unwrap();
        let found = |scope, fp: &str| {
            let rec = crate::store::sqlite::idempotency_key(&conn, scope, "k", 0)
                .unwrap()
                .expect("the key survives the migration");
            assert_eq!(rec.fingerprint, fp);
            rec
        };
        assert_eq!(found(KeyScope::Customer(7), "f7").booking_id, Some(70));
        assert_eq!(found(KeyScope::Customer(12), "f12").booking_id, Some(120));
        assert_eq!(found(KeyScope::Organizer, "fo").event_id, Some(3));
        assert_eq!(
            found(KeyScope::Customer(i64::MAX), "fmax").booking_id,
            Some(80)
        );
        let (rows, text): (i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), SUM(typeof(scope) <> 'integer') FROM idempotency_keys",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (rows, text),
            (4, 0),
            "every key kept, every scope an integer"
        );
        // What a replica of the older binary would still write is refused, not stored aside.
        let old_write = conn.execute(
            "INSERT INTO idempotency_keys (scope, key, fingerprint, booking_id, created_ms)
             VALUES ('user:7', 'k2', 'f', 71, 9)",
            [],
        );
        assert!(old_write.is_err(), "a text scope is refused: {old_write:?}");
    }

    #[test]
    fn adopts_the_old_services_file() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        // The old service's tables (SQLAlchemy), with one finalized and one pending booking.
        conn.execute_batch(
            "CREATE TABLE events (id INTEGER NOT NULL, title VARCHAR(200) NOT NULL,
                 capacity INTEGER NOT NULL, booked_count INTEGER NOT NULL, PRIMARY KEY (id));
             CREATE TABLE bookings (id INTEGER NOT NULL, event_id INTEGER NOT NULL,
                 user_id INTEGER NOT NULL, quantity INTEGER NOT NULL, status VARCHAR(9) NOT NULL,
                 created_at DATETIME NOT NULL, PRIMARY KEY (id));
             INSERT INTO events VALUES (1, 'Old gig', 10, 3);
             INSERT INTO bookings VALUES (1, 1, 7, 2, 'FINALIZED', '2024-05-01 10:00:00.000000');
             INSERT INTO bookings VALUES (2, 1, 8, 1, 'PENDING', '2024-05-01 10:00:01.000000');",
        )
        .unwrap();
        migrations().to_latest(&mut conn).unwrap();
        let indexes: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'bookings'",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            indexes,
            vec!["ix_bookings_pending".to_string()],
            "only the sweeper's index"
        );
        let (booked, finalized, fence): (i64, i64, i64) = conn
            .query_row(
                "SELECT booked_count, finalized_count, fence FROM events WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((booked, finalized, fence), (3, 2, 0));
        let oversell = conn.execute("UPDATE events SET booked_count = 11 WHERE id = 1", []);
        assert!(oversell.is_err(), "the trigger refuses an oversell");
    }
}
