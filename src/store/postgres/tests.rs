//! The unit tests of `store::queries`, ported to PostgreSQL (each on its own private server),
//! and the group commit's own: refusals and failures leave the rest of the group committed, in
//! one round trip.

use super::queries::{booking, event, idempotency_key, pending_facts, pending_ids, report};
use super::schema::migrate;
use super::testpg::PgServer;
use super::writer::{PgDone, PgOp, PgWriter};
use crate::domain::{BookingStatus, IdempotencyKey, KeyScope};
use crate::store::queries::{
    BatchApplied, BookingOutcome, CancelOutcome, EventRow, FencedBatch, IssuedTicket,
    NewBookingRow, PurgeCursor, Refusal, Report, SeatsSeen,
};
use crate::ticket::TicketFacts;

use crate::store::queries::test_batches::{batch, ids, rows, LIVE_MS, T0, T0_MS};

struct Db {
    w: PgWriter,
    c: postgres::Client,
    _pg: PgServer,
}

fn db() -> Db {
    let pg = PgServer::start();
    let mut c = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    migrate(&mut c).unwrap();
    let w = PgWriter::connect(&pg.url()).unwrap();
    Db { w, c, _pg: pg }
}

fn one(d: &mut Db, op: PgOp<'_>) -> PgDone {
    let mut done = d.w.commit_group(&[op]).expect("the group commits");
    done.pop().unwrap().expect("the op applies")
}

fn apply_fenced_batch(d: &mut Db, b: &FencedBatch<'_>) -> Result<BatchApplied, Refusal> {
    match one(d, PgOp::Batch(b)) {
        PgDone::Batch(r) => r,
        other => panic!("{other:?}"),
    }
}

fn event_with(d: &mut Db, capacity: i64, limit: Option<i64>) -> EventRow {
    let op = PgOp::CreateEvent {
        title: "t",
        capacity,
        max_per_user: limit,
        key: None,
        now_ms: T0_MS,
        keys_live_after_ms: LIVE_MS,
    };
    match one(d, op) {
        PgDone::Event(Ok(row)) => row,
        other => panic!("{other:?}"),
    }
}

fn ev(d: &mut Db, id: i64) -> EventRow {
    event(&mut d.c, id).unwrap().unwrap()
}

/// One ticket with the booking's own facts: the seats it finalized, if it did.
fn finalize(d: &mut Db, id: i64, code: &str, at: &str) -> Option<i64> {
    let b = booking(&mut d.c, id).unwrap().expect("the booking exists");
    let tickets = [IssuedTicket {
        facts: TicketFacts::from(&b),
        code: code.into(),
    }];
    match one(
        d,
        PgOp::Finalize {
            tickets: &tickets,
            at,
        },
    ) {
        PgDone::Finalized(n, seats) => (n == 1).then_some(seats),
        other => panic!("{other:?}"),
    }
}

#[test]
fn fenced_batch_refuses_stale_tokens_and_missing_seats() {
    let mut d = db();
    let e = event_with(&mut d, 5, None);
    let a = apply_fenced_batch(&mut d, &batch(e.id, 2, &[], &rows(&[(1, 2), (2, 1)]))).unwrap();
    assert_eq!((ids(&a).len(), a.booked_after), (2, 3));
    let r = apply_fenced_batch(&mut d, &batch(e.id, 1, &[], &rows(&[(3, 1)])));
    assert!(matches!(r, Err(Refusal::Fenced(ref row)) if row.fence == 2 && row.booked_count == 3));
    let r = apply_fenced_batch(&mut d, &batch(e.id, 2, &[], &rows(&[(3, 3)])));
    assert!(matches!(r, Err(Refusal::NoSeats(ref row)) if row.booked_count == 3));
    assert!(apply_fenced_batch(&mut d, &batch(e.id, 3, &[], &rows(&[(3, 2)]))).is_ok());
    assert_eq!(ev(&mut d, e.id).booked_count, 5);
    assert_eq!(
        apply_fenced_batch(&mut d, &batch(999, 9, &[], &rows(&[(1, 1)]))),
        Err(Refusal::NoEvent)
    );
    // Nothing of the refused batches was written.
    let n: i64 =
        d.c.query_one("SELECT COUNT(*) FROM bookings", &[])
            .unwrap()
            .get(0);
    assert_eq!(n, 3);
}

