#!/usr/bin/env python3
"""`make mutants`: proves that the test suite guards every promise of DESIGN.md.

For each mutant below, plant one deliberate bug into a scratch copy of the working tree
(target/mutants/tree; the real tree is never touched), run the tests that target that promise,
and require every one of them to FAIL; then restore the file. A mutant that survives, or that
does not even build, fails the run. Before any mutant, the same tests must pass on the
unmutated copy (a test that fails without a bug proves nothing).

    python3 scripts/mutants.py              every mutant, its targeted tests
    python3 scripts/mutants.py fence lease  only mutants whose name contains one of the words
    python3 scripts/mutants.py --suite ...  also run the whole suite per mutant and list every
                                            test that fails (slow: a full suite per mutant)
    python3 scripts/mutants.py --list       the table of mutants, nothing run

Prints a table: mutant -> promise -> killing tests. Not part of `make test` (it builds once per
mutant); run it before resolving an issue that touches a promise, and add a mutant for every
promise you add. The loom models have their own mutants (`make loom-mutants`).

Test names: `<test binary>::<test name>` for tests/, `lib::<module path>::<test>` for unit tests.
"""
import os, re, shutil, signal, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "target", "mutants")
TREE = os.path.join(WORK, "tree")
TARGET = os.path.join(WORK, "target")
FEATURES = ["--features", "failpoints"]
TEST_TIMEOUT = 300  # seconds per test run; a hang counts as a kill, and is reported as one


class Mutant:
    """One planted bug: `path, old, new` replaces one exact, unique piece of code; `more` adds
    further (path, old, new) edits when the bug spans several places."""
    def __init__(self, name, promise, what, path, old, new, tests, more=()):
        self.name, self.promise, self.what = name, promise, what
        self.edits = [(path, old, new), *more]
        self.tests = tests


