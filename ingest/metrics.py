"""Prometheus metrics: the numbers operators graph and alert on, read from the database at scrape time.

There are no counters in process memory to lose on a restart: every figure is read from the one
database every process shares, through a read-only connection opened per scrape (the store's
`read_only()`: SQLite `mode=ro` and `PRAGMA query_only`; PostgreSQL READ ONLY transactions at
REPEATABLE READ), in one read transaction so the figures are of one moment. A scrape costs a
few indexed reads: the counters come from running totals (v008's keepa_call_totals and
decision_totals, kept by triggers), never from a count(*) over the call log or the decisions;
deals by status are counted on their covering index (a gauge, ~7 ms per 100k deals).

    read_snapshot(conn, path, now, supervisor)  -> Snapshot   (the reads; a typed record)
    families(snapshot)                          -> metric families (pure)
    IngestCollector(path, ...)                  the prometheus_client collector: both, per scrape

The health verdicts are those of `ingest status`: the same checks (ingest.health.assess_health)
and the same rule for the other supervisord programs (ingest.health.with_other_programs).
Tables from other features (watch_actions, alerts, backups) are read when they exist; until
then their families have no samples. prometheus_client is imported only where families are
built: `ingest.settings` imports this module (for MetricsSettings) in every command.
"""

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .backends import Store, backend_of, open_store
from .deals import deal_counts
from .errors import ConfigError, StoreError
from .health import assess_health, with_other_programs
from .lease_rules import LeaseState
from .lease_table import CorruptLease, lease_rows
from .logs import redact
from .settings import setting
from .token_model import Account
from .verdicts import VERDICT_ORDER

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9464"   # 9464: the port commonly used by exporters of this kind
# worker_progress.state values (v003_deals.sql): each worker has a 0/1 sample for every one
WORKER_STATES = ("starting", "waiting_lease", "working", "waiting_tokens", "idle", "backoff", "stopped", "lost",
                 "error")
HEALTH_VERDICTS = ("healthy", "degraded", "down")   # ingest_health_verdict: the index (0, 1, 2)


# ------------------------------------------------------------------ settings


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT' -> (host, port); port 0 asks for any free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"listen must be HOST:PORT (e.g. {DEFAULT_LISTEN}), not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or ("[" in host or "]" in host):
        raise ConfigError(f"listen must be HOST:PORT (e.g. {DEFAULT_LISTEN}), not {text!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen port must be 0-65535 (0: any free port), not {port!r}")
    return host, int(port)


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = setting(DEFAULT_LISTEN, "HOST:PORT `ingest metrics serve` listens on (port 0: any free port)")

    def __post_init__(self):
        parse_listen(self.listen)


# ------------------------------------------------------------------ the records


@dataclass(frozen=True)
class TokenFigures:
    balance: float             # the server's balance, projected to now (what `ingest tokens` shows)
    refill_per_minute: float
    reserved: float            # open reservations (in flight)
    blocked_until: float       # after a 429: nobody calls before this (0: not blocked)


@dataclass(frozen=True)
class LeaseFigures:
    name: str
    held: bool
    fence: int
    heartbeat_age_s: float | None   # None while free


@dataclass(frozen=True)
class WorkerFigures:
    worker: str
    state: str
    last_commit_at: float | None
    last_fetch_at: float | None      # worker_progress.last_success_at: last Keepa call that returned data


@dataclass(frozen=True)
class FileFigures:
    db_bytes: int
    wal_bytes: int | None          # None: not visible from here (PostgreSQL: the server's)
    disk_free_bytes: int | None


@dataclass(frozen=True)
class Snapshot:
    """Everything one scrape shows. Mappings are empty when their table has no rows; the
    Optional ones are None when their table does not exist (another feature not installed)."""

    at: float
    verdict: str
    checks: dict[str, str]                         # check name -> 'ok' | 'warn' | 'fail'
    files: FileFigures | None = None               # None: no database file
    tokens: TokenFigures | None = None             # None: no Keepa call yet
    requests: dict[tuple[str, str], int] = field(default_factory=dict)   # (endpoint, code) -> calls
    tokens_spent: dict[str, int] = field(default_factory=dict)           # worker -> tokens charged
    rate_limited: int = 0
    leases: tuple[LeaseFigures, ...] = ()
    workers: tuple[WorkerFigures, ...] = ()
    deals: dict[str, int] = field(default_factory=dict)
    decisions: dict[tuple[str, str], int] = field(default_factory=dict)  # (outcome, reason) -> count
    incomplete_backlog: int = 0
    watchdog_actions: dict[str, int] | None = None
    alerts_sent: dict[tuple[str, str], int] | None = None                # (channel, result) -> count
    last_backup_at: float | None = None            # 0.0: the table exists, no good backup yet
    read_seconds: float = 0.0
    problem: str | None = None                     # why the database could not be read (logged, not exported)


