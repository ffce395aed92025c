-- The watchdog (docs/watch.md): what it did, and the alerts it sent. Append-only: a row is
-- written once, when the thing is done, and never edited (history may be pruned once a day old).

-- One row per watchdog action: a hung or stopped worker killed (SIGKILL, so supervisord restarts
-- it), or a foreign write-lock holder reported (never signalled). `pid` is the process acted on,
-- `program` its supervisord program (NULL for a foreign process), `detail` its command line.
CREATE TABLE watch_actions (
    id       INTEGER PRIMARY KEY,
    at       REAL NOT NULL,
    action   TEXT NOT NULL,       -- kill_stopped | kill_hung | kill_lock_holder | alert_foreign_lock
    reason   TEXT,
    pid      INTEGER,
    program  TEXT,
    detail   TEXT
);

-- One row per message the watchdog composed (alert, recovered, repeat, action, test), whether or
-- not a channel is configured: the last alert/recovered/repeat row is where the alert state
-- machine starts again after a restart of the watchdog. `payload` is the JSON every channel gets.
CREATE TABLE alert_messages (
    id        INTEGER PRIMARY KEY,
    at        REAL NOT NULL,
    kind      TEXT NOT NULL,
    verdict   TEXT,
    previous  TEXT,
    text      TEXT NOT NULL,
    payload   TEXT NOT NULL
);

-- One row per message and channel, written when its delivery is over: 'sent' or 'failed' after
-- `attempts` tries (retried with backoff), the last error, and where it went (a webhook's host
-- only: its URL is a secret).
CREATE TABLE alerts (
    id          INTEGER PRIMARY KEY,
    at          REAL NOT NULL,
    message_id  INTEGER REFERENCES alert_messages (id),
    kind        TEXT NOT NULL,
    verdict     TEXT,
    channel     TEXT NOT NULL,    -- webhook | email | command
    target      TEXT,
    result      TEXT NOT NULL,    -- sent | failed
    attempts    INTEGER NOT NULL,
    error       TEXT,
    text        TEXT
);
CREATE INDEX alerts_message ON alerts (message_id);

CREATE TRIGGER watch_actions_no_update BEFORE UPDATE ON watch_actions
BEGIN SELECT RAISE(ABORT, 'watch_actions is append-only'); END;
CREATE TRIGGER alert_messages_no_update BEFORE UPDATE ON alert_messages
BEGIN SELECT RAISE(ABORT, 'alert_messages is append-only'); END;
CREATE TRIGGER alerts_no_update BEFORE UPDATE ON alerts
BEGIN SELECT RAISE(ABORT, 'alerts is append-only'); END;
CREATE TRIGGER watch_actions_no_delete BEFORE DELETE ON watch_actions
WHEN OLD.at > (julianday('now') - 2440587.5) * 86400.0 - 86400.0
BEGIN SELECT RAISE(ABORT, 'watch_actions is append-only (only rows older than a day may be pruned)'); END;
CREATE TRIGGER alert_messages_no_delete BEFORE DELETE ON alert_messages
WHEN OLD.at > (julianday('now') - 2440587.5) * 86400.0 - 86400.0
BEGIN SELECT RAISE(ABORT, 'alert_messages is append-only (only rows older than a day may be pruned)'); END;
CREATE TRIGGER alerts_no_delete BEFORE DELETE ON alerts
WHEN OLD.at > (julianday('now') - 2440587.5) * 86400.0 - 86400.0
BEGIN SELECT RAISE(ABORT, 'alerts is append-only (only rows older than a day may be pruned)'); END;
