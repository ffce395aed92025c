-- Token ledger: one row per Keepa account, its open reservations, the workers sharing it,
-- learned costs and the call log. See ingest/ledger.py and docs/tokens.md.
-- The account id is a fingerprint of the key (never the key itself).
CREATE TABLE token_accounts (
    account          TEXT PRIMARY KEY,
    balance          REAL NOT NULL,     -- projected server balance minus in_flight, as of `as_of`
    in_flight        REAL NOT NULL DEFAULT 0,  -- sum of open reservations (kept here: O(1) reserve)
    as_of            REAL NOT NULL,     -- wall time `balance` and `next_tick` were last materialised
    refill_rate      REAL NOT NULL,     -- tokens per minute, the plan's (cap = 60 x rate)
    flow_reduction   REAL NOT NULL DEFAULT 0,  -- tokenFlowReduction: taken off each refill
    next_tick        REAL NOT NULL,     -- wall time of the next refill tick
    server_ts        REAL,              -- server timestamp (s) of the newest envelope applied
    synced_at        REAL,              -- wall time of the last envelope from the server
    token_synced_at  REAL,              -- wall time of the last free /token call (<= ~1/min)
    blocked_until    REAL,              -- after a 429: nobody calls before this
    rate_limited     INTEGER NOT NULL DEFAULT 0, -- 429s seen, ever
    -- Sharing state per worker, JSON {worker: {spent, at, last, waiting, seen, cost}}: decayed
    -- spend, last reservation, waiting since / last seen waiting. Kept in this row (not a table
    -- of its own) so that a reservation writes one row here and one reservation row: no more.
    workers          TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE token_reservations (
    id          INTEGER PRIMARY KEY,
    account     TEXT NOT NULL,
    worker      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    cost        REAL NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,          -- a crashed holder's reservation is dropped after this
    pid         INTEGER
);
-- No index on expires_at: open reservations are few (settled ones are deleted), and each extra
-- index is one more page written by every reservation (the hot path).

-- Learned cost per unit (per page, per ASIN) for each kind of call, from tokensConsumed.
CREATE TABLE token_costs (
    account     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    avg         REAL NOT NULL,   -- exponentially weighted average per unit
    samples     TEXT NOT NULL,   -- JSON list of the latest per-unit costs (for the high percentile)
    n           INTEGER NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (account, kind)
);

-- Every Keepa call (one row per request, retries of 5xx folded into one). Pruned after N days.
CREATE TABLE keepa_calls (
    id           INTEGER PRIMARY KEY,
    at           REAL NOT NULL,
    account      TEXT,
    worker       TEXT NOT NULL,
    endpoint     TEXT NOT NULL,
    asins        INTEGER NOT NULL DEFAULT 0,
    estimated    REAL,
    actual       INTEGER,          -- tokensConsumed, NULL when unknown
    status       TEXT NOT NULL,    -- ok | rate_limited | request_error | transient | malformed
    http_status  INTEGER,
    latency_ms   REAL,
    tokens_left  INTEGER,
    error        TEXT              -- redacted, one line
);
CREATE INDEX keepa_calls_at ON keepa_calls (at);
