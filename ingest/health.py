"""Health checks with verdicts: what `ingest status` and `ingest diagnose stall` print.

Each check reads the state tables (leases, token ledger, call log, worker progress, checkpoints)
and returns a `Check`: a verdict ('ok' | 'warn' | 'fail'), a one-line summary, the next step an
operator should take, and the figures behind it. `assess_health()` runs the checks `ingest status`
needs (CORE_CHECKS) and folds them into one verdict (the records, the check `Context` and the
folding are ingest/verdicts.py):

  down      some check failed: a worker is not running / not holding its lease, or the
            database is unusable
  degraded  some check warned: a stall (lease held but no progress), tokens full but unspent,
            a restart loop, late heartbeats, recent 429s, supervisord unreachable ...
  healthy   every check ok

All times come from `now` (wall seconds) so tests build a database state and inject the time.
"""

from .backends import backend_of
from .checkpoints import BackfillCursor
from .clock import SYSTEM_CLOCK
from .lease_rules import ACQUISITIONS, LeaseState
from .lease_table import CorruptLease
from .leases import LeaseTiming
from .store import LOW_SPACE_BYTES, free_bytes, latest_version, size_text
from .token_model import Account
from .verdicts import WORKERS, Check, Context, HealthReport, ago, combine, make_context, run_checks

RESTART_WINDOW_S = 15 * 60.0     # lease acquisitions counted over this window ...
RESTART_LOOP_ACQUISITIONS = 4    # ... this many or more: a restart loop
FULL_FRACTION = 0.98             # balance at >= 98% of the cap counts as "full"
# supervisord program states by the verdict check_supervisor gives them; any other state fails
OK_PROGRAM_STATES = frozenset({"RUNNING"})
WARN_PROGRAM_STATES = frozenset({"STARTING", "BACKOFF", "STOPPING"})   # not settled yet


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(now - then, 1)


# ------------------------------------------------------------------ the checks


def check_database(ctx: Context) -> Check:
    backend = backend_of(ctx.conn)
    try:
        version = backend.schema_version(ctx.conn)
        known = latest_version()
        ctx.conn.execute("SELECT count(*) FROM leases").fetchone()
    except backend.errors as e:
        return Check("database", "fail", f"the database cannot be read: {e}",
                     "check the file and its permissions: ingest db info; restore from backup if damaged")
    data = {"schema_version": version, "latest": known}
    if version != known:
        return Check("database", "fail", f"schema version {version}, this ingest expects {known}",
                     "run any ingest command once to migrate (ingest db migrate), or upgrade ingest", data)
    return Check("database", "ok", f"schema version {version}", "", data)


def check_leases(ctx: Context) -> Check:
    """Every worker must hold its lease with a live holder."""
    try:
        leases = ctx.leases()
    except CorruptLease as e:
        return Check("leases", "fail", str(e), "fix or delete the row by hand (see docs/leases.md)")
    data, fails, warns = {}, [], []
    for worker in ctx.workers:
        row = leases.get(worker)
        state = row["state"] if row else "never taken"
        data[worker] = {"state": state, "holder": row and row["holder"], "pid": row and row["pid"],
                        "fence": row and row["fence"], "held_for": row and row["held_for"],
                        "transitions": row and row["transitions"]}
        if state in (LeaseState.FREE, "never taken"):
            fails.append(f"{worker} lease {state}: no {worker} worker is running")
        elif state == LeaseState.DEAD_HOLDER:
            fails.append(f"{worker} lease held by dead pid {row['pid']}")
        elif state == LeaseState.EXPIRED:
            warns.append(f"{worker} lease expired (holder {row['holder']} stopped renewing)")
    if fails:
        return Check("leases", "fail", "; ".join(fails + warns),
                     "start the workers (scripts/start, or supervisorctl start backfill upsert); a dead holder's"
                     " lease is taken over at once by the next worker", data)
    if warns:
        return Check("leases", "warn", "; ".join(warns),
                     "the holder is hung or paused: look at its log; a live worker takes an expired lease over"
                     " within its retry interval (ingest leases)", data)
    return Check("leases", "ok", ", ".join(f"{w} held (fence {data[w]['fence']})" for w in ctx.workers), "", data)


def heartbeat_margin(timing: LeaseTiming) -> float:
    return max(2.0, timing.renew_s / 2)


