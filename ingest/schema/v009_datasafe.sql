-- Data safety (docs/backups.md): the backups taken, the one source that fills this file, and
-- history that may be pruned once old (retention) while it stays un-editable.

-- One row per backup attempt (ingest db backup, or the upsert worker's schedule): where it went,
-- its size, and whether it passed its checks (integrity_check, schema version) before the rename.
CREATE TABLE backups (
    id     INTEGER PRIMARY KEY,
    at     REAL NOT NULL,
    path   TEXT NOT NULL,
    bytes  INTEGER,
    ok     INTEGER NOT NULL
);

-- The Keepa account fingerprint (ingest.token_model.account_id, never the key) or 'simulator'
-- whose deals fill this file. A worker configured for another one refuses to start (exit 3);
-- `ingest db source --adopt` changes it deliberately.
CREATE TABLE db_source (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    source      TEXT NOT NULL,
    adopted_at  REAL NOT NULL
);

-- lease_events stays append-only for everything younger than a day: no row can ever be edited,
-- and recent history cannot be deleted; older rows may be pruned by retention
-- ([retention] lease_events_days, at least 1).
DROP TRIGGER lease_events_no_delete;
CREATE TRIGGER lease_events_no_delete BEFORE DELETE ON lease_events
WHEN OLD.at > (julianday('now') - 2440587.5) * 86400.0 - 86400.0
BEGIN SELECT RAISE(ABORT, 'lease_events is append-only (only rows older than a day may be pruned)'); END;