# ------------------------------------------------------------------ reading


def _tables(conn) -> set[str]:
    return backend_of(conn).tables(conn)


def file_figures(store: Store, conn=None) -> FileFigures | None:
    """The database's size, its WAL's and the free disk, as far as this host sees them (None:
    no database file yet)."""
    facts = store.backend.storage(conn, store.target)
    if facts.db_bytes is None:
        return None
    return FileFigures(facts.db_bytes, facts.wal_bytes, facts.disk_free)


def token_figures(conn, now: float) -> TokenFigures | None:
    """The (one) ledger account, projected to now; several accounts (keys) are added up."""
    accounts = [Account.from_row(r).projected(now) for r in conn.execute("SELECT * FROM token_accounts")]
    if not accounts:
        return None
    blocked = max((a.blocked_until or 0.0) for a in accounts)
    return TokenFigures(balance=sum(a.server_balance for a in accounts),
                        refill_per_minute=sum(a.refill_rate for a in accounts),
                        reserved=sum(a.in_flight for a in accounts),
                        blocked_until=blocked if blocked > now else 0.0)


def lease_figures(conn, now: float) -> tuple[LeaseFigures, ...]:
    try:
        rows = lease_rows(conn, now)
    except CorruptLease:
        return ()   # the health check 'leases' fails and names the row
    return tuple(LeaseFigures(r["name"], r["state"] == LeaseState.HELD, r["fence"],
                              r["heartbeat_age"] if r["holder"] else None) for r in rows)


def worker_figures(conn) -> tuple[WorkerFigures, ...]:
    rows = conn.execute("SELECT worker, state, last_commit_at, last_success_at FROM worker_progress ORDER BY worker")
    return tuple(WorkerFigures(r[0], r[1], r[2], r[3]) for r in rows)


def grouped(conn, sql: str, *args) -> dict:
    """{key columns (one: the value, several: a tuple): last column} of a GROUP BY query."""
    out = {}
    for row in conn.execute(sql, args):
        key = tuple(row[:-1])
        out[key[0] if len(key) == 1 else key] = row[-1]
    return out


TOTALS = "keepa_call_totals"   # v008's tables; an older file is refused by check_database


def request_counts(conn, tables: set[str]) -> dict[tuple[str, str], int]:
    if TOTALS not in tables:
        return {}
    return grouped(conn, "SELECT endpoint, code, sum(calls) FROM keepa_call_totals GROUP BY 1, 2")


def tokens_spent_by_worker(conn, tables: set[str]) -> dict[str, int]:
    if TOTALS not in tables:
        return {}
    return grouped(conn, "SELECT worker, sum(tokens) FROM keepa_call_totals GROUP BY 1")


def rate_limited_total(conn, tables: set[str]) -> int:
    if TOTALS not in tables:
        return 0
    return conn.execute("SELECT coalesce(sum(calls), 0) FROM keepa_call_totals WHERE code = '429'").fetchone()[0]


def decision_counts(conn, tables: set[str]) -> dict[tuple[str, str], int]:
    if TOTALS not in tables:
        return {}
    return grouped(conn, "SELECT outcome, reason, decisions FROM decision_totals")


def incomplete_backlog(conn, now: float) -> int:
    """Incomplete deals due for a refetch (the deals_retry index: only the due ones are read)."""
    return conn.execute("SELECT count(*) FROM deals WHERE status = 'incomplete' AND next_retry_at <= ?",
                        (now,)).fetchone()[0]


def watchdog_action_counts(conn, tables: set[str]) -> dict[str, int] | None:
    if "watch_actions" not in tables:
        return None
    return grouped(conn, "SELECT action, count(*) FROM watch_actions GROUP BY 1")


def alert_counts(conn, tables: set[str]) -> dict[tuple[str, str], int] | None:
    if "alerts" not in tables:
        return None
    return grouped(conn, "SELECT channel, result, count(*) FROM alerts GROUP BY 1, 2")


def last_backup_at(conn, tables: set[str]) -> float | None:
    if "backups" not in tables:
        return None
    return conn.execute("SELECT coalesce(max(at), 0.0) FROM backups WHERE ok = 1").fetchone()[0]