#[test]
fn cancelled_seats_return_and_are_counted_once() {
    let mut d = db();
    let e = event_with(&mut d, 3, None);
    let a = apply_fenced_batch(&mut d, &batch(e.id, 1, &[], &rows(&[(1, 2), (2, 1)]))).unwrap();
    let first = ids(&a)[0];
    assert_eq!(finalize(&mut d, first, "CODE", T0), Some(2));
    let a = apply_fenced_batch(&mut d, &batch(e.id, 2, &[first], &rows(&[(3, 2)]))).unwrap();
    assert!(matches!(&a.cancels[0],
        CancelOutcome::Cancelled(b) if b.status == BookingStatus::Cancelled
            && b.cancelled_at.as_deref() == Some("2024-01-01T00:00:00.000000Z")
            && b.ticket_code.as_deref() == Some("CODE")));
    assert_eq!((a.booked_after, ids(&a).len()), (3, 1));
    let row = ev(&mut d, e.id);
    assert_eq!((row.booked_count, row.finalized_count), (3, 0));
    // Twice is the same cancellation, in another batch or in the same one.
    let a = apply_fenced_batch(&mut d, &batch(e.id, 3, &[first, 999, first], &[])).unwrap();
    assert_eq!((a.booked_after, a.freed, a.cancelled), (3, 0, 0));
    assert_eq!(a.cancels[1], CancelOutcome::NotFound);
    let second = ids(&apply_fenced_batch(&mut d, &batch(e.id, 3, &[], &[])).unwrap());
    assert!(second.is_empty());
    assert_eq!(finalize(&mut d, first, "OTHER", T0), None);
    assert_eq!(
        booking(&mut d.c, first)
            .unwrap()
            .unwrap()
            .ticket_code
            .as_deref(),
        Some("CODE")
    );
    let r = report(&mut d.c).unwrap();
    assert_eq!((r.total_reserved, r.total_finalized), (3, 0));
}

#[test]
fn a_booking_named_twice_in_one_batch_is_cancelled_once() {
    let mut d = db();
    let e = event_with(&mut d, 3, Some(3));
    let a = apply_fenced_batch(&mut d, &batch(e.id, 1, &[], &rows(&[(1, 2)]))).unwrap();
    let id = ids(&a)[0];
    let a = apply_fenced_batch(&mut d, &batch(e.id, 1, &[id, id], &[])).unwrap();
    assert_eq!((a.cancelled, a.freed, a.booked_after), (1, 2, 0));
    assert!(matches!(&a.cancels[1], CancelOutcome::Cancelled(b) if b.id == id));
    assert_eq!(
        a.users,
        vec![SeatsSeen::Holds {
            user_id: 1,
            seats: 0
        }]
    );
}

#[test]
fn the_limit_is_enforced_by_the_store() {
    let mut d = db();
    let e = event_with(&mut d, 100, Some(4));
    let a = apply_fenced_batch(
        &mut d,
        &batch(e.id, 1, &[], &rows(&[(7, 3), (7, 2), (7, 1), (8, 5)])),
    )
    .unwrap();
    let first = ids(&a)[0];
    assert_eq!(
        a.bookings[1..],
        [
            BookingOutcome::Limit { limit: 4, held: 3 },
            BookingOutcome::Booked(first + 1),
            BookingOutcome::Limit { limit: 4, held: 0 },
        ]
    );
    assert_eq!(a.booked_after, 4);
    let a = apply_fenced_batch(&mut d, &batch(e.id, 2, &[first], &rows(&[(7, 3)]))).unwrap();
    assert!(matches!(a.bookings[0], BookingOutcome::Booked(_)));
    assert_eq!(
        a.users,
        vec![
            SeatsSeen::Holds {
                user_id: 7,
                seats: 1
            },
            SeatsSeen::Took {
                user_id: 7,
                seats: 3
            }
        ]
    );
    let held: i64 =
        d.c.query_one(
            "SELECT seats FROM customer_seats WHERE event_id = $1 AND user_id = 7",
            &[&e.id],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, 4);
    // Whoever writes, the database refuses more than the limit.
    assert!(d
        .c
        .execute(
            "UPDATE customer_seats SET seats = 5 WHERE event_id = $1 AND user_id = 7",
            &[&e.id]
        )
        .is_err());
}