MUTANTS = [
    # Promise 1: never oversell.
    Mutant("no-capacity-check", "1 never oversell",
           "the fenced update no longer checks capacity (the trigger still aborts)",
           "src/store/sqlite.rs",
           "WHERE id = ?3 AND fence <= ?2 AND booked_count + ?1 <= capacity",
           "WHERE id = ?3 AND fence <= ?2",
           ["lib::store::sqlite::tests::fenced_batch_refuses_stale_tokens_and_missing_seats",
            "cluster::a_stale_view_cannot_sell_seats_another_replica_sold::sqlite"]),
    Mutant("no-trigger", "1 never oversell",
           "the oversell trigger never fires",
           "src/store/schema.rs",
           "WHEN NEW.booked_count > NEW.capacity OR NEW.booked_count < 0",
           "WHEN 0",
           ["lib::store::schema::tests::adopts_the_old_services_file"]),
    Mutant("no-fence", "1 never oversell",
           "the fenced update without `fence <= token`",
           "src/store/sqlite.rs",
           "WHERE id = ?3 AND fence <= ?2 AND booked_count + ?1 <= capacity",
           "WHERE id = ?3 AND booked_count + ?1 <= capacity",
           ["lib::store::sqlite::tests::fenced_batch_refuses_stale_tokens_and_missing_seats",
            "cluster::fencing_refuses_a_holder_whose_lease_expired::sqlite"],
           more=[("src/store/sqlite.rs", "    if row.fence > b.token {\n", "    if false {\n")]),
    Mutant("bare-refusal-kept", "1 never oversell",
           "a refused batch alone in its group (no savepoint) is not rolled back: its booking "
           "rows past capacity commit",
           "src/actors/persistence/sqlite.rs",
           "            if a.undone() && bare {",
           "            if a.undone() && bare && false {",
           ["lib::actors::persistence::sqlite::tests::a_refused_batch_leaves_nothing_wherever_it_is_in_its_group"]),
    Mutant("batch-without-savepoint", "1 never oversell",
           "every batch runs bare, so one refused after another op of its group is not undone",
           "src/actors/persistence/sqlite.rs",
           "            let a = apply(&tx, op, at, !bare);",
           "            let a = apply(&tx, op, at, false);",
           ["lib::actors::persistence::sqlite::tests::a_refused_batch_leaves_nothing_wherever_it_is_in_its_group"]),
    Mutant("failed-op-kept", "2 a 200 means committed",
           "an op that failed after writing is not undone when it ran bare (only refusals are)",
           "src/actors/persistence.rs",
           "matches!(self, Applied::SeatsRefused { .. } | Applied::Error(..))",
           "matches!(self, Applied::SeatsRefused { .. })",
           ["lib::actors::persistence::sqlite::tests::a_failed_op_leaves_nothing_and_a_lost_transaction_fails_its_group"]),
    Mutant("lost-transaction-goes-on", "2 a 200 means committed",
           "after SQLite rolled the group's transaction back, the group goes on: the ops after it "
           "commit one by one, outside any transaction, while the group is answered as failed",
           "src/actors/persistence/sqlite.rs",
           "            if a.undone() && self.conn.is_autocommit() {",
           "            if a.undone() && self.conn.is_autocommit() && false {",
           ["lib::actors::persistence::sqlite::tests::a_failed_op_leaves_nothing_and_a_lost_transaction_fails_its_group"]),
    Mutant("lease-no-incr", "1 never oversell",
           "the Redis lease script hands out the current token instead of INCR-ing it",
           "src/coord/redis.rs",
           "local token = redis.call('INCR', KEYS[2])",
           "local token = tonumber(redis.call('GET', KEYS[2]) or '0')",
           ["cluster::lease_protocol_on_redis_fences_and_takes_turns",
            "cluster::fencing_refuses_a_holder_whose_lease_expired::sqlite"]),
    Mutant("allocate-unchecked", "1 never oversell",
           "the actor's allocation rule takes a request whatever is left",
           "src/domain/seats.rs",
           "if quantity < 1 || quantity > remaining {",
           "if quantity < 1 {",
           ["lib::domain::seats::tests::allocation_is_first_come_first_served_without_partial_fills",
            "concurrency::four_hundred_clients_on_a_hundred_seats::sqlite"]),
    # Promise 2: never lose an acknowledged booking.
    Mutant("left-open-transaction-kept", "2 a 200 means committed",
           "a transaction left open by a failed ROLLBACK is not rolled back before the next group",
           "src/actors/persistence/sqlite.rs",
           "    if !conn.is_autocommit() {\n        error!(",
           "    if false {\n        error!(",
           ["lib::actors::persistence::sqlite::tests::a_transaction_left_open_is_rolled_back_before_the_next_group"]),
    Mutant("reply-before-commit", "2 a 200 means committed",
           "booking replies sent before COMMIT",
           "src/actors/persistence/sqlite.rs",
           "    // The report's totals move in the same transaction as the rows they sum.",
           """    for a in applied.iter_mut() {
        if let Applied::Seats { answers, .. } = a {
            for (req, answer) in answers.drain(..) {
                let _ = req.reply.send(answer);
            }
        }
    }
    // The report's totals move in the same transaction as the rows they sum.""",
           ["crash::a_failed_commit_acknowledges_nothing::sqlite"]),
    Mutant("synchronous-off", "2 a 200 means committed",
           "PRAGMA synchronous FULL -> OFF",
           "src/store/mod.rs",
           'conn.pragma_update(None, "synchronous", "FULL")?;',
           'conn.pragma_update(None, "synchronous", "OFF")?;',
           ["lib::store::tests::the_writer_commits_durably_in_wal_mode"]),
    Mutant("synchronous-normal", "2 a 200 means committed",
           "PRAGMA synchronous FULL -> NORMAL (WAL commits not fsynced)",
           "src/store/mod.rs",
           'conn.pragma_update(None, "synchronous", "FULL")?;',
           'conn.pragma_update(None, "synchronous", "NORMAL")?;',
           ["lib::store::tests::the_writer_commits_durably_in_wal_mode"]),
    # Promise 3: issued exactly once in effect, never after a cancellation.
    Mutant("finalize-any-status", "3 issued once, never cancelled",
           "finalize without `status = 'PENDING'`",
           "src/store/sqlite.rs",
           "WHERE id = ?1 AND status = 'PENDING' AND event_id = ?4",
           "WHERE id = ?1 AND event_id = ?4",
           ["lib::store::sqlite::tests::finalize_is_idempotent",
            "lib::store::sqlite::tests::tickets_are_written_many_at_a_time_and_only_for_their_booking",
            "finalizer::a_booking_cancelled_during_issuance_is_never_finalized"]),
    Mutant("finalize-other-facts", "3 issued once, never cancelled",
           "a ticket is written whatever facts the queue carried (a code for another booking)",
           "src/store/sqlite.rs",
           " AND event_id = ?4 AND user_id = ?5\n           AND quantity = ?6\",",
           " AND ?4 + ?5 + ?6 IS NOT NULL\",",
           ["lib::store::sqlite::tests::tickets_are_written_many_at_a_time_and_only_for_their_booking"]),
    Mutant("finalize-counts-per-call", "3 issued once, never cancelled",
           "an event's finalized_count moves by every ticket handed in, written or not",
           "src/store/sqlite.rs",
           "        if changed == 1 {\n            written += 1;",
           "        {\n            written += changed;",
           ["lib::store::sqlite::tests::finalize_is_idempotent",
            "lib::store::sqlite::tests::tickets_are_written_many_at_a_time_and_only_for_their_booking"]),
    Mutant("issue-before-due", "3 issued once, never cancelled",
           "the delay line issues tickets before their delivery is due",
           "src/actors/finalizer.rs",
           "Some(job) => line.push_back((Instant::now() + deps.delay, job)),",
           "Some(job) => line.push_back((Instant::now(), job)),",
           ["finalizer::a_booking_cancelled_during_issuance_is_never_finalized",
            "finalizer::each_ticket_waits_its_delivery_and_no_longer"]),
    Mutant("issuance-gathers-nothing", "5 fast, sustained",
           "a worker whose line holds a batch's worth takes only what is due, as before 2026-12-06 (ops of ~8 tickets at the default delay)",
           "src/actors/finalizer.rs",
           "Some((full, _)) => gathered.min(*full),",
           "Some(_) => *first,",
           ["lib::actors::finalizer::tests::a_batch_gathers_what_falls_due_unless_a_full_one_is_due"]),
    Mutant("issuance-per-worker-cap", "5 fast, sustained",
           "issuances wait for a slot among 1,024 per worker again, whatever FINALIZE_IN_FLIGHT says",
           "src/startup.rs",
           "                    config.finalize_in_flight as usize,",
           "                    1024,",
           ["finalizer::each_ticket_waits_its_delivery_and_no_longer"]),
    # Promise 4: only the holder or the organizer acts; codes cannot be forged.
    Mutant("urgent-work-lingers", "5 fast, sustained",
           "a batch of bookings lingers like ticket issuances for company before its commit",
           "src/handoff.rs",
           "st.items.iter().all(&can_wait)",
           "st.items.iter().all(|_| true)",
           ["lib::handoff::tests::work_that_can_wait_lingers_for_company_but_not_past_its_bound"]),
    Mutant("linger-past-bound", "3 issued, 5 fast, sustained",
           "issuances wait far past their linger when no batch of bookings comes",
           "src/handoff.rs",
           "self.ready.wait_timeout(st, left)",
           "self.ready.wait_timeout(st, left * 50)",
           ["lib::handoff::tests::work_that_can_wait_lingers_for_company_but_not_past_its_bound"]),
    Mutant("queue-forgets-what-it-holds", "3 issued once, 5 fast, sustained",
           "the embedded queue's set of ids in flight never says an id is already in",
           "src/coord/queue.rs",
           """        if p.bits[word] & mask != 0 {
            return false;
        }
        p.bits[word] |= mask;""",
           """        p.bits[word] |= mask;""",
           ["lib::coord::queue::tests::an_id_set_is_a_set",
            "lib::coord::queue::tests::the_local_queue_tracks_each_booking_once"]),
    Mutant("verify-no-mac", "4 tickets cannot be forged",
           "/ticket/verify skips the MAC check",
           "src/api/tickets.rs",
           "if !state.signer.verify(&code, &TicketFacts::from(&b)) {",
           "if false && !state.signer.verify(&code, &TicketFacts::from(&b)) {",
           ["finalizer::ticket_verification"]),
    Mutant("verify-no-stored-code", "4 tickets cannot be forged",
           "/ticket/verify accepts a genuine MAC that is not the issued code",
           "src/api/tickets.rs",
           "BookingStatus::Finalized if b.ticket_code.as_deref() == Some(code.as_str()) => {}",
           "BookingStatus::Finalized => {}",
           ["finalizer::ticket_verification"]),
    Mutant("mac-compare-inverted", "4 tickets cannot be forged",
           "the signer's MAC comparison inverted",
           "src/ticket.rs",
           "constant_time_eq(&given, &self.mac(f))",
           "!constant_time_eq(&given, &self.mac(f))",
           ["lib::ticket::tests::codes_are_stable_and_bound_to_the_facts",
            "api::tickets_are_issued_with_a_verifiable_code::sqlite"]),
    Mutant("ct-eq-ignores-length", "4 only the holder or the organizer",
           "the constant-time comparison ignores a length difference (zero-padded prefix passes)",
           "src/secrets.rs",
           "let mut diff = (given.len() ^ expected.len()) as u64;",
           "let mut diff = 0u64;",
           ["lib::secrets::tests::equal_only_when_every_byte_and_the_length_agree"]),
    Mutant("organizer-any-token", "4 only the organizer",
           "the organizer token check accepts any bearer token",
           "src/api/auth.rs",
           "    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {\n        Ok(())",
           "    if !given.is_empty() {\n        Ok(())",
           ["finalizer::poison_entries_are_dead_lettered_counted_and_replayable::sqlite",
            "security::organizer_operations_need_the_token"]),
    Mutant("organizer-reads-any-booking", "4 only the holder or the organizer",
           "any bearer token reads any booking",
           "src/api/auth.rs",
           "(Some(expected), Some(given)) => constant_time_eq(given.as_bytes(), expected.as_bytes()),",
           "(Some(_), Some(_)) => true,",
           ["security::organizer_operations_need_the_token"]),
    Mutant("booking-no-secret", "4 only the holder or the organizer",
           "GET /book/{id} (and cancel) without checking the secret",
           "src/api/bookings.rs",
           "Some(b) if auth::may_act_on(state, req, &TicketFacts::from(&b)) => Ok(b),",
           "Some(b) => Ok(b),",
           ["security::bookings_are_invisible_without_their_secret"]),
    Mutant("secret-is-the-id", "4 only the holder or the organizer",
           "the booking secret derived from public facts only (no key)",
           "src/ticket.rs",
           'data_encoding::BASE64URL_NOPAD.encode(&self.hmac("ticketd-secret-v1", f)[..SECRET_BYTES])',
           'format!("{:0>32}", f.booking_id)',
           ["lib::ticket::tests::booking_secrets_are_long_url_safe_and_bound_to_the_booking",
            "security::bookings_are_invisible_without_their_secret"]),
    Mutant("secret-in-the-log", "4 secrets never logged",
           "request spans record the query string (where `?secret=` travels)",
           "src/telemetry.rs",
           "http.target = %request.path(),",
           "http.target = %request.uri(),",
           ["security::secrets_never_reach_the_log"]),
    # Cancellation: seats come back exactly once, everywhere.
    Mutant("cancel-frees-nothing", "1 exact seats (cancellation)",
           "a cancellation does not give its seats back",
           "src/store/sqlite.rs",
           "            freed += booking.quantity;\n",
           "",
           ["lib::store::sqlite::tests::cancelled_seats_return_and_are_counted_once",
            "lifecycle::cancellation_during_a_flash_sale::sqlite"]),
    Mutant("cancel-twice-frees-twice", "1 never oversell",
           "cancelling a cancelled booking frees its seats again",
           "src/store/sqlite.rs",
           "        if booking.status != BookingStatus::Cancelled {\n",
           "        if true {\n",
           ["lib::store::sqlite::tests::cancelled_seats_return_and_are_counted_once"]),
    Mutant("sold-out-never-reopens", "1 exact seats (cancellation)",
           "other replicas ignore the seats-returned notice",
           "src/actors/registry.rs",
           "            slot.value.sold_out.clear();",
           "            let _ = &slot;",
           ["lifecycle::a_cancellation_reopens_a_sold_out_event_on_every_replica::sqlite"]),
    Mutant("stale-view-refuses", "1 exact seats (cancellation)",
           "the actor refuses on a view nobody confirmed under its lease",
           "src/actors/event.rs",
           "token == self.confirmed || token == self.confirmed + 1",
           "token >= 0",
           ["lifecycle::a_cancellation_reopens_a_sold_out_event_on_every_replica::sqlite"]),
    Mutant("sold-out-kept-on-cancel", "1 exact seats (cancellation)",
           "a batch with cancellations leaves the sold-out fast path on until the actor hears of it",
           "src/actors/event.rs",
           "            self.sold_out.clear();\n        }\n        self.phase = Phase::Committing;",
           "        }\n        self.phase = Phase::Committing;",
           ["lifecycle::a_cancelled_seat_can_be_booked_again_at_once::sqlite"]),
    # Per-customer limit: the store's word is final.
    Mutant("limit-not-in-store", "1 never pass the limit",
           "the store's upsert adds seats without checking the limit (the trigger still aborts)",
           "src/store/sqlite.rs",
           "DO UPDATE SET seats = seats + excluded.seats\n             WHERE seats + excluded.seats <= ?4",
           "DO UPDATE SET seats = seats + excluded.seats",
           ["lib::store::sqlite::tests::the_limit_is_enforced_by_the_store",
            "lifecycle::the_per_customer_limit_holds_under_concurrency_and_across_replicas::sqlite"],
           more=[("src/store/sqlite.rs", "let took = nb.quantity <= limit\n", "let took = true\n")]),
    Mutant("limit-check-off", "1 never pass the limit",
           "the per-customer CHECK no longer bounds a customer's seats",
           "src/store/schema.rs",
           "CHECK (seats >= 0 AND seats <= max_seats)",
           "CHECK (seats >= 0)",
           ["lib::store::sqlite::tests::the_limit_is_enforced_by_the_store",
            "lib::store::schema::tests::the_limit_check_survives_the_move_off_triggers"]),
    # Idempotency keys: one booking per key, across crashes and replicas.
    Mutant("key-not-checked", "2 a retry never books twice",
           "the writer books a keyed request whose key is live",
           "src/store/sqlite.rs",
           "    Ok(n == 1)\n}",
           "    Ok(n < 2)\n}",
           ["lib::store::sqlite::tests::idempotency_keys_name_one_booking_and_expire",
            "lifecycle::one_key_one_booking::sqlite",
            "lifecycle::a_retry_after_a_crash_gets_the_original_booking::sqlite",
            "lifecycle::a_retry_through_nginx_after_a_replica_died_gets_the_original_booking::sqlite"]),
    Mutant("key-any-body", "2 a retry never books twice",
           "a key reused with another body replays instead of 422",
           "src/api/idempotency.rs",
           "    if key.fingerprint == first {",
           "    if !first.is_empty() {",
           ["lifecycle::one_key_one_booking::sqlite"]),
    Mutant("key-scopes-collide", "2 a retry never books twice",
           "every customer's keys stored in one scope (SQLite's scope code): one user's key "
           "replays another user's booking",
           "src/domain/booking.rs",
           "            KeyScope::Customer(user_id) => user_id,",
           "            KeyScope::Customer(_) => 1,",
           ["lib::domain::booking::tests::a_scope_keeps_its_identity_in_both_stored_forms",
            "lifecycle::one_key_one_booking::sqlite"]),
    Mutant("key-migration-drops-customers", "2 a retry never books twice",
           "the migration to integer scopes keeps only the organizer's keys: a retry after an "
           "upgrade books again",
           "src/store/schema.rs",
           "OR (scope GLOB 'user:[1-9]*' AND NOT substr(scope, 6) GLOB '*[^0-9]*')",
           "OR 0",
           ["lib::store::schema::tests::key_scopes_become_codes_and_keys_still_replay"]),
    Mutant("key-text-scope-stored", "2 a retry never books twice",
           "the file takes a text scope beside the integer ones: a replica of the older binary, "
           "mid-rollout, writes keys the others never find",
           "src/store/schema.rs",
           "scope INTEGER NOT NULL CHECK (typeof(scope) = 'integer'),",
           "scope INTEGER NOT NULL,",
           ["lib::store::schema::tests::key_scopes_become_codes_and_keys_still_replay"]),
    Mutant("import-key-scope-as-code", "2 a retry never books twice (moving to PostgreSQL)",
           "the import writes SQLite's scope code where PostgreSQL keeps the text form: imported "
           "keys are never found",
           "src/store/import.rs",
           "            line.text(&scope.to_string());",
           "            line.text(&code.to_string());",
           ["import::a_sale_moves_from_sqlite_to_postgres_and_goes_on_where_it_stood"]),
    # Customer tokens.
    Mutant("jwt-expired-accepted", "4 only the holder",
           "customer tokens are accepted after `exp`",
           "src/api/auth.rs",
           "        validation.leeway = 5;",
           "        validation.leeway = 5;\n        validation.validate_exp = false;",
           ["lifecycle::customer_tokens::bookings_need_the_customers_token_and_it_reads_their_own"]),
    Mutant("jwt-books-for-anyone", "4 only the holder",
           "a customer token books for any user_id",
           "src/api/bookings.rs",
           "    if customer.is_some_and(|c| c != new.user_id) {",
           "    if customer.is_some_and(|c| c < 0) {",
           ["lifecycle::customer_tokens::bookings_need_the_customers_token_and_it_reads_their_own"]),
    Mutant("jwt-reads-any-booking", "4 only the holder",
           "any customer token reads any booking",
           "src/api/auth.rs",
           "matches!(customer(state, req), Ok(Some(user)) if user == booking.user_id)",
           "matches!(customer(state, req), Ok(Some(_)))",
           ["lifecycle::customer_tokens::bookings_need_the_customers_token_and_it_reads_their_own"]),
    Mutant("busy-becomes-500", "5 overload is a 503 to retry",
           "a busy database relayed to waiters as an internal error",
           "src/store/mod.rs",
           "            StoreError::Sqlite(e) if is_busy(e) => StoreError::Busy,\n",
           "",
           ["lib::api::errors::tests::relayed_store_errors_keep_their_kind"]),
    # Promise 5: overload is answered at once, queues are bounded.
    Mutant("unbounded-event-queue", "5 bounded queues, quick 503",
           "the event actor's queue has no limit",
           "src/actors/event.rs",
           "if self.queued() >= self.deps.tuning.event_queue_limit {",
           "if false && self.queued() >= self.deps.tuning.event_queue_limit {",
           ["concurrency::overload_is_answered_at_once_with_retry_after::sqlite"]),
    # Promise 6: bad input gets a clear 4xx.
    Mutant("user-id-zero", "6 bad input is a 4xx",
           "validation accepts user_id 0",
           "src/domain/input.rs",
           'let user_id = f.int("user_id", customer, 1, i64::MAX);',
           'let user_id = f.int("user_id", customer, 0, i64::MAX);',
           ["lib::domain::input::tests::booking_rules", "api::booking_validation_never_500s::sqlite"]),
    Mutant("path-id-signs", "6 bad input is a 4xx",
           "path ids accept a sign (`/book/+1`)",
           "src/domain/input.rs",
           "    !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit())",
           "    !raw.is_empty() && !raw.starts_with('-')",
           ["lib::domain::input::tests::path_ids", "hostile::edge_path_ids_are_plain_digits"]),
    Mutant("invisible-titles", "6 bad input is a 4xx",
           "titles accept bidi-control and zero-width characters",
           "src/domain/input.rs",
           "                } else if s.chars().any(invisible) {",
           "                } else if s.is_empty() {",
           ["lib::domain::input::tests::event_rejects_each_bad_field", "hostile::edge_titles_refuse_invisible_characters"]),
    # Promise 7: a hostile client cannot take the service down.
    Mutant("no-body-deadline", "7 hostile clients",
           "request bodies get a thousand times the body timeout",
           "src/api/body.rs",
           "            deadline: Instant::now() + timeout,",
           "            deadline: Instant::now() + timeout * 1000,",
           ["hostile::stalled_bodies_are_cut_at_the_body_deadline",
            "hostile::sigterm_is_not_held_by_stalled_bodies"]),
    Mutant("unread-body-drained", "7 hostile clients",
           "a response no longer keeps its request's body alive (actix drains a chunked body forever)",
           "src/api/body.rs",
           "        _request: Some(body),",
           "        _request: { drop(body); None },",
           ["hostile::stalled_bodies_are_cut_at_the_body_deadline"]),
    Mutant("no-connection-cap", "7 hostile clients",
           "MAX_CONNECTIONS is not applied",
           "src/startup.rs",
           "max_connections.div_ceil(http_workers)",
           "25_000",
           ["hostile::the_connection_cap_holds_past_max_connections"]),
    Mutant("loud-dispatcher", "7 hostile clients",
           "actix-http's parse errors are logged at ERROR again",
           "src/telemetry.rs",
           'const QUIET_DISPATCHER: &str = "actix_http::h1::dispatcher=off";',
           'const QUIET_DISPATCHER: &str = "actix_http::h1::dispatcher=error";',
           ["hostile::malformed_floods_keep_the_log_quiet"]),
    Mutant("no-throttle", "7 hostile clients",
           "repeated warnings are all written",
           "src/telemetry.rs",
           "        if b.written < self.burst {",
           "        if b.written < u32::MAX {",
           ["lib::telemetry::tests::a_flood_of_one_warning_is_written_a_few_times_then_counted"]),
    Mutant("ready-detail-to-anyone", "7 hostile clients",
           "/ready shows its detail to anyone",
           "src/api/health.rs",
           "    if auth::require_organizer(&state, &req).is_ok() {",
           "    if auth::require_organizer(&state, &req).is_ok() || true {",
           ["hostile::edge_ready_detail_for_the_organizer_only"]),
    Mutant("503-leaks-cause", "7 hostile clients",
           "a 503's body names its cause",
           "src/api/errors.rs",
           '                tracing::warn!(cause = %why, "answered 503");\n                res.json(Detail::of(self))',
           '                res.json(serde_json::json!({ "detail": format!("{self}: {why}") }))',
           ["hostile::edge_503_does_not_leak_internals"]),
    Mutant("no-head", "7 hostile clients",
           "HEAD is refused where GET is served",
           "src/api/mod.rs",
           "guard::Any(guard::Get()).or(guard::Head())",
           "guard::Any(guard::Get())",
           ["hostile::edge_head_wherever_get"]),
    Mutant("pipeline-read-unbounded", "7 hostile clients",
           "a connection's pipelined requests are read a MiB at a time, not 4 KiB",
           "src/server.rs",
           "read_chunk: 4096,",
           "read_chunk: 1 << 20,",
           ["hostile::pipelining_without_reading_holds_bounded_memory"]),
    Mutant("no-cors", "9 fits its ecosystem",
           "CORS is gone again (the old service allowed any origin)",
           "src/startup.rs",
           "                .wrap(api::cors(&cors_origins))\n",
           "",
           ["api::cors_like_the_old_service_and_narrowed_by_setting::sqlite"]),
    Mutant("cors-ignores-setting", "9 fits its ecosystem",
           "CORS_ORIGINS is ignored: any origin passes",
           "src/api/mod.rs",
           "        crate::config::CorsOrigins::Only(list) => list\n            .iter()\n            .fold(cors, |cors, origin| cors.allowed_origin(origin)),",
           "        crate::config::CorsOrigins::Only(_) => cors.allow_any_origin(),",
           ["api::cors_like_the_old_service_and_narrowed_by_setting::sqlite"]),
    Mutant("sigint-forced", "2 a 200 means committed",
           "actix-server handles SIGINT again (a forced stop)",
           "src/startup.rs",
           "            .disable_signals();",
           "            ;",
           ["crash::sigint_during_a_burst_commits_every_acknowledged_booking::sqlite"]),
    Mutant("cluster-nginx-gets-ctrl-c", "2 a 200 means committed",
           "make cluster's nginx shares the terminal's process group again (Ctrl-C is its fast stop)",
           "scripts/cluster.sh",
           'setsid "$NGINX" -p',
           '"$NGINX" -p',
           ["crash::ctrl_c_on_make_cluster_answers_every_committed_booking::sqlite"]),
    Mutant("spec-security-not-in-force", "9 fits its ecosystem",
           "/openapi.json describes every security scheme whatever is set (open operations said locked)",
           "src/api/openapi.rs",
           "                    *security = security_in_force(path, security, access);",
           "                    *security = security_in_force(path, security, Access::ALL);",
           ["lib::api::openapi::tests::the_security_described_is_the_security_in_force"]),
    Mutant("cors-refusal-plain-text", "6 bad input is a 4xx JSON error",
           "a refused CORS preflight is answered in plain text again",
           "src/startup.rs",
           "                .wrap(actix_web::middleware::from_fn(api::cors_errors_as_json))\n",
           "",
           ["api::cors_like_the_old_service_and_narrowed_by_setting::sqlite"]),
    Mutant("listing-cursor-skips", "9 fits its ecosystem",
           "the listing's next cursor skips an event",
           "src/api/events.rs",
           "        Some(last) if more => Some(last.id),",
           "        Some(last) if more => Some(last.id + 1),",
           ["api::events_are_listed_a_page_at_a_time::sqlite"]),
    Mutant("access-log-query", "4 only the holder",
           "the access log writes the query string (where `?secret=` travels)",
           "src/telemetry.rs",
           "    let path = req.path().to_string();",
           "    let path = req.uri().to_string();",
           ["security::one_access_line_per_request_without_the_query",
            "security::secrets_never_reach_the_log"]),
    Mutant("no-access-log", "9 fits its ecosystem",
           "no access line per request",
           "src/startup.rs",
           "        let access_log = tracing::enabled!(target: \"access\", tracing::Level::INFO);",
           "        let access_log = false;",
           ["security::one_access_line_per_request_without_the_query"]),
    Mutant("metrics-seats-not-counted", "9 fits its ecosystem",
           "/metrics: the writer no longer counts the seats it sold",
           "src/actors/persistence.rs",
           "    m.seats_sold.increment(sold.unsigned_abs());",
           "    m.seats_sold.increment(0);",
           ["metrics::counters_move_by_exactly_what_happened"]),
    Mutant("metrics-route-raw-path", "9 fits its ecosystem",
           "/metrics: the route label is the raw path (one series per id)",
           "src/metrics.rs",
           "        res.request().match_pattern(),",
           "        Some(res.request().path().to_string()),",
           ["metrics::counters_move_by_exactly_what_happened"]),
    Mutant("metrics-open-despite-token", "4 only the organizer",
           "/metrics answers without the organizer token although ADMIN_TOKEN is set",
           "src/api/metrics.rs",
           "    auth::require_organizer(&state, &req)?;",
           "    let _ = auth::require_organizer(&state, &req);",
           ["metrics::metrics_need_the_organizer_token_when_one_is_set"]),
    Mutant("metrics-fence-not-counted", "9 fits its ecosystem",
           "/metrics: a batch refused by the fence is not counted",
           "src/actors/persistence.rs",
           "                m.fence_refusals.increment(1);\n",
           "",
           ["metrics::cluster_counts_fence_refusals_leases_and_issuance"]),
    Mutant("report-totals-not-kept", "8 reports",
           "commits no longer move the report's totals",
           "src/actors/persistence/sqlite.rs",
           "        false => queries::add_to_totals(&tx, &totals).and_then(|()| commit(tx)),",
           "        false => commit(tx),",
           ["hostile::report_totals_past_i64"]),
    Mutant("backup-file-copy", "2 a 200 means committed",
           "`ticketd backup` copies the database file (a WAL database's file misses its WAL)",
           "src/store/backup.rs",
           "    let result = copy_and_check(&src, &partial);",
           "    let result = std::fs::copy(from, &partial).map(|_| (0, 0)).map_err(BackupError::from);",
           ["backup::a_backup_taken_mid_sale_holds_every_acknowledged_booking"]),
    Mutant("backup-overwrites", "2 a 200 means committed",
           "`ticketd backup` overwrites an existing file",
           "src/store/backup.rs",
           "    if to.exists() {",
           "    if to.exists() && false {",
           ["backup::a_backup_taken_mid_sale_holds_every_acknowledged_booking"]),
    Mutant("import-into-non-empty", "1 never oversell",
           "`ticketd import` fills a PostgreSQL database that already holds a sale (merges two)",
           "src/store/import.rs",
           "    if events + bookings + keys + customers > 0 {",
           "    if events + bookings + keys + customers > 0 && false {",
           ["import::a_sale_moves_from_sqlite_to_postgres_and_goes_on_where_it_stood"]),
    Mutant("import-keeps-target-ticket-key", "4 only the holder (moving to PostgreSQL)",
           "the import keeps the ticket key a replica generated on the target, not the source's",
           "src/store/import.rs",
           """"INSERT INTO ticketd_meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",""",
           """"INSERT INTO ticketd_meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO NOTHING",""",
           ["import::a_sale_moves_from_sqlite_to_postgres_and_goes_on_where_it_stood"]),
    Mutant("import-sequence-not-moved", "2 a 200 means committed",
           "`ticketd import` leaves the id sequences at 1 (new bookings collide with imported ids)",
           "src/store/import.rs",
           "    move_sequences(&snap, &mut tx)?;\n",
           "",
           ["import::a_sale_moves_from_sqlite_to_postgres_and_goes_on_where_it_stood"]),
    Mutant("spec-misses-a-route", "9 fits its ecosystem",
           "a mounted route is left out of /openapi.json",
           "src/api/openapi.rs",
           "        events::report_event,\n",
           "",
           ["lib::api::openapi::tests::the_description_names_exactly_the_mounted_routes"]),
    Mutant("spec-dangling-ref", "9 fits its ecosystem",
           "the 422 body's schema is not in the description's components (a dangling $ref)",
           "src/api/openapi.rs",
           "    components(schemas(Detail, Invalid), responses(",
           "    components(schemas(Detail), responses(",
           ["lib::api::openapi::tests::every_reference_resolves"]),
    Mutant("docs-outside-validator", "9 fits its ecosystem",
           "Swagger UI asks validator.swagger.io about the description (a request off the host)",
           "src/api/docs.rs",
           "                    .validator_url(\"none\")\n",
           "",
           ["api::the_description_and_its_viewers_are_served::sqlite"]),
    Mutant("docs-no-csp", "9 fits its ecosystem",
           "ReDoc's page without its content security policy",
           "src/api/docs.rs",
           "        .insert_header((header::CONTENT_SECURITY_POLICY, DOCS_CSP))\n        .body(REDOC_PAGE)",
           "        .body(REDOC_PAGE)",
           ["api::the_description_and_its_viewers_are_served::sqlite"]),
    # The PostgreSQL backend: the same promises, kept by its own code (functions.sql, the
    # writer's connection), killed by its unit tests and the suites run on it (`::postgres`).
    Mutant("pg-no-fence", "1 never oversell (PostgreSQL)",
           "the batch function no longer compares the fence with the token",
           "src/store/postgres/functions.sql",
           "    IF ev.fence > p_token THEN",
           "    IF false THEN",
           ["lib::store::postgres::tests::fenced_batch_refuses_stale_tokens_and_missing_seats",
            "cluster::fencing_refuses_a_holder_whose_lease_expired::postgres"],
           more=[("src/store/postgres/functions.sql",
                  "WHERE id = p_event AND events.fence <= p_token",
                  "WHERE id = p_event")]),
    Mutant("pg-no-capacity-check", "1 never oversell (PostgreSQL)",
           "the batch function no longer checks the seats (the CHECK still aborts)",
           "src/store/postgres/functions.sql",
           "    IF ev.booked_count + taken - freed > ev.capacity THEN",
           "    IF false THEN",
           ["lib::store::postgres::tests::fenced_batch_refuses_stale_tokens_and_missing_seats",
            "cluster::a_stale_view_cannot_sell_seats_another_replica_sold::postgres"],
           more=[("src/store/postgres/functions.sql",
                  "\n      AND booked_count + taken - freed <= events.capacity", "")]),
    Mutant("pg-no-check", "1 never oversell (PostgreSQL)",
           "the events table without its CHECK (booked_count <= capacity)",
           "src/store/postgres/schema.rs",
           "CONSTRAINT events_never_oversell CHECK (booked_count >= 0 AND booked_count <= capacity)",
           "CONSTRAINT events_never_oversell CHECK (true)",
           ["lib::store::postgres::schema_tests::the_database_refuses_oversell_and_a_customer_past_the_limit"]),
    Mutant("pg-limit-ignored", "4 per-customer limit (PostgreSQL)",
           "the batch function no longer checks the customer's limit (the CHECK still aborts)",
           "src/store/postgres/functions.sql",
           "            IF q > lim OR s_seats[j] + q > lim THEN",
           "            IF false THEN",
           ["lib::store::postgres::tests::the_limit_is_enforced_by_the_store",
            "lifecycle::the_per_customer_limit_holds_under_concurrency_and_across_replicas::postgres"]),
    Mutant("pg-finalize-twice", "3 issued once (PostgreSQL)",
           "issued tickets are written whatever the booking's status",
           "src/store/postgres/writer.rs",
           "WHERE b.id = ANY($1::bigint[]) AND b.status = 'PENDING'",
           "WHERE b.id = ANY($1::bigint[])",
           ["lib::store::postgres::tests::finalize_is_idempotent"]),
    Mutant("pg-finalize-other-facts", "3 issued once (PostgreSQL)",
           "a ticket is written whatever quantity its facts carry (a code for other seats)",
           "src/store/postgres/writer.rs",
           "      AND b.quantity = ($4::bigint[])[array_position($1::bigint[], b.id)]\n",
           "\n",
           ["lib::store::postgres::tests::tickets_are_written_many_at_a_time_and_only_for_their_booking"]),
    Mutant("pg-finalize-drops-chunks", "3 issued once (PostgreSQL)",
           "an op's tickets past the first run of the finalize statement (64) are never written",
           "src/store/postgres/writer.rs",
           "let chunks = tickets.chunks(FINALIZE_CHUNK).map(",
           "let chunks = tickets.chunks(FINALIZE_CHUNK).take(1).map(",
           ["lib::store::postgres::tests::an_op_of_many_tickets_is_written_whole"]),
    Mutant("pg-sweep-sorts-the-backlog", "3 issued (PostgreSQL), 5 fast, sustained",
           "the sweep's page is planned as the planner likes (a bitmap of every PENDING booking past the cursor, sorted, per page)",
           "src/store/postgres/queries.rs",
           '"SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off; SET LOCAL enable_seqscan = off";',
           '"SELECT 1";',
           ["lib::store::postgres::tests::the_sweep_walks_its_index_a_page_at_a_time"]),
    # Both locks of a cancelled booking: the group's, taken first, and the batch function's own.
    Mutant("pg-cancel-reads-unlocked", "3 issued once, never cancelled (PostgreSQL)",
           "a cancellation reads its booking without locking it (a ticket issued meanwhile stays counted)",
           "src/store/postgres/functions.sql",
           "WHERE id = cid AND event_id = p_event FOR NO KEY UPDATE;",
           "WHERE id = cid AND event_id = p_event;",
           ["lib::store::postgres::tests::a_cancellation_meeting_an_issue_in_flight_counts_what_was_issued"],
           more=[("src/store/postgres/writer.rs",
                  "                    bookings.extend(b.cancels.iter().copied());",
                  "                    let _ = &b.cancels;")]),
    Mutant("pg-issued-not-counted", "3 issued once (PostgreSQL)",
           "issued tickets no longer move their event's count of issued seats",
           "src/store/postgres/writer.rs",
           "SELECT p.event_id, s.id, p.seats FROM per_event p, slot s ORDER BY p.event_id",
           "SELECT p.event_id, s.id, p.seats FROM per_event p, slot s WHERE false",
           ["lib::store::postgres::tests::finalize_is_idempotent",
            "finalizer::failed_issuances_are_redelivered_and_issued_once::postgres"]),
    Mutant("pg-bookings-locked-as-they-come", "2 no lost booking, 5 fast (PostgreSQL)",
           "a group no longer locks the bookings it cancels first, in id order (writers deadlock)",
           "src/store/postgres/writer.rs",
           "                    bookings.extend(b.cancels.iter().copied());",
           "                    let _ = &b.cancels;",
           ["lib::store::postgres::tests::a_group_locks_its_bookings_in_id_order"]),
    Mutant("pg-plans-follow-size", "5 fast (PostgreSQL)",
           "the writer's generic plans may use whatever the tables' size when planned suggested",
           "src/store/postgres/writer.rs",
           "force_generic_plan;\n    SET enable_seqscan = off; SET enable_bitmapscan = off;\n    SET enable_hashjoin = off; SET enable_mergejoin = off\";",
           "force_generic_plan\";",
           ["lib::store::postgres::tests::the_writers_plans_do_not_depend_on_the_tables_size_when_made"]),
    Mutant("pg-finalize-walks-pending", "5 fast (PostgreSQL)",
           "the finalize statement names its bookings only through array_position (a plan may walk every PENDING row)",
           "src/store/postgres/writer.rs",
           "    WHERE b.id = ANY($1::bigint[]) AND b.status = 'PENDING'",
           "    WHERE array_position($1::bigint[], b.id) IS NOT NULL AND b.status = 'PENDING'",
           ["lib::store::postgres::tests::the_writers_plans_do_not_depend_on_the_tables_size_when_made"]),
    Mutant("pg-migration-4-keeps-old-totals", "8 reports (PostgreSQL)",
           "migration 4 no longer brings the totals' trigger function counting in claimed slots",
           "src/store/postgres/schema.rs",
           "        include_str!(\"functions.sql\"),\n        include_str!(\"totals.sql\")\n    ),\n];",
           "        include_str!(\"functions.sql\")\n    ),\n];",
           ["lib::store::postgres::schema_tests::a_sale_under_way_keeps_its_counts_through_migration_4"]),
    Mutant("pg-shared-slot", "8 reports (PostgreSQL)",
           "writers count in their backend pid's slot, which two may share",
           "src/store/postgres/writer.rs",
           "WHERE pg_try_advisory_lock(1952672619, s) LIMIT 1",
           "WHERE false LIMIT 1",
           ["lib::store::postgres::tests::each_writer_claims_a_counting_slot_of_its_own"]),
    Mutant("pg-live-key-taken-over", "5 one booking per key (PostgreSQL)",
           "a live idempotency key is looked up no more and taken over by the next request",
           "src/store/postgres/functions.sql",
           "            WHERE k.created_ms < p_live_after\n            RETURNING k.booking_id INTO k_booking;",
           "            RETURNING k.booking_id INTO k_booking;",
           ["lib::store::postgres::tests::idempotency_keys_name_one_booking_and_expire",
            "lifecycle::one_key_one_booking::postgres"],
           more=[("src/store/postgres/functions.sql",
                  "        -- A key that names a live booking: nothing written, the booking named.\n        IF p_keys[i] IS NOT NULL THEN",
                  "        IF false THEN")]),
    Mutant("pg-migrations-unlocked", "schema (PostgreSQL)",
           "replicas starting together migrate without the advisory lock",
           "src/store/postgres/schema.rs",
           'c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;',
           'c.execute("SELECT $1::bigint", &[&MIGRATION_LOCK])?;',
           ["lib::store::postgres::schema_tests::replicas_migrating_at_once_end_with_one_schema"]),
    Mutant("pg-unknown-outcome-hidden", "2 no lost booking (PostgreSQL)",
           "a COMMIT whose answer was lost is answered as not written",
           "src/store/postgres/writer.rs",
           "let maybe_committed = !aborted && crate::store::pg_unavailable(&error);",
           "let maybe_committed = false && !aborted && crate::store::pg_unavailable(&error);",
           ["postgres::a_commit_whose_answer_is_lost_is_answered_unknown_and_the_retry_tells"]),
    Mutant("pg-writer-never-reconnects", "faults (PostgreSQL)",
           "the writer keeps its lost connection: nothing sells after a restart",
           "src/actors/persistence/postgres.rs",
           "if self.writer.as_ref().is_some_and(PgWriter::is_closed) {",
           "if false {",
           ["postgres::postgres_stopped_mid_sale_answers_503_and_resumes_by_itself"],
           more=[("src/actors/persistence/postgres.rs",
                  "if writer.is_closed() || crate::store::pg_unavailable(&failed.error) {",
                  "if false {")]),
    Mutant("pg-reads-wait-long", "faults (PostgreSQL)",
           "reads wait 30 s for a connection while the server is down",
           "src/store/mod.rs",
           ".connection_timeout(PG_POOL_WAIT)",
           ".connection_timeout(Duration::from_secs(30))",
           ["postgres::postgres_stopped_mid_sale_answers_503_and_resumes_by_itself"]),
    Mutant("lease-queue-ignored", "fair turns across replicas",
           "a free lease goes to whoever asks first, not to the head of the queue",
           "src/coord/redis.rs",
           "if first and first ~= me then",
           "if false then",
           ["cluster::lease_protocol_on_redis_fences_and_takes_turns"]),
    Mutant("pg-silence-unbounded", "faults (PostgreSQL)",
           "PostgreSQL connections wait on a silent network as long as TCP does",
           "src/store/mod.rs",
           "        config.tcp_user_timeout(PG_SILENCE);",
           "",
           ["hosts::the_database_host_cut_off_mid_sale"],
           more=[("src/store/mod.rs", "            .keepalives_idle(PG_SILENCE)",
                  "            .keepalives_idle(Duration::from_secs(2 * 60 * 60))")]),
    Mutant("pg-totals-not-kept", "8 reports (PostgreSQL)",
           "the report's totals no longer follow the event rows",
           "src/store/postgres/totals.sql",
           "    INSERT INTO report_totals AS t (id, events, capacity, booked, finalized)\n    VALUES (slot, d_events",
           "    RETURN NULL;\n    INSERT INTO report_totals AS t (id, events, capacity, booked, finalized)\n    VALUES (slot, d_events",
           ["lib::store::postgres::tests::a_group_commits_in_one_round_trip_and_refusals_stay_alone",
            "lib::store::postgres::tests::totals_do_not_overflow_past_i64"]),
]