def check_heartbeats(ctx: Context) -> Check:
    """A held lease renewed longer ago than the renew interval plus a margin: the holder is slow."""
    limit = ctx.timing.renew_s + heartbeat_margin(ctx.timing)
    try:
        leases = ctx.leases()
    except CorruptLease as e:
        return Check("heartbeats", "fail", str(e), "fix or delete the row by hand (see docs/leases.md)")
    data, late = {}, []
    for name, row in leases.items():
        if row["state"] not in (LeaseState.HELD, LeaseState.EXPIRED):
            continue
        data[name] = {"heartbeat_age": row["heartbeat_age"], "limit": limit, "basis": row["basis"]}
        if row["heartbeat_age"] is not None and row["heartbeat_age"] > limit:
            late.append(f"{name} renewed {ago(row['heartbeat_age'])} ago (every {ctx.timing.renew_s:g}s expected)")
    if late:
        return Check("heartbeats", "warn", "; ".join(late),
                     "the holder is blocked (disk, database lock, paused process) or its clock is off;"
                     " check its log and `ingest leases`", data)
    return Check("heartbeats", "ok", f"{len(data)} held lease(s) renewed on time", "", data)


def _between_passes(ctx: Context, worker: str) -> float | None:
    """When backfill is legitimately idle between passes: the time its next pass starts."""
    if worker != "backfill":
        return None
    stored = ctx.checkpoint("backfill")
    cursor = BackfillCursor.from_json(stored[0]) if stored else None
    return cursor.next_pass_at if cursor and cursor.between_passes(ctx.now) else None


def check_progress(ctx: Context) -> Check:
    """Lease held but no commit for stall_s: a stall."""
    leases = _safe_leases(ctx)
    data, warns = {}, []
    for worker in ctx.workers:
        row = ctx.progress(worker)
        lease = leases.get(worker)
        held = bool(lease and lease["state"] == "held")
        info = {"state": row and row["state"], "held": held}
        data[worker] = info
        if row is None:
            if held and (lease["held_for"] or 0) > ctx.stall_s:
                warns.append(f"{worker} holds its lease for {ago(lease['held_for'])} but never recorded progress")
            continue
        since_acquired = lease["held_for"] if held else None
        commit_age = _age(ctx.now, row["last_commit_at"])
        success_age = _age(ctx.now, row["last_success_at"])
        info.update(last_commit_age=commit_age, last_success_age=success_age, last_error=row["last_error"],
                    last_error_age=_age(ctx.now, row["last_error_at"]), errors=row["errors"])
        if not held:
            continue  # not running: check_leases says so
        # A new holder gets stall_s from its acquisition before its first commit is due.
        quiet = min(x for x in (commit_age, since_acquired) if x is not None) if (
            commit_age is not None or since_acquired is not None) else None
        next_pass = _between_passes(ctx, worker)
        if next_pass is not None:
            info["next_pass_in"] = round(next_pass - ctx.now, 1)
            continue
        if quiet is not None and quiet > ctx.stall_s:
            why = f" (state {row['state']}" + (f", last error: {row['last_error']}" if row["last_error"] else "") + ")"
            warns.append(f"{worker} holds its lease but committed nothing for {ago(quiet)}{why}")
    if warns:
        return Check("progress", "warn", "; ".join(warns),
                     "ingest diagnose stall (tokens, 429s, cursor); then the worker's log"
                     " (supervisorctl -c supervisor.d/supervisord.conf tail -f WORKER stderr)", data)
    return Check("progress", "ok", "workers holding a lease are committing work", "", data)