#[test]
fn idempotency_keys_name_one_booking_and_expire() {
    let mut d = db();
    let e = event_with(&mut d, 10, None);
    let key = IdempotencyKey {
        scope: KeyScope::Customer(1),
        key: "k1".into(),
        fingerprint: "f".into(),
    };
    let one_row = [NewBookingRow {
        user_id: 1,
        quantity: 1,
        key: Some(&key),
    }];
    let a = apply_fenced_batch(&mut d, &batch(e.id, 1, &[], &one_row)).unwrap();
    let id = ids(&a)[0];
    let again = apply_fenced_batch(&mut d, &batch(e.id, 2, &[], &one_row)).unwrap();
    assert_eq!(
        again.bookings,
        vec![BookingOutcome::KeyUsed {
            booking_id: id,
            fingerprint: "f".into()
        }]
    );
    assert_eq!(again.booked_after, 1, "nothing booked twice");
    // The same key twice in one batch: the second names the first's booking.
    let twice = [one_row[0], one_row[0]];
    let a = apply_fenced_batch(&mut d, &batch(e.id, 2, &[], &twice)).unwrap();
    assert!(a
        .bookings
        .iter()
        .all(|o| matches!(o, BookingOutcome::KeyUsed { booking_id, .. } if *booking_id == id)));
    let plain = apply_fenced_batch(&mut d, &batch(e.id, 3, &[], &rows(&[(2, 1)]))).unwrap();
    assert_eq!(ids(&plain), vec![id + 1]);
    let later = FencedBatch {
        keys_live_after_ms: T0_MS + 1,
        now_ms: T0_MS + 86_400_001,
        ..batch(e.id, 4, &[], &one_row)
    };
    let a = apply_fenced_batch(&mut d, &later).unwrap();
    assert_eq!(ids(&a), vec![id + 2]);
    let rec = idempotency_key(&mut d.c, KeyScope::Customer(1), "k1", T0_MS + 1)
        .unwrap()
        .unwrap();
    assert_eq!(rec.booking_id, Some(id + 2));
    // A keyed booking refused for seats gives its key back with the rest of the batch.
    let full = [NewBookingRow {
        user_id: 1,
        quantity: 100,
        key: Some(&IdempotencyKey {
            scope: KeyScope::Customer(1),
            key: "big".into(),
            fingerprint: "g".into(),
        }),
    }];
    let r = apply_fenced_batch(&mut d, &batch(e.id, 4, &[], &full));
    assert!(matches!(r, Err(Refusal::NoSeats(_))));
    assert_eq!(
        idempotency_key(&mut d.c, KeyScope::Customer(1), "big", 0).unwrap(),
        None
    );
    // The purge walks the keys in chunks and deletes only the expired ones.
    let other = IdempotencyKey {
        scope: KeyScope::Customer(1),
        key: "a-old".into(),
        fingerprint: "f".into(),
    };
    let old_one = [NewBookingRow {
        user_id: 1,
        quantity: 1,
        key: Some(&other),
    }];
    apply_fenced_batch(&mut d, &batch(e.id, 5, &[], &old_one)).unwrap();
    let mut cursor = PurgeCursor::default();
    assert_eq!(
        d.w.purge_expired_keys(&mut cursor, T0_MS + 1, 1).unwrap(),
        1
    );
    assert_eq!(
        d.w.purge_expired_keys(&mut cursor, T0_MS + 1, 1).unwrap(),
        0
    );
    assert_eq!(
        d.w.purge_expired_keys(&mut cursor, T0_MS + 1, 1).unwrap(),
        0
    );
    assert_eq!(
        cursor,
        PurgeCursor::default(),
        "the walk starts over at the end"
    );
    assert_eq!(
        idempotency_key(&mut d.c, KeyScope::Customer(1), "a-old", 0).unwrap(),
        None
    );
    assert!(idempotency_key(&mut d.c, KeyScope::Customer(1), "k1", 0)
        .unwrap()
        .is_some());
}