def sh(cmd, timeout=None, **kw):
    """Runs `cmd` in a process group of its own: on a timeout the whole group is killed — the
    test binary and the servers it started too, not only cargo (they kept running and loaded
    the machine for the rest of the run)."""
    p = subprocess.Popen(cmd, cwd=kw.pop("cwd", TREE), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def make_scratch():
    """A copy of the working tree as it is (tracked and untracked, not ignored files)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    if os.path.isdir(TREE):
        shutil.rmtree(TREE)
    for f in filter(None, files):
        src = os.path.join(ROOT, f)
        if not os.path.isfile(src):
            continue  # deleted in the working tree
        dst = os.path.join(TREE, f)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        # A fresh mtime, not the original's: a run cut off mid-mutant leaves builds newer than
        # the real files' mtimes, and cargo would take the planted bug's build for this copy.
        shutil.copy(src, dst)
    # Seed the scratch build with the real tree's compiled dependencies (a copy: the real
    # target directory is never written), so only ticketd itself is built per mutant.
    seed = os.path.join(ROOT, "target", "debug")
    if not os.path.isdir(TARGET) and os.path.isdir(seed):
        print("seeding target/mutants/target from target/debug ...", flush=True)
        os.makedirs(TARGET, exist_ok=True)
        subprocess.run(["cp", "-a", seed, os.path.join(TARGET, "debug")], check=False)


def cargo_test(test, timeout=TEST_TIMEOUT):
    """Runs one test; returns 'pass', 'fail', 'timeout' or 'build' (did not compile)."""
    binary, name = test.split("::", 1)
    which = ["--lib"] if binary == "lib" else ["--test", binary]
    env = dict(os.environ, CARGO_TARGET_DIR=TARGET)
    cmd = ["cargo", "test", "-q", *FEATURES, *which, "--", "--exact", name]
    try:
        r = sh(cmd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    out = r.stdout + r.stderr
    if r.returncode == 0:
        if "running 1 test" not in out:
            return "missing", out  # no such test: a typo would otherwise "pass"
        return "pass", out
    if "could not compile" in out or re.search(r"^error(\[E\d+\])?:", out, re.M):
        if "test result: FAILED" not in out:
            return "build", out
    return "fail", out


def whole_suite():
    """Every failing test of the whole suite (for --suite)."""
    env = dict(os.environ, CARGO_TARGET_DIR=TARGET)
    r = sh(["cargo", "test", *FEATURES, "--workspace", "--no-fail-fast"], env=env)
    return re.findall(r"^test (\S+) \.\.\. FAILED", r.stdout, re.M)


def first_failure_line(out):
    for line in out.splitlines():
        if "panicked at" in line or line.strip().startswith(("assertion", "left:", "thread '")):
            return line.strip()[:150]
    return ""


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    suite = "--suite" in sys.argv
    chosen = [m for m in MUTANTS if not args or any(a in m.name for a in args)]
    if "--list" in sys.argv:
        for m in chosen:
            print(f"{m.name:24} {m.promise:30} {m.what}\n{'':24} -> {', '.join(m.tests)}")
        return 0
    if not chosen:
        print("no mutant matches", args)
        return 2
    make_scratch()
    started = time.time()

    tests = sorted({t for m in chosen for t in m.tests})
    print(f"baseline: {len(tests)} targeted tests on the unmutated copy", flush=True)
    broken = []
    for t in tests:
        res, out = cargo_test(t)
        if res != "pass":
            broken.append(t)
            print(f"  {t}: {res}\n{out[-3000:]}")
    if broken:
        print("baseline is not green: fix these before judging mutants:", broken)
        return 1

    rows, bad = [], 0
    for m in chosen:
        originals = {}
        for path, _, _ in m.edits:
            originals.setdefault(path, open(os.path.join(TREE, path)).read())
        mutated, ok = dict(originals), True
        for path, old, new in m.edits:
            if mutated[path].count(old) != 1:
                ok = False
                break
            mutated[path] = mutated[path].replace(old, new, 1)
        if not ok:
            rows.append((m, "CANNOT APPLY (code changed?)", []))
            bad += 1
            continue
        print(f"[{m.name}] {m.what}", flush=True)
        try:
            for path, text in mutated.items():
                open(os.path.join(TREE, path), "w").write(text)
            results = [(t, *cargo_test(t)) for t in m.tests]
            extra = whole_suite() if suite else []
        finally:
            for path, text in originals.items():
                open(os.path.join(TREE, path), "w").write(text)
        if any(r == "build" for _, r, _ in results):
            verdict = "DOES NOT BUILD"
        elif all(r in ("fail", "timeout") for _, r, _ in results):
            verdict = "killed"
        else:
            verdict = "SURVIVED"
        for t, r, out in results:
            print(f"    {t}: {r} {first_failure_line(out) if r == 'fail' else ''}", flush=True)
        killers = [t + (" (timeout)" if r == "timeout" else "") for t, r, _ in results
                   if r in ("fail", "timeout")]
        if suite:
            print(f"    whole suite, failing: {', '.join(extra) or 'none'}")
        rows.append((m, verdict, killers))
        bad += verdict != "killed"

    print(f"\n| mutant | promise | planted bug | result | killed by |")
    print(f"|---|---|---|---|---|")
    for m, verdict, killers in rows:
        print(f"| {m.name} | {m.promise} | {m.what} | {verdict} | {', '.join(killers) or '-'} |")
    print(f"\n{len(rows) - bad}/{len(rows)} mutants killed in {time.time() - started:.0f} s; "
          "the real tree was not modified")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
