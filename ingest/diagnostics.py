"""`ingest diagnose stall`: the checks an operator used to run by hand, each with a verdict and
the next step. The status checks (ingest.health) plus the slower or environmental ones: token
trend, cursor and watermark progress, SQLite library version, free disk, database integrity.
On PostgreSQL the disk is the server's (not visible from here) and the integrity check is
skipped, saying so (ingest.backends: `disk_folder`, `integrity`).
"""

import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .backends import Store, backend_of, open_store
from .checkpoints import BackfillCursor, UpsertWatermark
from .health import CORE_CHECKS, _between_passes, token_accounts
from .verdicts import Check, Context, HealthReport, ago, combine, make_context, run_checks
from .keepatime import keepa_minutes_to_unix_seconds

# 3.51.3 fixed a race in which a WAL reset could corrupt the database (several connections
# writing while one checkpoints): exactly how the workers use SQLite.
MIN_SQLITE = (3, 51, 3)
DISK_FAIL_BYTES = 100 * 2**20
DISK_WARN_BYTES = 1 * 2**30
QUICK_CHECK_ABOVE_BYTES = 1 * 2**30   # integrity_check reads every row; quick_check skips index checks
TREND_WINDOW_S = 3600.0
TREND_BUCKET_S = 600.0


@dataclass
class Environment:
    """What the environmental checks look at (tests replace each piece)."""

    db_path: "Path | str | None"     # an SQLite file or a PostgreSQL URL
    sqlite_version: str = sqlite3.sqlite_version
    disk_usage: object = shutil.disk_usage

    @property
    def store(self) -> Store | None:
        return open_store(self.db_path) if self.db_path is not None else None


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def check_sqlite_version(env: Environment) -> Check:
    version = parse_version(env.sqlite_version)
    data = {"sqlite_version": env.sqlite_version, "minimum": ".".join(map(str, MIN_SQLITE))}
    if version < MIN_SQLITE:
        return Check("sqlite_version", "warn",
                     f"SQLite library {env.sqlite_version} is older than 3.51.3 (fixes a WAL-reset corruption race)",
                     "upgrade the system SQLite, or build Python against a newer one (or install pysqlite3);"
                     " meanwhile keep backups (sqlite3 DB '.backup FILE')", data)
    return Check("sqlite_version", "ok", f"SQLite {env.sqlite_version}", "", data)


def check_disk(env: Environment) -> Check:
    folder = env.store.backend.disk_folder(env.db_path) if env.db_path else Path.cwd()
    if folder is None:
        return Check("disk", "ok", "the server's disk: not visible from here", "", {"folder": None})
    try:
        usage = env.disk_usage(folder)
    except OSError as e:
        return Check("disk", "warn", f"cannot read free space of {folder}: {e.strerror}", "check the mount", {})
    size = _db_size(env)
    data = {"folder": str(folder), "free_bytes": usage.free, "total_bytes": usage.total, "db_bytes": size}
    free = f"{usage.free / 2**30:.2f} GiB free on {folder}"
    if usage.free < max(DISK_FAIL_BYTES, size):
        return Check("disk", "fail", free + ": writes (and the WAL checkpoint) will fail",
                     "free space now: prune logs under var/, or move the database to a bigger disk", data)
    if usage.free < DISK_WARN_BYTES or usage.free < 0.05 * usage.total:
        return Check("disk", "warn", free, "free space soon (logs under var/ rotate; old backups?)", data)
    return Check("disk", "ok", free, "", data)


def _db_size(env: Environment) -> int:
    """The database with its -wal and -shm, in bytes, where this host sees them (0: it does not)."""
    if env.db_path is None:
        return 0
    return env.store.backend.storage(None, env.db_path).total_bytes


def check_integrity(conn, env: Environment) -> Check:
    size = _db_size(env)
    result = backend_of(conn).integrity(conn, quick=size > QUICK_CHECK_ABOVE_BYTES)
    rows = list(result.problems) or ["ok"]
    data = {"pragma": result.check, "db_bytes": size, "result": rows}
    if result.skipped:
        return Check("integrity", "ok", f"{result.label}: {result.skipped}", "", {**data, "result": None})
    if rows == ["ok"]:
        return Check("integrity", "ok", f"{result.label}: ok", "", data)
    return Check("integrity", "fail", f"{result.label}: {rows[0]}" + (f" (+{len(rows) - 1} more)" if len(rows) > 1 else ""),
                 result.remedy, data)