#[test]
fn an_events_key_names_one_event() {
    let mut d = db();
    let key = IdempotencyKey {
        scope: KeyScope::Organizer,
        key: "e1".into(),
        fingerprint: "f".into(),
    };
    let op = PgOp::CreateEvent {
        title: "Gig",
        capacity: 10,
        max_per_user: Some(2),
        key: Some(&key),
        now_ms: T0_MS,
        keys_live_after_ms: LIVE_MS,
    };
    let PgDone::Event(Ok(row)) = one(&mut d, op) else {
        panic!()
    };
    assert_eq!((row.capacity, row.max_per_user), (10, Some(2)));
    let PgDone::Event(Err(rec)) = one(&mut d, op) else {
        panic!("a second event for one key")
    };
    assert_eq!(
        (rec.event_id, rec.fingerprint.as_str()),
        (Some(row.id), "f")
    );
    assert_eq!(report(&mut d.c).unwrap().events, 1);
}

#[test]
fn tickets_are_written_many_at_a_time_and_only_for_their_booking() {
    let mut d = db();
    let (e1, e2) = (event_with(&mut d, 10, None), event_with(&mut d, 10, None));
    let a1 = apply_fenced_batch(&mut d, &batch(e1.id, 1, &[], &rows(&[(1, 2), (2, 1)]))).unwrap();
    let a2 = apply_fenced_batch(&mut d, &batch(e2.id, 1, &[], &rows(&[(3, 4)]))).unwrap();
    let all: Vec<i64> = ids(&a1).into_iter().chain(ids(&a2)).collect();
    let mut facts = pending_facts(&mut d.c, &all).unwrap();
    facts.sort_by_key(|f| f.booking_id);
    assert_eq!(facts.len(), 3);
    let ticket = |f: &TicketFacts| IssuedTicket {
        facts: *f,
        code: format!("C{}", f.booking_id),
    };
    let mut tickets: Vec<IssuedTicket> = facts.iter().map(ticket).collect();
    tickets[2].facts.quantity += 1;
    let fin = |d: &mut Db, t: &[IssuedTicket]| match one(d, PgOp::Finalize { tickets: t, at: T0 }) {
        PgDone::Finalized(n, s) => (n, s),
        other => panic!("{other:?}"),
    };
    assert_eq!(fin(&mut d, &tickets), (2, 3));
    assert_eq!(ev(&mut d, e1.id).finalized_count, 3);
    assert_eq!(ev(&mut d, e2.id).finalized_count, 0);
    let again: Vec<IssuedTicket> = facts.iter().map(ticket).collect();
    assert_eq!(fin(&mut d, &again), (1, 4));
    assert_eq!(ev(&mut d, e2.id).finalized_count, 4);
    assert!(pending_facts(&mut d.c, &all).unwrap().is_empty());
}

/// An op of more tickets than one run of the finalize statement takes (`FINALIZE_CHUNK`) is
/// written whole, each ticket once, and counted once.
#[test]
fn an_op_of_many_tickets_is_written_whole() {
    let mut d = db();
    let e = event_with(&mut d, 1_000, None);
    let wanted: Vec<(i64, i64)> = (1..=150).map(|u| (u, 1 + u % 3)).collect();
    let a = apply_fenced_batch(&mut d, &batch(e.id, 1, &[], &rows(&wanted))).unwrap();
    let all = ids(&a);
    assert_eq!(all.len(), 150);
    let facts = pending_facts(&mut d.c, &all).unwrap();
    let seats: i64 = facts.iter().map(|f| f.quantity).sum();
    let mut tickets: Vec<IssuedTicket> = facts
        .iter()
        .map(|f| IssuedTicket {
            facts: *f,
            code: format!("C{}", f.booking_id),
        })
        .collect();
    // Named twice (in different runs of the statement): still written once.
    tickets.push(tickets[3].clone());
    match one(
        &mut d,
        PgOp::Finalize {
            tickets: &tickets,
            at: T0,
        },
    ) {
        PgDone::Finalized(n, s) => assert_eq!((n, s), (150, seats)),
        other => panic!("{other:?}"),
    }
    assert_eq!(ev(&mut d, e.id).finalized_count, seats);
    assert!(pending_facts(&mut d.c, &all).unwrap().is_empty());
    for id in [all[0], all[31], all[32], all[149]] {
        let b = booking(&mut d.c, id).unwrap().unwrap();
        assert_eq!(b.ticket_code.as_deref(), Some(format!("C{id}").as_str()));
    }
}

