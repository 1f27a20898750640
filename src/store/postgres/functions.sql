-- The writer's server-side functions: one statement per op of a group, so a whole group is
-- pipelined (store::postgres::writer). They refuse by their result, never by raising: on
-- PostgreSQL an error aborts the group's transaction, where SQLite rolls back one savepoint.

-- The stored timestamp format, as SQLite stores it (SQLAlchemy's): the Rust side turns it into
-- ISO 8601 the same way for both backends.
CREATE OR REPLACE FUNCTION ticketd_ts(t TIMESTAMP) RETURNS TEXT
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT to_char(t, 'YYYY-MM-DD HH24:MI:SS.US') $$;

-- The fenced, conditional batch of DESIGN.md (store::queries::apply_fenced_batch, for SQLite):
-- cancellations first (their seats may be sold again in this very batch), then bookings with
-- their idempotency keys and per-customer counts, then the event row, which moves only if no
-- newer lease token has written (fence <= token) and the seats are there.
--
-- SQLite writes as it goes and rolls the batch's savepoint back on a refusal. Here the event row
-- is locked first (FOR NO KEY UPDATE: every writer of the event's seats and customers' counts
-- holds it, so what is read below cannot move under us; issuing a ticket does not take it, and
-- meets a cancellation on the booking's row), everything is decided in memory, and only a batch
-- that will be applied writes its rows: a refused batch writes nothing (but idempotency keys it
-- had claimed, which it deletes again), so no subtransaction is needed.
--
-- status: 0 applied, 1 no such event, 2 fenced (a newer token wrote), 3 no seats. The event's
-- columns are the row as it is now (after the update when applied). `finalized` is the event's
-- issued seats on a refusal (a sum over the finalizers' slots, not worth a read on every
-- batch); when applied, the row's own column only — never NULL, for a writer of the schema
-- before migration 4 still running during a rolling upgrade, which reads it.
-- Bookings, in order: b_kind 0 booked (b_a = id), 1 limit (b_a = limit, b_b = held),
-- 2 key used (b_a = booking id, b_fp = fingerprint).
-- Cancellations, in order: c_id NULL when not found, else the booking as it is now.
-- Customers' seats, in order: u_took (took u_seats more) or not (holds u_seats).
CREATE OR REPLACE FUNCTION ticketd_apply_batch(
    p_event BIGINT, p_token BIGINT, p_cancels BIGINT[],
    p_users BIGINT[], p_qtys BIGINT[], p_scopes TEXT[], p_keys TEXT[], p_fps TEXT[],
    p_now TEXT, p_now_ms BIGINT, p_live_after BIGINT,
    OUT status SMALLINT,
    OUT title TEXT, OUT capacity BIGINT, OUT booked BIGINT, OUT finalized BIGINT,
    OUT fence BIGINT, OUT max_per_user BIGINT,
    OUT cancelled BIGINT, OUT freed BIGINT, OUT freed_issued BIGINT,
    OUT b_kind SMALLINT[], OUT b_a BIGINT[], OUT b_b BIGINT[], OUT b_fp TEXT[],
    OUT c_id BIGINT[], OUT c_user BIGINT[], OUT c_qty BIGINT[], OUT c_status TEXT[],
    OUT c_created TEXT[], OUT c_code TEXT[], OUT c_fin TEXT[], OUT c_can TEXT[],
    OUT u_took BOOLEAN[], OUT u_user BIGINT[], OUT u_seats BIGINT[])
LANGUAGE plpgsql
AS $$
DECLARE
    ev events%ROWTYPE;
    bk bookings%ROWTYPE;
    now_ts TIMESTAMP := p_now::TIMESTAMP;
    lim BIGINT;
    n INT := COALESCE(array_length(p_users, 1), 0);
    taken BIGINT := 0;
    cid BIGINT;
    i INT;
    j INT;
    q BIGINT;
    u BIGINT;
    held BIGINT;
    new_id BIGINT;
    k_booking BIGINT;
    k_fp TEXT;
    -- Bookings this batch cancels (deduplicated), and the rows it inserts.
    to_cancel BIGINT[] := '{}';
    ins_id BIGINT[] := '{}';
    ins_user BIGINT[] := '{}';
    ins_qty BIGINT[] := '{}';
    -- Keys this batch claimed (deleted again if it is refused).
    cl_scope TEXT[] := '{}';
    cl_key TEXT[] := '{}';
    -- Customers' seats as this batch goes: the user, seats now, and the change to write.
    s_user BIGINT[] := '{}';
    s_seats BIGINT[] := '{}';
    s_delta BIGINT[] := '{}';
    -- Whether the customer's row is still to be made (none when the batch read it).
    s_new BOOLEAN[] := '{}';
    seq REGCLASS := pg_get_serial_sequence('bookings', 'id')::REGCLASS;
BEGIN
    SELECT * INTO ev FROM events WHERE id = p_event FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        status := 1;
        RETURN;
    END IF;
    title := ev.title; capacity := ev.capacity; booked := ev.booked_count;
    fence := ev.fence; max_per_user := ev.max_per_user;
    IF ev.fence > p_token THEN
        finalized := ticketd_finalized(ev);
        status := 2;
        RETURN;
    END IF;
    lim := ev.max_per_user;
    cancelled := 0; freed := 0; freed_issued := 0;
    b_kind := '{}'; b_a := '{}'; b_b := '{}'; b_fp := '{}';
    c_id := '{}'; c_user := '{}'; c_qty := '{}'; c_status := '{}'; c_created := '{}';
    c_code := '{}'; c_fin := '{}'; c_can := '{}';
    u_took := '{}'; u_user := '{}'; u_seats := '{}';

    FOREACH cid IN ARRAY COALESCE(p_cancels, '{}') LOOP
        -- Locked: a finalizer issuing this booking right now (it does not lock the event row)
        -- commits first and the row read is then FINALIZED, or waits and finds it CANCELLED.
        SELECT * INTO bk FROM bookings WHERE id = cid AND event_id = p_event FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            c_id := c_id || NULL::BIGINT; c_user := c_user || NULL::BIGINT;
            c_qty := c_qty || NULL::BIGINT; c_status := c_status || NULL::TEXT;
            c_created := c_created || NULL::TEXT; c_code := c_code || NULL::TEXT;
            c_fin := c_fin || NULL::TEXT; c_can := c_can || NULL::TEXT;
            CONTINUE;
        END IF;
        IF bk.status <> 'CANCELLED' AND NOT (cid = ANY(to_cancel)) THEN
            to_cancel := to_cancel || cid;
            cancelled := cancelled + 1;
            freed := freed + bk.quantity;
            IF bk.status = 'FINALIZED' THEN
                freed_issued := freed_issued + bk.quantity;
            END IF;
            IF lim IS NOT NULL THEN
                j := array_position(s_user, bk.user_id);
                IF j IS NULL THEN
                    SELECT cs.seats INTO held FROM customer_seats cs
                    WHERE cs.event_id = p_event AND cs.user_id = bk.user_id;
                    IF FOUND THEN
                        s_user := s_user || bk.user_id; s_seats := s_seats || held;
                        s_delta := s_delta || 0::BIGINT; s_new := s_new || false;
                        j := array_length(s_user, 1);
                    END IF;
                END IF;
                IF j IS NULL THEN
                    -- No row: nothing to give back (SQLite's UPDATE … RETURNING finds none).
                    u_took := u_took || false; u_user := u_user || bk.user_id;
                    u_seats := u_seats || 0::BIGINT;
                ELSE
                    s_seats[j] := s_seats[j] - bk.quantity;
                    s_delta[j] := s_delta[j] - bk.quantity;
                    u_took := u_took || false; u_user := u_user || bk.user_id;
                    u_seats := u_seats || s_seats[j];
                END IF;
            END IF;
            bk.status := 'CANCELLED';
            bk.cancelled_at := now_ts;
        ELSIF cid = ANY(to_cancel) THEN
            -- Named twice in one batch: the second is the same cancellation.
            bk.status := 'CANCELLED';
            bk.cancelled_at := now_ts;
        END IF;
        c_id := c_id || bk.id; c_user := c_user || bk.user_id; c_qty := c_qty || bk.quantity;
        c_status := c_status || bk.status::TEXT; c_created := c_created || ticketd_ts(bk.created_at);
        c_code := c_code || bk.ticket_code; c_fin := c_fin || ticketd_ts(bk.finalized_at);
        c_can := c_can || ticketd_ts(bk.cancelled_at);
    END LOOP;

    FOR i IN 1 .. n LOOP
        q := p_qtys[i];
        u := p_users[i];
        -- A key that names a live booking: nothing written, the booking named.
        IF p_keys[i] IS NOT NULL THEN
            SELECT k.booking_id, k.fingerprint INTO k_booking, k_fp FROM idempotency_keys k
            WHERE k.scope = p_scopes[i] AND k.key = p_keys[i] AND k.created_ms >= p_live_after;
            IF FOUND THEN
                b_kind := b_kind || 2::SMALLINT; b_a := b_a || COALESCE(k_booking, 0);
                b_b := b_b || 0::BIGINT; b_fp := b_fp || k_fp;
                CONTINUE;
            END IF;
        END IF;
        j := NULL;
        IF lim IS NOT NULL THEN
            j := array_position(s_user, u);
            IF j IS NULL THEN
                SELECT cs.seats INTO held FROM customer_seats cs
                WHERE cs.event_id = p_event AND cs.user_id = u;
                s_user := s_user || u; s_seats := s_seats || COALESCE(held, 0);
                s_delta := s_delta || 0::BIGINT; s_new := s_new || NOT FOUND;
                j := array_length(s_user, 1);
            END IF;
            IF q > lim OR s_seats[j] + q > lim THEN
                u_took := u_took || false; u_user := u_user || u; u_seats := u_seats || s_seats[j];
                b_kind := b_kind || 1::SMALLINT; b_a := b_a || lim; b_b := b_b || s_seats[j];
                b_fp := b_fp || NULL::TEXT;
                CONTINUE;
            END IF;
        END IF;
        new_id := nextval(seq);
        IF p_keys[i] IS NOT NULL THEN
            -- Claims the key, or takes over an expired record; a live one claimed since the
            -- look-up above (another replica, committed meanwhile) wins.
            INSERT INTO idempotency_keys AS k (scope, key, fingerprint, booking_id, created_ms)
            VALUES (p_scopes[i], p_keys[i], p_fps[i], new_id, p_now_ms)
            ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint,
                booking_id = excluded.booking_id, event_id = NULL, created_ms = excluded.created_ms
            WHERE k.created_ms < p_live_after
            RETURNING k.booking_id INTO k_booking;
            IF NOT FOUND THEN
                SELECT k.booking_id, k.fingerprint INTO k_booking, k_fp FROM idempotency_keys k
                WHERE k.scope = p_scopes[i] AND k.key = p_keys[i];
                b_kind := b_kind || 2::SMALLINT; b_a := b_a || COALESCE(k_booking, 0);
                b_b := b_b || 0::BIGINT; b_fp := b_fp || k_fp;
                CONTINUE;
            END IF;
            cl_scope := cl_scope || p_scopes[i]; cl_key := cl_key || p_keys[i];
        END IF;
        IF j IS NOT NULL THEN
            s_seats[j] := s_seats[j] + q;
            s_delta[j] := s_delta[j] + q;
            u_took := u_took || true; u_user := u_user || u; u_seats := u_seats || q;
        END IF;
        taken := taken + q;
        ins_id := ins_id || new_id; ins_user := ins_user || u; ins_qty := ins_qty || q;
        b_kind := b_kind || 0::SMALLINT; b_a := b_a || new_id; b_b := b_b || 0::BIGINT;
        b_fp := b_fp || NULL::TEXT;
    END LOOP;

    IF ev.booked_count + taken - freed > ev.capacity THEN
        IF array_length(cl_key, 1) > 0 THEN
            DELETE FROM idempotency_keys k USING unnest(cl_scope, cl_key) AS c(scope, key)
            WHERE k.scope = c.scope AND k.key = c.key;
        END IF;
        finalized := ticketd_finalized(ev);
        status := 3;
        RETURN;
    END IF;

    IF array_length(to_cancel, 1) > 0 THEN
        UPDATE bookings SET status = 'CANCELLED', cancelled_at = now_ts WHERE id = ANY(to_cancel);
    END IF;
    IF array_length(s_user, 1) > 0 THEN
        -- Two statements: an INSERT … ON CONFLICT checks the row it proposes (a negative
        -- change) against the CHECK before it finds the conflict.
        UPDATE customer_seats cs SET seats = cs.seats + d.delta
        FROM unnest(s_user, s_delta, s_new) AS d(u, delta, fresh)
        WHERE cs.event_id = p_event AND cs.user_id = d.u AND NOT d.fresh AND d.delta <> 0;
        INSERT INTO customer_seats (event_id, user_id, seats, max_seats)
        SELECT p_event, d.u, d.delta, lim FROM unnest(s_user, s_delta, s_new) AS d(u, delta, fresh)
        WHERE d.fresh AND d.delta <> 0;
    END IF;
    IF n > 0 THEN
        INSERT INTO bookings (id, event_id, user_id, quantity, status, created_at)
        SELECT r.id, p_event, r.u, r.q, 'PENDING', now_ts
        FROM unnest(ins_id, ins_user, ins_qty) AS r(id, u, q);
    END IF;
    -- The fenced update itself (its conditions hold: checked above under the row lock), and the
    -- CHECK behind it.
    UPDATE events SET booked_count = booked_count + taken - freed,
        finalized_count = finalized_count - freed_issued, fence = p_token
    WHERE id = p_event AND events.fence <= p_token
      AND booked_count + taken - freed <= events.capacity
    RETURNING booked_count, finalized_count INTO booked, finalized;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ticketd_apply_batch: the locked event % moved', p_event;
    END IF;
    fence := p_token;
    status := 0;
END
$$;

-- Creates an event (store::queries::insert_event); with an idempotency key that names a live
-- event, creates nothing and returns the key's record (created = false).
CREATE OR REPLACE FUNCTION ticketd_create_event(
    p_title TEXT, p_capacity BIGINT, p_max BIGINT,
    p_scope TEXT, p_key TEXT, p_fp TEXT, p_now_ms BIGINT, p_live_after BIGINT,
    OUT created BOOLEAN, OUT id BIGINT,
    OUT k_fingerprint TEXT, OUT k_booking BIGINT, OUT k_event BIGINT)
LANGUAGE plpgsql
AS $$
BEGIN
    IF p_key IS NOT NULL THEN
        INSERT INTO idempotency_keys AS k (scope, key, fingerprint, booking_id, created_ms)
        VALUES (p_scope, p_key, p_fp, NULL, p_now_ms)
        ON CONFLICT (scope, key) DO UPDATE SET fingerprint = excluded.fingerprint,
            booking_id = NULL, event_id = NULL, created_ms = excluded.created_ms
        WHERE k.created_ms < p_live_after;
        IF NOT FOUND THEN
            SELECT k.fingerprint, k.booking_id, k.event_id INTO k_fingerprint, k_booking, k_event
            FROM idempotency_keys k WHERE k.scope = p_scope AND k.key = p_key;
            created := false;
            RETURN;
        END IF;
    END IF;
    INSERT INTO events (title, capacity, booked_count, max_per_user)
    VALUES (p_title, p_capacity, 0, p_max)
    RETURNING events.id INTO id;
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_keys SET event_id = id WHERE scope = p_scope AND key = p_key;
    END IF;
    created := true;
END
$$;