def check_last_fetch(ctx: Context) -> Check:
    """The last Keepa call that returned data, per worker. A worker that holds its lease (and is
    not between backfill passes) but has fetched nothing for stall_s is failing to fetch, even if
    it still commits (incomplete outcomes, touched deals)."""
    leases = _safe_leases(ctx)
    data, warns = {}, []
    for worker in ctx.workers:
        row = ctx.progress(worker) or {}
        lease = leases.get(worker)
        held = bool(lease and lease["state"] == "held")
        # newest first by rowid: stops at the worker's latest call (no index on worker needed)
        call = ctx.conn.execute("SELECT at, status FROM keepa_calls WHERE worker = ? ORDER BY id DESC LIMIT 1",
                                (worker,)).fetchone()
        last_call, last_status = (call[0], call[1]) if call else (None, None)
        success_age = _age(ctx.now, row.get("last_success_at"))
        data[worker] = {"last_success_age": success_age, "last_call_age": _age(ctx.now, last_call),
                        "last_call_status": last_status}
        if not held or _between_passes(ctx, worker) is not None or (lease["held_for"] or 0) <= ctx.stall_s:
            continue
        if success_age is None or success_age > ctx.stall_s:
            status = f" (last call: {last_status}, {ago(_age(ctx.now, last_call))} ago)" if last_call else ""
            warns.append(f"{worker}: last successful Keepa fetch {ago(success_age)}"
                         f"{' ago' if success_age is not None else ''}{status}")
    if warns:
        return Check("last_fetch", "warn", "; ".join(warns),
                     "look at its recent calls: sqlite3 DB \"SELECT * FROM keepa_calls ORDER BY id DESC LIMIT 20\";"
                     " tokens (ingest tokens) and the worker's log", data)
    return Check("last_fetch", "ok", ", ".join(f"{w} {ago(data[w]['last_success_age'])}"
                                               f"{' ago' if data[w]['last_success_age'] is not None else ''}"
                                               for w in ctx.workers), "", data)


def _safe_leases(ctx: Context) -> dict:
    try:
        return ctx.leases()
    except CorruptLease:
        return {}


def token_accounts(ctx: Context) -> list[Account]:
    return [Account.from_row(r).projected(ctx.now) for r in ctx.conn.execute("SELECT * FROM token_accounts")]


def tokens_spent(conn, since: float, until: float | None = None) -> int:
    sql = "SELECT coalesce(sum(actual), 0) FROM keepa_calls WHERE at >= ?"
    args = [since]
    if until is not None:
        sql += " AND at < ?"
        args.append(until)
    return int(conn.execute(sql, args).fetchone()[0])


def check_tokens(ctx: Context) -> Check:
    """Tokens full but nothing spent (workers idle while tokens expire), or blocked after a 429."""
    accounts = token_accounts(ctx)
    if not accounts:
        return Check("tokens", "warn", "the token ledger has no account yet (no Keepa call made)",
                     "start the workers; the first call syncs the ledger (ingest tokens)", {})
    spent = tokens_spent(ctx.conn, ctx.now - ctx.stall_s)
    data, warns = {"spent_recently": spent, "window_s": ctx.stall_s, "accounts": []}, []
    for a in accounts:
        balance = a.server_balance
        data["accounts"].append({"account": a.account, "balance": round(balance, 1), "cap": a.cap,
                                 "refill_rate": a.refill_rate, "in_flight": a.in_flight,
                                 "blocked_until": a.blocked_until})
        if a.blocked_until is not None and a.blocked_until > ctx.now:
            warns.append(f"blocked after a 429 for another {ago(a.blocked_until - ctx.now)}")
        if a.cap > 0 and balance >= FULL_FRACTION * a.cap and spent == 0:
            warns.append(f"tokens full ({balance:.0f}/{a.cap:.0f}) and none spent in {ago(ctx.stall_s)}:"
                         " refills are expiring unused")
    if warns:
        return Check("tokens", "warn", "; ".join(warns),
                     "the workers are not calling Keepa: ingest diagnose stall (progress, leases), their logs", data)
    a = accounts[0]
    return Check("tokens", "ok", f"balance {a.server_balance:.0f}/{a.cap:.0f}, {spent} spent in {ago(ctx.stall_s)}",
                 "", data)


def check_rate_limits(ctx: Context) -> Check:
    since = ctx.now - ctx.stall_s
    rows = ctx.conn.execute(
        "SELECT worker, count(*), max(at) FROM keepa_calls WHERE status = 'rate_limited' AND at >= ? GROUP BY worker",
        (since,),
    ).fetchall()
    data = {"window_s": ctx.stall_s, "by_worker": {r[0]: r[1] for r in rows}}
    total = sum(r[1] for r in rows)
    if total:
        last = max(r[2] for r in rows)
        return Check("rate_limits", "warn", f"{total} HTTP 429 in {ago(ctx.stall_s)} (last {ago(ctx.now - last)} ago)",
                     "something spends tokens outside the ledger (another client on the same key?) or the plan"
                     " changed: compare `ingest tokens` with Keepa's /token", data)
    return Check("rate_limits", "ok", f"no 429 in {ago(ctx.stall_s)}", "", data)