#[test]
fn finalize_is_idempotent() {
    let mut d = db();
    let e = event_with(&mut d, 5, None);
    let a = apply_fenced_batch(&mut d, &batch(e.id, 1, &[], &rows(&[(1, 3)]))).unwrap();
    let id = ids(&a)[0];
    assert!(finalize(&mut d, id, "CODE", "2024-01-01 00:00:05.000000").is_some());
    assert!(finalize(&mut d, id, "OTHER", "2024-01-01 00:00:06.000000").is_none());
    let b = booking(&mut d.c, id).unwrap().unwrap();
    assert_eq!(
        (b.status, b.ticket_code.as_deref()),
        (BookingStatus::Finalized, Some("CODE"))
    );
    assert_eq!(b.created_at, "2024-01-01T00:00:00.000000Z");
    assert_eq!(
        b.finalized_at.as_deref(),
        Some("2024-01-01T00:00:05.000000Z")
    );
    assert_eq!(ev(&mut d, e.id).finalized_count, 3);
    assert_eq!(
        report(&mut d.c).unwrap(),
        Report {
            events: 1,
            total_capacity: 5,
            total_reserved: 3,
            total_finalized: 3
        }
    );
    assert!(pending_ids(&mut d.c, 0, None, 10).unwrap().is_empty());
}

/// A finalizer issues a booking (its transaction not yet committed) while a batch cancels it:
/// finalizations lock no event row, so only the booking's own row orders the two. The
/// cancellation waits for the issue, then sees the booking FINALIZED and takes its seats out of
/// the issued count: nothing counted as issued that is not. (Reading the booking unlocked, the
/// cancellation judged it PENDING and the issued seats stayed counted.)
#[test]
fn a_cancellation_meeting_an_issue_in_flight_counts_what_was_issued() {
    let mut d = db();
    let url = d._pg.url();
    let e = event_with(&mut d, 5, None);
    let a = apply_fenced_batch(&mut d, &batch(e.id, 1, &[], &rows(&[(7, 2)]))).unwrap();
    let id = ids(&a)[0];
    let Db { w, c, .. } = &mut d;
    let issued = booking(c, id).unwrap().unwrap();
    let mut issuing = c.transaction().unwrap();
    assert_eq!(issue_in(&mut issuing, &[issued]), (1, 2));
    // The batch waits on the issue's row lock (wherever it meets it).
    let applied = cancel_while_it_waits(w, &url, e.id, &[id], || issuing.commit().unwrap());
    assert_eq!(
        (applied.cancelled, applied.freed, applied.freed_issued),
        (1, 2, 2),
        "the cancellation saw the ticket issued"
    );
    let b = booking(&mut d.c, id).unwrap().unwrap();
    assert_eq!(b.status, BookingStatus::Cancelled);
    let row = ev(&mut d, e.id);
    assert_eq!((row.booked_count, row.finalized_count), (0, 0));
    let r = report(&mut d.c).unwrap();
    assert_eq!((r.total_reserved, r.total_finalized), (0, 0));
}