def read_snapshot(conn, path: "Path | str | Store", now: float, *, supervisor: dict | None, stall_minutes: float = 10.0,
                  config: dict | None = None) -> Snapshot:
    """Every figure, in one read transaction (one moment of the database)."""
    t0 = time.perf_counter()
    conn.execute("BEGIN")
    try:
        report = with_other_programs(assess_health(conn, now=now, supervisor=supervisor, stall_minutes=stall_minutes,
                                                   config=config), supervisor)
        tables = _tables(conn)
        snap = Snapshot(
            at=now, verdict=report.verdict, checks={c.name: c.verdict for c in report.checks},
            files=file_figures(open_store(path), conn),
            tokens=token_figures(conn, now),
            requests=request_counts(conn, tables),
            tokens_spent=tokens_spent_by_worker(conn, tables),
            rate_limited=rate_limited_total(conn, tables),
            leases=lease_figures(conn, now),
            workers=worker_figures(conn),
            # on the covering index deals_status (~4-7 ms per 100k deals): no trigger on the write path
            deals=deal_counts(conn),
            decisions=decision_counts(conn, tables),
            incomplete_backlog=incomplete_backlog(conn, now),
            watchdog_actions=watchdog_action_counts(conn, tables),
            alerts_sent=alert_counts(conn, tables),
            last_backup_at=last_backup_at(conn, tables),
        )
    finally:
        conn.execute("COMMIT")
    return replace(snap, read_seconds=time.perf_counter() - t0)


def unreadable_snapshot(store: Store, now: float, problem: str) -> Snapshot:
    """No database (not created yet) or one that cannot be read: down, the database check failing."""
    return Snapshot(at=now, verdict="down", checks={"database": "fail"}, files=file_figures(store),
                    problem=redact(problem))


def snapshot(path: "Path | str | Store", now: float | None = None, *, supervisor: dict | None,
             stall_minutes: float = 10.0, config: dict | None = None) -> Snapshot:
    """One scrape's figures: a connection of its own (scrapes may come in parallel, and a file
    restored from a backup is seen at once), closed afterwards. Never raises for a bad database."""
    now = time.time() if now is None else now
    store = open_store(path)
    try:
        conn = store.read_only()
    except StoreError as e:
        return unreadable_snapshot(store, now, str(e))
    try:
        return read_snapshot(conn, store, now, supervisor=supervisor, stall_minutes=stall_minutes, config=config)
    except store.backend.errors as e:
        return unreadable_snapshot(store, now, f"database {store.label}: {_one_line(e)}")
    finally:
        conn.close()


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ------------------------------------------------------------------ the families (pure)


def _gauge(name: str, doc: str, labels: tuple[str, ...] = (), samples=()):
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for label_values, value in samples:
        family.add_metric(list(label_values), value)
    return family


def _counter(name: str, doc: str, labels: tuple[str, ...] = (), samples=()):
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, doc, labels=list(labels))
    for label_values, value in samples:
        family.add_metric(list(label_values), value)
    return family


def _one(value) -> list:
    return [((), value)] if value is not None else []


def token_families(s: Snapshot) -> list:
    t = s.tokens
    return [
        _gauge("ingest_tokens_balance", "Keepa token balance, projected to the scrape (the ledger's view of the"
               " server's)", samples=_one(t and t.balance)),
        _gauge("ingest_tokens_refill_per_minute", "Tokens the plan refills per minute",
               samples=_one(t and t.refill_per_minute)),
        _gauge("ingest_tokens_reserved", "Tokens reserved by calls in flight", samples=_one(t and t.reserved)),
        _gauge("ingest_tokens_blocked_until_timestamp_seconds", "After a 429 nobody calls Keepa before this time"
               " (0: not blocked)", samples=_one(t and t.blocked_until)),
    ]


def keepa_families(s: Snapshot) -> list:
    return [
        _counter("ingest_keepa_requests", "Keepa requests by endpoint and HTTP status ('none': no response)",
                 ("endpoint", "code"), sorted(s.requests.items())),
        _counter("ingest_keepa_tokens_spent", "Tokens Keepa charged (tokensConsumed), by worker",
                 ("worker",), [((w,), n) for w, n in sorted(s.tokens_spent.items())]),
        _counter("ingest_keepa_429", "Keepa requests answered 429 (out of tokens)", samples=[((), s.rate_limited)]),
    ]


def lease_families(s: Snapshot) -> list:
    return [
        _gauge("ingest_lease_held", "1 while a live holder has the lease (not free, expired or dead)", ("lease",),
               [((x.name,), int(x.held)) for x in s.leases]),
        _gauge("ingest_lease_fence", "The lease's fencing token (+1 at each change of holder)", ("lease",),
               [((x.name,), x.fence) for x in s.leases]),
        _gauge("ingest_lease_heartbeat_age_seconds", "Seconds since the holder last renewed the lease (held leases)",
               ("lease",), [((x.name,), x.heartbeat_age_s) for x in s.leases if x.heartbeat_age_s is not None]),
    ]


