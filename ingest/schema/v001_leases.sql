-- Leases: one row per lease name; see ingest/leases.py and docs/design.md (leases).
-- The CHECKs make a hand-edited or damaged row fail loudly instead of being misread; the code
-- validates every row it reads as well (ingest.lease_table.LeaseRow.parse).
CREATE TABLE leases (
    name          TEXT PRIMARY KEY CHECK (typeof(name) = 'text' AND length(name) > 0),
    holder_host   TEXT,              -- NULL when free (all holder_* are NULL together)
    holder_boot   TEXT,              -- boot id: pids and monotonic readings compare only within a boot
    holder_pidns  TEXT,              -- pid namespace: pids compare only within one
    holder_pid    INTEGER CHECK (holder_pid IS NULL OR (typeof(holder_pid) = 'integer' AND holder_pid > 0)),
    holder_start  TEXT,              -- process start time (ticks since boot, /proc): detects pid reuse
    holder_nonce  TEXT,              -- random per Lease object: tells apart two holders in one process
    fence         INTEGER NOT NULL DEFAULT 0 CHECK (typeof(fence) = 'integer' AND fence >= 0),
    ttl_s         REAL CHECK (typeof(ttl_s) = 'real' AND ttl_s > 0),  -- the holder's promise
    acquired_at   REAL,              -- wall clock, display only
    renewed_at    REAL,              -- wall clock, display only
    expires_at    REAL,              -- wall clock, display only
    renewed_mono  REAL,              -- holder's CLOCK_MONOTONIC at its last renewal
    renewals      INTEGER NOT NULL DEFAULT 0,   -- +1 on every renewal: observers watch it change
    transitions   INTEGER NOT NULL DEFAULT 0,   -- number of changes of holder
    CHECK ((holder_nonce IS NULL) = (holder_host IS NULL))
);

-- The fencing token never goes back, whatever writes the row.
CREATE TRIGGER leases_fence_only_grows BEFORE UPDATE OF fence ON leases
WHEN NEW.fence < OLD.fence
BEGIN SELECT RAISE(ABORT, 'lease fence only grows'); END;

CREATE TABLE lease_events (
    id        INTEGER PRIMARY KEY,
    name      TEXT NOT NULL,
    at        REAL NOT NULL,     -- wall clock, display only; id gives the true order
    event     TEXT NOT NULL CHECK (event IN ('acquired', 'released', 'taken_over_expired',
                                   'taken_over_dead', 'lost', 'force_released')),
    fence     INTEGER NOT NULL,
    holder    TEXT,              -- host:pid:nonce of the process the event is about
    detail    TEXT
);
CREATE INDEX lease_events_name_id ON lease_events (name, id);

-- Append-only: history cannot be edited, only added to.
CREATE TRIGGER lease_events_no_update BEFORE UPDATE ON lease_events
BEGIN SELECT RAISE(ABORT, 'lease_events is append-only'); END;
CREATE TRIGGER lease_events_no_delete BEFORE DELETE ON lease_events
BEGIN SELECT RAISE(ABORT, 'lease_events is append-only'); END;
