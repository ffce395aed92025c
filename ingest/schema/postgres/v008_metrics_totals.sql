-- Running totals for `ingest metrics` on PostgreSQL: the port of ../v008_metrics_totals.sql (same
-- tables, seeded the same way, kept by triggers: PL/pgSQL functions run AFTER INSERT FOR EACH ROW).
-- The counters only grow: deleting calls or decisions takes nothing off.

CREATE TABLE keepa_call_totals (
    worker    TEXT NOT NULL,
    endpoint  TEXT NOT NULL,
    code      TEXT NOT NULL,
    calls     BIGINT NOT NULL DEFAULT 0,
    tokens    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (worker, endpoint, code)
);

INSERT INTO keepa_call_totals (worker, endpoint, code, calls, tokens)
SELECT worker, endpoint, coalesce(CAST(http_status AS TEXT), 'none'), count(*), coalesce(sum(actual), 0)
FROM keepa_calls GROUP BY 1, 2, 3;

CREATE FUNCTION keepa_calls_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO keepa_call_totals AS k (worker, endpoint, code, calls, tokens)
    VALUES (NEW.worker, NEW.endpoint, coalesce(CAST(NEW.http_status AS TEXT), 'none'), 1, coalesce(NEW.actual, 0))
    ON CONFLICT (worker, endpoint, code) DO UPDATE SET calls = k.calls + 1, tokens = k.tokens + excluded.tokens;
    RETURN NULL;
END $$;
CREATE TRIGGER keepa_calls_count AFTER INSERT ON keepa_calls
FOR EACH ROW EXECUTE FUNCTION keepa_calls_count();

CREATE TABLE decision_totals (
    outcome    TEXT NOT NULL,
    reason     TEXT NOT NULL,
    decisions  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (outcome, reason)
);

INSERT INTO decision_totals (outcome, reason, decisions)
SELECT outcome, reason, count(*) FROM decisions GROUP BY 1, 2;

CREATE FUNCTION decisions_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO decision_totals AS d (outcome, reason, decisions) VALUES (NEW.outcome, NEW.reason, 1)
    ON CONFLICT (outcome, reason) DO UPDATE SET decisions = d.decisions + 1;
    RETURN NULL;
END $$;
CREATE TRIGGER decisions_count AFTER INSERT ON decisions
FOR EACH ROW EXECUTE FUNCTION decisions_count();
