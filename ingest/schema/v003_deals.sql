-- Deals, their decisions and stored histories, and the workers' checkpoints and progress.
-- Every write here is made inside a fenced transaction of the writing worker's lease.

CREATE TABLE deals (
    asin                TEXT PRIMARY KEY,
    title               TEXT,
    category            INTEGER,
    sales_rank          INTEGER,
    used_price_cents    INTEGER,
    new_price_cents     INTEGER,
    one_year_avg_cents  INTEGER,
    avg_reason          TEXT,                 -- ok | no_history | too_new | no_sales | NULL before a fetch
    avg_sales           INTEGER,
    status              TEXT NOT NULL CHECK (status IN ('accepted', 'rejected', 'incomplete')),
    reason              TEXT NOT NULL,        -- accepted: ok; rejected: business reason; incomplete: cause
    first_seen          REAL NOT NULL,        -- unix seconds: first listed in a deal page
    last_seen           REAL NOT NULL,        -- last listed in a deal page (the janitor's clock)
    last_fetched        REAL,                 -- last /product fetch that returned this product
    deal_last_update    INTEGER,              -- the deal's lastUpdate (Keepa minutes)
    source              TEXT NOT NULL,        -- backfill | upsert | refresh | retry | recompute
    fetch_attempts      INTEGER NOT NULL DEFAULT 0,   -- consecutive incomplete outcomes
    next_retry_at       REAL,                 -- when an incomplete deal is due for a refetch
    fence               INTEGER NOT NULL,     -- fencing token of the last writer's lease
    writer              TEXT NOT NULL
);
CREATE INDEX deals_status ON deals (status, reason);
CREATE INDEX deals_last_seen ON deals (last_seen);
CREATE INDEX deals_retry ON deals (status, next_retry_at);
CREATE INDEX deals_last_fetched ON deals (last_fetched);

-- The product object as fetched, zlib-compressed JSON: `ingest deals recompute` and
-- `ingest diagnose asin` re-run analytics from it at zero token cost.
CREATE TABLE product_history (
    asin        TEXT PRIMARY KEY REFERENCES deals (asin) ON DELETE CASCADE,
    fetched_at  REAL NOT NULL,
    product_z   BLOB NOT NULL
);

-- Every evaluation outcome (and every janitor removal) as a row, not a log line.
CREATE TABLE decisions (
    id                  INTEGER PRIMARY KEY,
    at                  REAL NOT NULL,
    worker              TEXT NOT NULL,
    asin                TEXT NOT NULL,
    outcome             TEXT NOT NULL CHECK (outcome IN ('accepted', 'rejected', 'incomplete', 'removed')),
    reason              TEXT NOT NULL,
    one_year_avg_cents  INTEGER,
    fence               INTEGER NOT NULL
);
CREATE INDEX decisions_at ON decisions (at);
CREATE INDEX decisions_asin ON decisions (asin, id);

-- Checkpoints: the backfill cursor and the upsert watermark, as JSON, advanced in the same
-- transaction as the rows they cover.
CREATE TABLE checkpoints (
    name        TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    updated_at  REAL NOT NULL,
    fence       INTEGER NOT NULL
);

-- One row per committed fenced transaction of a worker: (lease, fence) in commit order.
-- Fences of one lease never decrease along `id` unless two holders overlapped (chaos check).
CREATE TABLE fenced_commits (
    id      INTEGER PRIMARY KEY,
    lease   TEXT NOT NULL,
    fence   INTEGER NOT NULL,
    at      REAL NOT NULL,
    pid     INTEGER NOT NULL,
    what    TEXT NOT NULL
);

-- Each worker's progress figures, written with its batches; `ingest status` reads it.
CREATE TABLE worker_progress (
    worker              TEXT PRIMARY KEY,
    pid                 INTEGER,
    fence               INTEGER,
    state               TEXT NOT NULL,        -- starting | waiting_lease | working | waiting_tokens | idle | backoff | stopped | lost | error
    started_at          REAL,
    updated_at          REAL NOT NULL,
    last_success_at     REAL,                 -- last Keepa call that returned data
    last_commit_at      REAL,
    pages               INTEGER NOT NULL DEFAULT 0,
    deals_seen          INTEGER NOT NULL DEFAULT 0,
    accepted            INTEGER NOT NULL DEFAULT 0,
    rejected            INTEGER NOT NULL DEFAULT 0,
    incomplete          INTEGER NOT NULL DEFAULT 0,
    removed             INTEGER NOT NULL DEFAULT 0,
    tokens_spent        INTEGER NOT NULL DEFAULT 0,
    passes              INTEGER NOT NULL DEFAULT 0,
    errors              INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    last_error_at       REAL,
    detail              TEXT                  -- JSON: cursor/watermark summary for status screens
);