def worker_families(s: Snapshot) -> list:
    states = []
    for w in s.workers:
        known = WORKER_STATES if w.state in WORKER_STATES else (*WORKER_STATES, w.state)
        states += [((w.worker, state), int(state == w.state)) for state in known]
    return [
        _gauge("ingest_worker_last_commit_timestamp_seconds", "When the worker last committed work", ("worker",),
               [((w.worker,), w.last_commit_at) for w in s.workers if w.last_commit_at is not None]),
        _gauge("ingest_worker_last_fetch_timestamp_seconds", "When a Keepa call of the worker last returned data",
               ("worker",), [((w.worker,), w.last_fetch_at) for w in s.workers if w.last_fetch_at is not None]),
        _gauge("ingest_worker_state", "1 for the state the worker last recorded, 0 for the others",
               ("worker", "state"), states),
    ]


def deal_families(s: Snapshot) -> list:
    return [
        _gauge("ingest_deals", "Stored deals by status", ("status",), [((k,), n) for k, n in sorted(s.deals.items())]),
        _counter("ingest_decisions", "Evaluation outcomes (and janitor removals) by outcome and reason",
                 ("outcome", "reason"), sorted(s.decisions.items())),
        _gauge("ingest_incomplete_backlog", "Incomplete deals whose refetch is due now",
               samples=[((), s.incomplete_backlog)]),
    ]


def health_families(s: Snapshot) -> list:
    return [
        _gauge("ingest_health_verdict", "The verdict of `ingest status`: 0 healthy, 1 degraded, 2 down",
               samples=[((), HEALTH_VERDICTS.index(s.verdict))]),
        _gauge("ingest_health_check", "Each check of `ingest status`: 0 ok, 1 warn, 2 fail", ("check",),
               [((name,), VERDICT_ORDER[v]) for name, v in s.checks.items()]),
    ]


def file_families(s: Snapshot) -> list:
    f = s.files
    return [
        _gauge("ingest_db_size_bytes", "Size of the database file", samples=_one(f and f.db_bytes)),
        _gauge("ingest_db_wal_size_bytes", "Size of its write-ahead log (-wal)", samples=_one(f and f.wal_bytes)),
        _gauge("ingest_disk_free_bytes", "Free bytes on the database's file system",
               samples=_one(f and f.disk_free_bytes)),
    ]


def other_feature_families(s: Snapshot) -> list:
    """The watchdog's actions, the alerts it sent, the last backup: samples once their tables exist."""
    return [
        _counter("ingest_watchdog_actions", "Actions the watchdog took, by action", ("action",),
                 [((a,), n) for a, n in sorted((s.watchdog_actions or {}).items())]),
        _counter("ingest_alerts_sent", "Alert deliveries by channel and result", ("channel", "result"),
                 sorted((s.alerts_sent or {}).items())),
        _gauge("ingest_last_backup_timestamp_seconds", "When the last good backup was taken (0: none yet)",
               samples=_one(s.last_backup_at)),
    ]


def families(s: Snapshot) -> list:
    return [*health_families(s), *token_families(s), *keepa_families(s), *lease_families(s), *worker_families(s),
            *deal_families(s), *file_families(s), *other_feature_families(s),
            _gauge("ingest_metrics_read_seconds", "Seconds this scrape spent reading the database",
                   samples=[((), s.read_seconds)])]


# ------------------------------------------------------------------ the collector


class IngestCollector:
    """A prometheus_client custom collector: one snapshot of the database per scrape."""

    def __init__(self, db_path: "Path | str", *, supervisor_conf: str | None = None, stall_minutes: float = 10.0,
                 config: dict | None = None, clock=time.time):
        self.store = open_store(db_path)
        self.supervisor_conf = supervisor_conf
        self.stall_minutes = stall_minutes
        self.config = config
        self.clock = clock
        self._problem: str | None = None

    def snapshot(self) -> Snapshot:
        from .supervisor import probe

        view = probe(self.supervisor_conf)
        snap = snapshot(self.store, self.clock(), supervisor=view.programs if view.running else None,
                        stall_minutes=self.stall_minutes, config=self.config)
        self._log_change(snap.problem)
        return snap

    def _log_change(self, problem: str | None) -> None:
        """One line when the database becomes unreadable (and why), one when it is readable again."""
        if problem != self._problem:
            if problem:
                log.warning("scrapes say down: %s", problem)
            else:
                log.info("database %s readable again", self.store.label)
            self._problem = problem

    def collect(self):
        yield from families(self.snapshot())


def registry_for(collector: IngestCollector):
    """A registry of its own holding only our collector (not the client's process/platform
    collectors: the series are the database's, whichever process serves them)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def exposition(collector: IngestCollector) -> bytes:
    """The Prometheus text format of one scrape."""
    from prometheus_client import generate_latest

    return generate_latest(registry_for(collector))


def write_textfile(path: Path, text: bytes) -> None:
    """Atomically (a temporary file in the same folder, fsync, rename) for node_exporter's textfile
    collector, which may read at any moment. Mode 0644: node_exporter runs as its own user and
    must read it; the text holds figures only, never the key."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o644)   # whatever the umask
        f.write(text)
        f.flush()
        os.fsync(fd)
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