/// Waits until some session of the server waits on a lock.
fn until_a_lock_wait(url: &str) {
    let mut watch = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while watch
        .query_one(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "nobody ever waited");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Commits a batch cancelling `cancels` on `w` in another thread; once that batch waits on a row
/// lock, runs `meanwhile` (which must free it), then answers what the batch did.
fn cancel_while_it_waits(
    w: &mut PgWriter,
    url: &str,
    event: i64,
    cancels: &[i64],
    meanwhile: impl FnOnce(),
) -> BatchApplied {
    let outcome = std::thread::scope(|s| {
        let cancelling = s.spawn(|| {
            let b = batch(event, 2, cancels, &[]);
            w.commit_group(&[PgOp::Batch(&b)])
                .expect("the group commits")
        });
        until_a_lock_wait(url);
        meanwhile();
        cancelling.join().unwrap()
    });
    match outcome.into_iter().next() {
        Some(Ok(PgDone::Batch(Ok(applied)))) => applied,
        other => panic!("{other:?}"),
    }
}

/// Issues `b` (each booking's own facts) in the open transaction `tx`, one statement.
fn issue_in(tx: &mut postgres::Transaction<'_>, b: &[crate::domain::Booking]) -> (i64, i64) {
    try_issue_in(tx, b).unwrap()
}

fn try_issue_in(
    tx: &mut postgres::Transaction<'_>,
    b: &[crate::domain::Booking],
) -> Result<(i64, i64), postgres::Error> {
    let r = tx.query_one(
        super::writer::FINALIZE,
        &[
            &b.iter().map(|b| b.id).collect::<Vec<_>>(),
            &b.iter().map(|b| b.event_id).collect::<Vec<_>>(),
            &b.iter().map(|b| b.user_id).collect::<Vec<_>>(),
            &b.iter().map(|b| b.quantity).collect::<Vec<_>>(),
            &b.iter().map(|b| format!("C{}", b.id)).collect::<Vec<_>>(),
            &T0,
        ],
    )?;
    Ok((r.get(0), r.get(1)))
}

/// A group takes its booking locks first, in id order, whatever order its ops name them in: a
/// cancellation of two bookings (named high id first) against an issue of the same two (low id
/// first, then the other) in another writer's transaction waits instead of deadlocking. (Taking
/// them as each op came, the batch held the high one and waited for the low one, which the
/// issuer held while it waited for the high one.) The issuer's session detects deadlocks after
/// 10 ms, the writer's after the default second, so a deadlock would fail the issuer here.
#[test]
fn a_group_locks_its_bookings_in_id_order() {
    let mut d = db();
    let url = d._pg.url();
    let e = event_with(&mut d, 10, None);
    let a = apply_fenced_batch(&mut d, &batch(e.id, 1, &[], &rows(&[(1, 1), (2, 2)]))).unwrap();
    let (low, high) = (ids(&a)[0], ids(&a)[1]);
    let b_low = booking(&mut d.c, low).unwrap().unwrap();
    let b_high = booking(&mut d.c, high).unwrap().unwrap();
    let Db { w, c, .. } = &mut d;
    c.batch_execute("SET deadlock_timeout = '10ms'").unwrap();
    let mut issuing = c.transaction().unwrap();
    assert_eq!(issue_in(&mut issuing, std::slice::from_ref(&b_low)), (1, 1));
    let mut second = None;
    let applied = cancel_while_it_waits(w, &url, e.id, &[high, low], || {
        // Kept, not unwrapped here: on a deadlock this transaction must end (and free the low
        // booking) before the cancelling thread can be joined.
        let r = try_issue_in(&mut issuing, std::slice::from_ref(&b_high));
        let ended = if r.is_ok() {
            issuing.commit()
        } else {
            issuing.rollback()
        };
        second = Some((r, ended));
    });
    let (r, ended) = second.expect("ran");
    assert_eq!(r.expect("no deadlock"), (1, 2));
    ended.unwrap();
    assert_eq!((applied.cancelled, applied.freed_issued), (2, 3));
    let row = ev(&mut d, e.id);
    assert_eq!((row.booked_count, row.finalized_count), (0, 0));
}

/// The writer's plans are made once, at their first run; made on an empty database they must
/// still look bookings up by key once there are many: every scan of `bookings` with an index
/// condition (planned on an empty `bookings`, the finalize statement scanned every PENDING row
/// at each run — by a hash join, or by walking an index without a condition).
#[test]
fn the_writers_plans_do_not_depend_on_the_tables_size_when_made() {
    let mut d = db();
    let e = event_with(&mut d, 1_000_000, None);
    let c = &mut d.c;
    c.batch_execute(super::writer::SESSION).unwrap();
    c.batch_execute(&format!(
        "PREPARE fin(bigint[], bigint[], bigint[], bigint[], text[], text) AS {};
         PREPARE lock_bookings(bigint[]) AS
             SELECT 1 FROM bookings WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE;
         EXECUTE fin('{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{T0}');
         EXECUTE lock_bookings('{{}}');",
        super::writer::FINALIZE
    ))
    .unwrap();
    c.batch_execute(&format!(
        "INSERT INTO bookings (event_id, user_id, quantity, status, created_at)
         SELECT {}, g, 1, 'PENDING', '{T0}' FROM generate_series(1, 50000) g;",
        e.id
    ))
    .unwrap();
    // The last two: a walk of an index in id order would pass every other row first.
    let (a, b) = (49_999, 50_000);
    for explain in [
        format!(
            "EXPLAIN EXECUTE fin('{{{a},{b}}}', '{{{0},{0}}}', '{{{a},{b}}}', '{{1,1}}', \
             '{{x,y}}', '{T0}')",
            e.id
        ),
        format!("EXPLAIN EXECUTE lock_bookings('{{{a},{b}}}')"),
    ] {
        let plan: Vec<String> = c
            .query(explain.as_str(), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let text = plan.join("\n");
        for bad in [
            "Seq Scan on bookings",
            "Bitmap Heap Scan on bookings",
            "Hash Join",
        ] {
            assert!(!text.contains(bad), "{explain}:\n{text}");
        }
        let scans: Vec<usize> = (0..plan.len())
            .filter(|&i| plan[i].contains("Index Scan using") && plan[i].contains(" on bookings"))
            .collect();
        assert!(!scans.is_empty(), "{explain}:\n{text}");
        for i in scans {
            let cond = plan.get(i + 1).map(|l| l.trim_start());
            assert!(
                cond.is_some_and(|l| l.starts_with("Index Cond:")),
                "a scan of bookings without an index condition: {explain}:\n{text}"
            );
        }
    }
}

/// The sweep's page walks the PENDING index from its cursor and stops at the page's end, whatever
/// the statistics say (here: none yet, as in a sale's first minute before autovacuum's first
/// analyze) — not a bitmap of every PENDING booking past the cursor, sorted for each page.
#[test]
fn the_sweep_walks_its_index_a_page_at_a_time() {
    let mut d = db();
    let e = event_with(&mut d, 1_000_000, None);
    let c = &mut d.c;
    c.batch_execute(&format!(
        "ALTER TABLE bookings SET (autovacuum_enabled = false);
         INSERT INTO bookings (event_id, user_id, quantity, status, created_at)
         SELECT {0}, g, 1, CASE WHEN g % 10 = 0 THEN 'FINALIZED' ELSE 'PENDING' END, '{T0}'
             FROM generate_series(1, 60000) g;",
        e.id
    ))
    .unwrap();
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(super::queries::PENDING_IDS_PLAN).unwrap();
    let explain = format!("EXPLAIN {}", super::queries::PENDING_IDS);
    let plan: Vec<String> = tx
        .query(explain.as_str(), &[&0i64, &None::<String>, &1000i64])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.commit().unwrap();
    let text = plan.join("\n");
    assert!(
        text.contains("Scan using ix_bookings_pending on bookings"),
        "{text}"
    );
    for bad in ["Bitmap", "Sort", "Seq Scan"] {
        assert!(!text.contains(bad), "{bad}:\n{text}");
    }
    // And the walk itself: every PENDING booking once, in order, a page at a time.
    let (mut after, mut seen) = (0, Vec::new());
    loop {
        let page = super::queries::pending_ids(c, after, None, 1000).unwrap();
        let Some(&last) = page.last() else { break };
        assert!(page.windows(2).all(|w| w[0] < w[1]));
        after = last;
        seen.extend(page);
    }
    assert_eq!(
        seen.len(),
        60_000 - 6_000,
        "the PENDING ones (every 10th is FINALIZED)"
    );
}

/// Each writer counts in a slot of its own: two writers never share the rows they count in.
#[test]
fn each_writer_claims_a_counting_slot_of_its_own() {
    let mut d = db();
    let other = PgWriter::connect(&d._pg.url()).unwrap();
    let (a, b) = (d.w.slot, other.slot);
    assert!(a.is_some() && b.is_some() && a != b, "{a:?} {b:?}");
    let e = event_with(&mut d, 5, None);
    let done = apply_fenced_batch(&mut d, &batch(e.id, 1, &[], &rows(&[(1, 2)]))).unwrap();
    assert!(finalize(&mut d, ids(&done)[0], "CODE", T0).is_some());
    let slots: Vec<i32> =
        d.c.query(
            "SELECT slot FROM event_finalized UNION SELECT id FROM report_totals WHERE booked <> 0",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(slots, vec![a.unwrap()], "counted in the writer's slot");
}

#[test]
fn totals_do_not_overflow_past_i64() {
    let mut d = db();
    // 3,000 events of the largest capacity the API allows, in 30 groups: past i64::MAX.
    for _ in 0..30 {
        let ops: Vec<PgOp<'_>> = (0..100)
            .map(|_| PgOp::CreateEvent {
                title: "big",
                capacity: 4096 * 1_000_000_000_000,
                max_per_user: None,
                key: None,
                now_ms: T0_MS,
                keys_live_after_ms: LIVE_MS,
            })
            .collect();
        d.w.commit_group(&ops).unwrap();
    }
    let r = report(&mut d.c).unwrap();
    assert_eq!(r.total_capacity, 3_000 * 4096 * 1_000_000_000_000_i128);
    assert!(r.total_capacity > i64::MAX as i128);
    assert_eq!(r.events, 3_000);
}

/// A group of many batches: one refused by its fence, one for seats, one for a missing event —
/// the rest commit, in one round trip; an op that *errors* is taken out and the group runs
/// again without it (its COMMIT rolled back; one more round trip).
#[test]
fn a_group_commits_in_one_round_trip_and_refusals_stay_alone() {
    let mut d = db();
    let events: Vec<i64> = (0..50).map(|_| event_with(&mut d, 2, None).id).collect();
    // Event 0 has seen token 9: token 1 is stale there.
    apply_fenced_batch(&mut d, &batch(events[0], 9, &[], &[])).unwrap();
    let two = rows(&[(1, 1), (2, 1)]);
    let three = rows(&[(1, 3)]);
    let mut batches: Vec<FencedBatch<'_>> =
        events.iter().map(|&e| batch(e, 1, &[], &two)).collect();
    batches[1] = batch(events[1], 1, &[], &three);
    batches.push(batch(9_999, 1, &[], &two));
    let long_title = "x".repeat(300);
    let mut ops: Vec<PgOp<'_>> = batches.iter().map(PgOp::Batch).collect();
    let before = d.w.round_trips;
    let done = d.w.commit_group(&ops).unwrap();
    assert_eq!(d.w.round_trips - before, 1, "one group, one round trip");
    assert!(matches!(
        &done[0],
        Ok(PgDone::Batch(Err(Refusal::Fenced(_))))
    ));
    assert!(matches!(
        &done[1],
        Ok(PgDone::Batch(Err(Refusal::NoSeats(_))))
    ));
    assert!(matches!(
        &done[50],
        Ok(PgDone::Batch(Err(Refusal::NoEvent)))
    ));
    for (i, o) in done.iter().enumerate().take(50).skip(2) {
        assert!(
            matches!(o, Ok(PgDone::Batch(Ok(a))) if a.booked_after == 2),
            "batch {i}: {o:?}"
        );
    }
    let sold: i64 =
        d.c.query_one("SELECT SUM(booked_count)::bigint FROM events", &[])
            .unwrap()
            .get(0);
    assert_eq!(sold, 48 * 2);
    assert_eq!(report(&mut d.c).unwrap().total_reserved, 96);

    // An op that errors (a title the column refuses: the API never sends one).
    let more: Vec<FencedBatch<'_>> = events.iter().map(|&e| batch(e, 10, &[], &[])).collect();
    ops = more.iter().map(PgOp::Batch).collect();
    ops.insert(
        3,
        PgOp::CreateEvent {
            title: &long_title,
            capacity: 1,
            max_per_user: None,
            key: None,
            now_ms: T0_MS,
            keys_live_after_ms: LIVE_MS,
        },
    );
    let before = d.w.round_trips;
    let done = d.w.commit_group(&ops).unwrap();
    assert_eq!(
        d.w.round_trips - before,
        2,
        "applied and rolled back by the error, then run again without it and committed"
    );
    assert!(done[3].is_err());
    assert_eq!(done.iter().filter(|o| o.is_ok()).count(), 50);
    assert_eq!(ev(&mut d, events[5]).fence, 10, "the others committed");
}

/// Not an assertion on time (the machine is shared): how a group of 200 batches compares with
/// 200 groups of one, printed with `--nocapture`.
#[test]
fn pipelining_measured() {
    let mut d = db();
    let events: Vec<i64> = (0..200)
        .map(|_| event_with(&mut d, 1_000, None).id)
        .collect();
    let ten = rows(&[(1, 1); 10]);
    let batches: Vec<FencedBatch<'_>> = events.iter().map(|&e| batch(e, 1, &[], &ten)).collect();
    let ops: Vec<PgOp<'_>> = batches.iter().map(PgOp::Batch).collect();
    let t = std::time::Instant::now();
    d.w.commit_group(&ops).unwrap();
    let grouped = t.elapsed();
    let t = std::time::Instant::now();
    for op in &ops {
        d.w.commit_group(std::slice::from_ref(op)).unwrap();
    }
    let single = t.elapsed();
    eprintln!(
        "2,000 bookings in 200 batches: one group {grouped:?} (2 round trips), \
         200 groups {single:?} (400 round trips, 200 fsyncs)"
    );
    assert_eq!(ev(&mut d, events[0]).booked_count, 20);
}