def check_token_trend(ctx: Context) -> Check:
    """Spend per 10 minutes over the last hour and the balance the server reported: a balance that
    stays negative is the old incident (two jobs spending without coordination)."""
    since = ctx.now - TREND_WINDOW_S
    buckets = []
    for start in range(int(TREND_WINDOW_S // TREND_BUCKET_S)):
        lo = since + start * TREND_BUCKET_S
        row = ctx.conn.execute(
            "SELECT count(*), coalesce(sum(actual), 0), min(tokens_left), max(tokens_left),"
            " (SELECT tokens_left FROM keepa_calls WHERE at >= ? AND at < ? AND tokens_left IS NOT NULL"
            "  ORDER BY at DESC LIMIT 1) FROM keepa_calls WHERE at >= ? AND at < ?",
            (lo, lo + TREND_BUCKET_S, lo, lo + TREND_BUCKET_S),
        ).fetchone()
        buckets.append({"start": lo, "calls": row[0], "spent": row[1], "min_left": row[2], "max_left": row[3],
                        "last_left": row[4]})
    spent = sum(b["spent"] for b in buckets)
    accounts = token_accounts(ctx)
    rate = accounts[0].effective_rate if accounts else None
    data = {"window_s": TREND_WINDOW_S, "bucket_s": TREND_BUCKET_S, "spent": spent,
            "refill_per_min": rate, "buckets": buckets}
    recent = [r[0] for r in ctx.conn.execute(
        "SELECT tokens_left FROM keepa_calls WHERE at >= ? AND tokens_left IS NOT NULL ORDER BY at",
        (ctx.now - ctx.stall_s,))]
    lefts = [b["last_left"] for b in buckets if b["last_left"] is not None]
    trend = f"; balance {lefts[0]} -> {lefts[-1]}" if lefts else ""
    summary = f"{spent} tokens spent in the last hour ({spent / 60:.1f}/min" + (
        f", refill {rate:g}/min)" if rate is not None else ")") + trend
    if len(recent) >= 2 and max(recent) < 0:
        return Check("token_trend", "warn", f"the balance stayed negative for {ago(ctx.stall_s)}: " + summary,
                     "something spends outside the ledger, or costs are underestimated: ingest tokens;"
                     " compare estimated and actual in the token_flow_hourly view", data)
    return Check("token_trend", "ok", summary, "", data)


def check_cursor(ctx: Context) -> Check:
    """The backfill cursor and the upsert watermark move (or are legitimately waiting)."""
    data, warns = {}, []
    backfill = ctx.checkpoint("backfill")
    if backfill is None:
        warns.append("backfill has no cursor yet")
    else:
        cursor, updated = BackfillCursor.from_json(backfill[0]), backfill[1]
        age = ctx.now - updated
        data["backfill"] = {"pass": cursor.pass_number, "page": cursor.page,
                            "pending": cursor.pending_count(), "updated_age": round(age, 1),
                            "next_pass_at": cursor.next_pass_at,
                            "last_complete_pass_started_at": cursor.last_complete_pass_started_at}
        if _between_passes(ctx, "backfill") is None and age > ctx.stall_s:
            warns.append(f"backfill cursor (pass {cursor.pass_number} page {cursor.page}) has not moved"
                         f" for {ago(age)}")
    upsert = ctx.checkpoint("upsert")
    if upsert is None:
        warns.append("upsert has no watermark yet")
    else:
        mark, updated = UpsertWatermark.from_json(upsert[0]), upsert[1]
        age = ctx.now - updated
        watermark = mark.watermark
        lag = None if watermark is None else round(ctx.now - keepa_minutes_to_unix_seconds(watermark), 1)
        next_poll = mark.next_poll_at
        data["upsert"] = {"watermark": watermark, "watermark_lag": lag, "pending": len(mark.pending),
                          "updated_age": round(age, 1), "next_poll_at": next_poll}
        if age > ctx.stall_s:
            overdue = f", next poll overdue by {ago(ctx.now - next_poll)}" if next_poll < ctx.now else ""
            warns.append(f"upsert watermark checkpoint has not moved for {ago(age)}{overdue}")
    if warns:
        return Check("cursor", "warn", "; ".join(warns),
                     "a cursor that does not move with the worker running means its step keeps failing: see the"
                     " progress check and the worker log; never reset it by hand (the worker resumes from it)", data)
    parts = []
    if "backfill" in data:
        b = data["backfill"]
        parts.append(f"backfill pass {b['pass']} page {b['page']} ({ago(b['updated_age'])} ago)")
    if "upsert" in data:
        u = data["upsert"]
        parts.append(f"upsert watermark {ago(u['watermark_lag'])} behind" if u["watermark_lag"] is not None
                     else "upsert watermark not set")
    return Check("cursor", "ok", ", ".join(parts), "", data)


STALL_EXTRA = (check_token_trend, check_cursor)


def diagnose_stall(conn, db_path: Path | None, *, now: float | None = None, supervisor: dict | None = None,
                   stall_minutes: float = 10.0, config: dict | None = None, env: Environment | None = None,
                   **kwargs) -> HealthReport:
    """Every check, status's and the slower ones, in the order an operator would run them."""
    env = env or Environment(db_path)
    ctx = make_context(conn, now=now, supervisor=supervisor, stall_minutes=stall_minutes, config=config, **kwargs)
    checks = run_checks(ctx, CORE_CHECKS + STALL_EXTRA)
    checks += [check_sqlite_version(env), check_disk(env), check_integrity(conn, env)]
    return combine(checks)