def check_restarts(ctx: Context) -> Check:
    """Many acquisitions of one lease lately: a worker crashing and being restarted in a loop."""
    since = ctx.now - RESTART_WINDOW_S
    rows = ctx.conn.execute(
        f"SELECT name, count(*) FROM lease_events WHERE at >= ?"
        f" AND event IN ({', '.join('?' * len(ACQUISITIONS))}) GROUP BY name",
        (since, *ACQUISITIONS),
    ).fetchall()
    counts = {r[0]: r[1] for r in rows}
    data = {"window_s": RESTART_WINDOW_S, "acquisitions": counts}
    looping = [f"{name} acquired {n} times in {ago(RESTART_WINDOW_S)}" for name, n in sorted(counts.items())
               if n >= RESTART_LOOP_ACQUISITIONS]
    for name, proc in sorted((ctx.supervisor or {}).items()):
        if proc and proc.get("state") == "BACKOFF":
            looping.append(f"supervisor: {name} in BACKOFF (exits soon after starting)")
    if looping:
        return Check("restarts", "warn", "; ".join(looping),
                     "the worker exits soon after starting: read the end of its log"
                     " (supervisorctl -c supervisor.d/supervisord.conf tail WORKER stderr)", data)
    return Check("restarts", "ok", "no restart loop", "", data)


def _program(supervisor: dict, worker: str) -> dict | None:
    """supervisord names programs 'backfill' or 'group:backfill'."""
    for name, proc in supervisor.items():
        if name == worker or name.rsplit(":", 1)[-1] == worker:
            return proc
    return None


def check_supervisor(ctx: Context) -> Check:
    if ctx.supervisor is None:
        return Check("supervisor", "warn", "supervisord is not reachable: process states unknown",
                     "start it with scripts/start (supervisord -c supervisor.d/supervisord.conf)", {})
    data, fails, warns = {}, [], []
    for worker in ctx.workers:
        proc = _program(ctx.supervisor, worker)
        state = (proc or {}).get("state", "absent")
        data[worker] = {"state": state, "pid": (proc or {}).get("pid"), "uptime_s": (proc or {}).get("uptime_s")}
        if state in OK_PROGRAM_STATES:
            continue
        (warns if state in WARN_PROGRAM_STATES else fails).append(f"{worker} {state}")
    if fails:
        return Check("supervisor", "fail", "not running: " + ", ".join(fails + warns),
                     "supervisorctl -c supervisor.d/supervisord.conf start WORKER; if FATAL, read its log first", data)
    if warns:
        return Check("supervisor", "warn", ", ".join(warns),
                     "wait a few seconds; if it stays so, read its log", data)
    return Check("supervisor", "ok", ", ".join(f"{w} RUNNING" for w in ctx.workers), "", data)


def check_subscription(ctx: Context) -> Check:
    """A worker paused on HTTP 402 (its progress state 'paused'): nothing is fetched until the
    Keepa subscription is active again; the worker re-checks and resumes by itself."""
    paused = [w for w in ctx.workers if (ctx.progress(w) or {}).get("state") == "paused"]
    data = {"paused": paused}
    if paused:
        reason = (ctx.progress(paused[0]) or {}).get("last_error") or "paused"
        return Check("subscription", "fail", f"{', '.join(paused)} {reason}",
                     "renew or re-activate the Keepa subscription of this key; the workers re-check with the"
                     " free /token call every [worker] payment_retry_s and resume by themselves", data)
    return Check("subscription", "ok", "no worker paused by Keepa (402)", "", data)


def check_space(ctx: Context) -> Check:
    """A full disk: a worker waiting for space (state disk_full), or almost nothing free where
    the database is. Workers roll the step back and retry; nothing is lost meanwhile."""
    path = backend_of(ctx.conn).database_file(ctx.conn)
    waiting = [w for w in ctx.workers if (ctx.progress(w) or {}).get("state") == "disk_full"]
    if path is None:  # PostgreSQL: the server's disk
        return _server_space(waiting)
    if not path:
        return Check("space", "ok", "in-memory database", "", {})
    free = free_bytes(path)
    data = {"path": path, "free_bytes": free, "waiting": waiting}
    if waiting or (free is not None and free < LOW_SPACE_BYTES):
        who = f"; {', '.join(waiting)} waiting for space" if waiting else ""
        return Check("space", "fail", f"disk full ({path}, {size_text(free)} free){who}",
                     "free space on that filesystem (old backups: ingest db backup --keep N; logs under var/log;"
                     " ingest db stats shows what is big) or grow it: the workers retry every"
                     " [worker] disk_full_retry_s and carry on by themselves", data)
    return Check("space", "ok", f"{size_text(free)} free for {path}", "", data)


