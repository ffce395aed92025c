-- Leases: one row per lease name; see ingest/leases.py and docs/design.md.
CREATE TABLE leases (
    name          TEXT PRIMARY KEY,
    holder_host   TEXT,              -- NULL when free
    holder_pid    INTEGER,
    holder_start  TEXT,              -- process start time (from /proc), detects pid reuse
    holder_nonce  TEXT,              -- random per lease object
    holder_boot   TEXT,              -- boot id: monotonic readings compare only within a boot
    fence         INTEGER NOT NULL DEFAULT 0,   -- only grows: +1 on every change of holder
    ttl_s         REAL NOT NULL,
    acquired_at   REAL,              -- wall clock, for display
    renewed_at    REAL,              -- wall clock, for display
    expires_at    REAL,              -- wall clock, for display
    renewed_mono  REAL,              -- holder's CLOCK_MONOTONIC at last renewal
    renewals      INTEGER NOT NULL DEFAULT 0,   -- bumps on every renewal: observers watch it change
    transitions   INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE lease_events (
    id        INTEGER PRIMARY KEY,
    name      TEXT NOT NULL,
    at        REAL NOT NULL,
    event     TEXT NOT NULL CHECK (event IN ('acquired', 'released', 'taken_over_expired',
                                   'taken_over_dead', 'lost', 'force_released')),
    fence     INTEGER NOT NULL,
    holder    TEXT,
    detail    TEXT
);
CREATE INDEX lease_events_name_id ON lease_events (name, id);

-- Append-only: history cannot be edited, only added to.
CREATE TRIGGER lease_events_no_update BEFORE UPDATE ON lease_events
BEGIN SELECT RAISE(ABORT, 'lease_events is append-only'); END;
CREATE TRIGGER lease_events_no_delete BEFORE DELETE ON lease_events
BEGIN SELECT RAISE(ABORT, 'lease_events is append-only'); END;
