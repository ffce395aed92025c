"""The call log: one row per Keepa request (time, worker, endpoint, ASINs, estimated and actual
cost, status, latency, redacted error), kept for `[ledger] call_log_days` days (default 30)."""

from dataclasses import dataclass

from .logs import redact

DEFAULT_RETENTION_DAYS = 30.0


@dataclass
class CallRecord:
    at: float
    worker: str
    endpoint: str
    asins: int = 0
    estimated: float | None = None
    actual: int | None = None
    status: str = "ok"   # ok | rate_limited | request_error | transient | malformed | error
    http_status: int | None = None
    latency_ms: float | None = None
    tokens_left: int | None = None
    error: str | None = None

    def insert(self, conn, account: str | None) -> None:
        error = redact(self.error)[:500] if self.error else None
        conn.execute(
            "INSERT INTO keepa_calls (at, account, worker, endpoint, asins, estimated, actual, status,"
            " http_status, latency_ms, tokens_left, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (self.at, account, self.worker, self.endpoint, self.asins, self.estimated, self.actual, self.status,
             self.http_status, self.latency_ms, self.tokens_left, error),
        )


def prune(conn, now: float, days: float = DEFAULT_RETENTION_DAYS) -> int:
    """Delete calls older than `days`; one statement, so atomic without BEGIN IMMEDIATE."""
    return conn.execute("DELETE FROM keepa_calls WHERE at < ?", (now - days * 86400,)).rowcount


def recent(conn, limit: int = 50, worker: str | None = None) -> list[dict]:
    """The newest `limit` calls, newest first, optionally of one worker only."""
    where, args = ("WHERE worker = ?", (worker,)) if worker else ("", ())
    rows = conn.execute(f"SELECT * FROM keepa_calls {where} ORDER BY id DESC LIMIT ?", (*args, int(limit))).fetchall()
    return [dict(row) for row in rows]


def spend_by_worker(conn, since: float) -> dict[str, dict]:
    """Per worker since `since`: calls, tokens spent and 429s. The one source of truth for token
    spend: `actual` is the server's tokensConsumed, written in the ledger's own transaction as it
    settles each call (failed calls the server charged included); worker_progress.tokens_spent is
    the workers' own count and skips those."""
    rows = conn.execute(
        "SELECT worker, count(*) AS calls, CAST(coalesce(sum(actual), 0) AS BIGINT) AS tokens,"
        " sum(CASE WHEN status = 'rate_limited' THEN 1 ELSE 0 END) AS rate_limited"
        " FROM keepa_calls WHERE at >= ? GROUP BY worker",
        (since,),
    ).fetchall()
    return {r["worker"]: {"calls": r["calls"], "tokens": r["tokens"], "rate_limited": r["rate_limited"]} for r in rows}
