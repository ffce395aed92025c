-- Leases on PostgreSQL: the port of ../v001_leases.sql (same version, same columns and rules).
-- SQLite's typeof() checks become column types; REAL is DOUBLE PRECISION, INTEGER is BIGINT.
CREATE TABLE leases (
    name          TEXT PRIMARY KEY CHECK (length(name) > 0),
    holder_host   TEXT,              -- NULL when free (all holder_* are NULL together)
    holder_boot   TEXT,              -- boot id: pids and monotonic readings compare only within a boot
    holder_pidns  TEXT,              -- pid namespace: pids compare only within one
    holder_pid    BIGINT CHECK (holder_pid IS NULL OR holder_pid > 0),
    holder_start  TEXT,              -- process start time (ticks since boot, /proc): detects pid reuse
    holder_nonce  TEXT,              -- random per Lease object: tells apart two holders in one process
    fence         BIGINT NOT NULL DEFAULT 0 CHECK (fence >= 0),
    ttl_s         DOUBLE PRECISION NOT NULL CHECK (ttl_s > 0),  -- the holder's promise
    acquired_at   DOUBLE PRECISION,  -- wall clock, display only
    renewed_at    DOUBLE PRECISION,  -- wall clock, display only
    expires_at    DOUBLE PRECISION,  -- wall clock, display only
    renewed_mono  DOUBLE PRECISION,  -- holder's CLOCK_MONOTONIC at its last renewal
    renewals      BIGINT NOT NULL DEFAULT 0,   -- +1 on every renewal: observers watch it change
    transitions   BIGINT NOT NULL DEFAULT 0,   -- number of changes of holder
    CHECK ((holder_nonce IS NULL) = (holder_host IS NULL))
);

-- The fencing token never goes back, whatever writes the row.
CREATE FUNCTION leases_fence_only_grows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'lease fence only grows' USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER leases_fence_only_grows BEFORE UPDATE OF fence ON leases
FOR EACH ROW WHEN (NEW.fence < OLD.fence) EXECUTE FUNCTION leases_fence_only_grows();

CREATE TABLE lease_events (
    id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name      TEXT NOT NULL,
    at        DOUBLE PRECISION NOT NULL,  -- wall clock, display only; id gives the order (per lease:
                                          -- its events are written under the lease row's lock)
    event     TEXT NOT NULL CHECK (event IN ('acquired', 'released', 'taken_over_expired',
                                   'taken_over_dead', 'lost', 'force_released')),
    fence     BIGINT NOT NULL,
    holder    TEXT,              -- host:pid:nonce of the process the event is about
    detail    TEXT
);
CREATE INDEX lease_events_name_id ON lease_events (name, id);

-- Append-only: history cannot be edited, only added to (TRUNCATE included).
CREATE FUNCTION lease_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'lease_events is append-only' USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER lease_events_no_update BEFORE UPDATE OR DELETE ON lease_events
FOR EACH ROW EXECUTE FUNCTION lease_events_append_only();
CREATE TRIGGER lease_events_no_truncate BEFORE TRUNCATE ON lease_events
FOR EACH STATEMENT EXECUTE FUNCTION lease_events_append_only();
