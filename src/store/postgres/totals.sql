-- The report's totals follow the event rows (trigger `events_report_totals`, schema migration
-- 3): each change of an event row is added to the slot of the session that made it
-- (`ticketd_slot()`: its writer's own), so replicas do not queue on one row at every COMMIT.

-- The counting slot of this session: the one its writer claimed (`ticketd.slot`, see
-- store::postgres::writer::CLAIM_SLOT), else the backend pid's residue (a session that is not a
-- writer, or a 65th writer: it may share a slot).
CREATE OR REPLACE FUNCTION ticketd_slot() RETURNS INTEGER LANGUAGE sql STABLE AS $$
    SELECT COALESCE(NULLIF(current_setting('ticketd.slot', true), '')::INTEGER,
                    pg_backend_pid() % 64)
$$;

CREATE OR REPLACE FUNCTION ticketd_totals() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    slot INTEGER := ticketd_slot();
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