def _server_space(waiting: list[str]) -> Check:
    data = {"path": None, "free_bytes": None, "waiting": waiting}
    if waiting:
        return Check("space", "fail", f"the database server's disk is full: {', '.join(waiting)} waiting for space",
                     "free space on the database server (or grow its disk): the workers retry every"
                     " [worker] disk_full_retry_s and carry on by themselves", data)
    return Check("space", "ok", "the server's disk: not visible from here", "", data)


def check_backups(ctx: Context) -> Check:
    """The last backup's age; a warning when scheduled backups ([backup] every_h) are overdue
    or the last attempt failed."""
    from .backup import BackupSettings, last_backup

    settings = BackupSettings.from_config(ctx.config or {})
    good, last = last_backup(ctx.conn, ok_only=True), last_backup(ctx.conn)
    data = {"every_h": settings.every_h, "last_at": good and good.at, "last_path": good and good.path,
            "last_age_s": _age(ctx.now, good and good.at), "last_attempt_ok": last.ok if last else None}
    where = f"last backup {ago(ctx.now - good.at)} ago ({good.path})" if good else "no backup yet"
    if last is not None and not last.ok:
        return Check("backups", "warn", f"the last backup attempt failed ({last.path}); {where}",
                     "ingest db backup (it says why); free space or fix [backup] dir", data)
    if settings.every_h > 0 and (good is None or ctx.now - good.at > 2 * settings.every_h * 3600):
        return Check("backups", "warn", f"{where}: scheduled every {settings.every_h:g} h",
                     "the upsert worker takes them: is it running? ingest db backup takes one now", data)
    return Check("backups", "ok", where + ("" if settings.every_h else " (unscheduled: [backup] every_h)"), "", data)


CORE_CHECKS = (check_database, check_supervisor, check_leases, check_heartbeats, check_subscription,
               check_progress, check_last_fetch, check_tokens, check_rate_limits, check_restarts, check_space, check_backups)


def assess_health(conn, *, now: float | None = None, supervisor: dict[str, dict] | None = None,
                  stall_minutes: float = 10.0, config: dict | None = None, workers: tuple[str, ...] = WORKERS,
                  clock=SYSTEM_CLOCK) -> HealthReport:
    """The verdict `ingest status` shows. `supervisor`: program name -> {state, pid, uptime_s, ...},
    or None when supervisord is not reachable. `config` supplies the lease timing ([leases])."""
    ctx = make_context(conn, now=now, supervisor=supervisor, stall_minutes=stall_minutes, config=config,
                       workers=workers, clock=clock)
    return combine(run_checks(ctx, CORE_CHECKS))


def other_programs_problem(supervisor: dict[str, dict] | None) -> str | None:
    """Programs besides the workers (the metrics endpoint, the demo's simulator) that are not running."""
    if not supervisor:
        return None
    bad = [f"{name} {p['state']}" for name, p in sorted(supervisor.items())
           if name not in WORKERS and p["state"] != "RUNNING"]
    return "supervisor: " + ", ".join(bad) + " (not a worker)" if bad else None


def system_report(conn, supervisor: dict[str, dict] | None, *, now: float | None = None,
                  stall_minutes: float = 10.0, config: dict | None = None) -> HealthReport:
    """The verdict of `ingest status`, every program counted: what the watchdog acts and alerts
    on too (one code path, no second opinion)."""
    report = assess_health(conn, now=now, supervisor=supervisor, stall_minutes=stall_minutes, config=config)
    return with_other_programs(report, supervisor)


def with_other_programs(report: HealthReport, supervisor: dict[str, dict] | None) -> HealthReport:
    """The verdict `ingest status` gives: a program besides the workers that is not running
    makes a healthy report degraded (it is listed among the problems)."""
    problem = other_programs_problem(supervisor)
    if problem is None:
        return report
    verdict = "degraded" if report.verdict == "healthy" else report.verdict
    return HealthReport(verdict, [*report.problems, problem], report.checks)
