-- Running totals for `ingest metrics`, kept by triggers so a scrape reads a few small rows instead
-- of counting growing tables (each trigger costs a worker ~3 us per row written: bench/metrics.py).
-- Deals by status are not kept here: the scrape counts them on the deals_status index (~7 ms
-- per 100k deals), which costs the workers' write lock nothing. The counters only grow: pruning the call log (calllog.prune) or
-- deleting decisions takes nothing off, as a Prometheus counter must not go back. Seeded from the
-- rows present at upgrade time (the call log's retained days). See ingest/metrics.py.

-- Keepa requests per worker, endpoint and HTTP status ('none': no response, e.g. a timeout),
-- with the tokens the server charged for them (keepa_calls.actual).
CREATE TABLE keepa_call_totals (
    worker    TEXT NOT NULL,
    endpoint  TEXT NOT NULL,
    code      TEXT NOT NULL,
    calls     INTEGER NOT NULL DEFAULT 0,
    tokens    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (worker, endpoint, code)
) WITHOUT ROWID;

INSERT INTO keepa_call_totals (worker, endpoint, code, calls, tokens)
SELECT worker, endpoint, coalesce(CAST(http_status AS TEXT), 'none'), count(*), coalesce(sum(actual), 0)
FROM keepa_calls GROUP BY 1, 2, 3;

CREATE TRIGGER keepa_calls_count AFTER INSERT ON keepa_calls
BEGIN
    INSERT INTO keepa_call_totals (worker, endpoint, code, calls, tokens)
    VALUES (NEW.worker, NEW.endpoint, coalesce(CAST(NEW.http_status AS TEXT), 'none'), 1, coalesce(NEW.actual, 0))
    ON CONFLICT (worker, endpoint, code) DO UPDATE SET calls = calls + 1, tokens = tokens + excluded.tokens;
END;

-- Evaluation outcomes (and janitor removals) by outcome and reason.
CREATE TABLE decision_totals (
    outcome    TEXT NOT NULL,
    reason     TEXT NOT NULL,
    decisions  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (outcome, reason)
) WITHOUT ROWID;

INSERT INTO decision_totals (outcome, reason, decisions)
SELECT outcome, reason, count(*) FROM decisions GROUP BY 1, 2;

CREATE TRIGGER decisions_count AFTER INSERT ON decisions
BEGIN
    INSERT INTO decision_totals (outcome, reason, decisions) VALUES (NEW.outcome, NEW.reason, 1)
    ON CONFLICT (outcome, reason) DO UPDATE SET decisions = decisions + 1;
END;

