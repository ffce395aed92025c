"""Bounded growth: history tables pruned in small batches, and the freed pages given back.

What grows with time and how long it is kept ([retention], each validated; the call log's days
stay `[ledger] call_log_days`, its one setting):

  decisions       decisions_days (7): every evaluation; each ASIN's latest decision is kept always
  lease_events    lease_events_days (30): never younger than a day (the v009 trigger refuses it)
  fenced_commits  fenced_commits_days (7)
  keepa_calls     [ledger] call_log_days (30)
  backups, and the watch branch's alerts / watch_actions when they exist: history_days (90)

`prune()` runs in the upsert worker's maintenance step every `every_s`: for each table it picks
the ids of at most `batch_rows` expired rows with a read, then deletes exactly those in one
short write transaction (the worker's fenced commit), and again until none is left, so the
other worker's heartbeat and token reservations never wait behind one long delete. Then, on a
file with auto_vacuum = INCREMENTAL (every new file; `ingest db vacuum` converts an old one),
`PRAGMA incremental_vacuum` returns the free pages to the disk, `vacuum_pages` at a time.
"""

import logging
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, ContextManager

from .errors import StoreError
from .settings import parse, setting
from .backends import backend_of, transaction
from .store import disk_full, database_file, is_disk_full

log = logging.getLogger("ingest.retention")

DAY_S = 86400.0
# lease_events rows younger than a day by SQLite's own clock cannot be deleted (v009 trigger):
# never select them, whatever the worker's clock says (`d` is the table in batch_sql)
# rows younger than a day by the database's clock are refused by the append-only triggers
DAY_OLD_SQL = "d.at < {now} - 86400.0"  # {now}: the backend's now_sql
UNREFERENCED_MESSAGE_SQL = "NOT EXISTS (SELECT 1 FROM alerts a WHERE a.message_id = d.id)"


@dataclass(frozen=True)
class RetentionSettings:
    """[retention]: how long history is kept, and how pruning goes."""

    decisions_days: float = setting(7.0, "keep decisions this many days (each ASIN's latest always)", min=1, max=3650)
    lease_events_days: float = setting(30.0, "keep lease events this many days", min=1, max=3650)
    fenced_commits_days: float = setting(7.0, "keep the fenced-commit log this many days", min=1, max=3650)
    history_days: float = setting(90.0, "keep backup records (and alert history) this many days", min=1, max=3650)
    every_s: float = setting(3600.0, "prune this often (the upsert worker's maintenance step)", min=10, max=7 * 86400)
    batch_rows: int = setting(500, "rows deleted per write transaction (~3 ms of write lock each)", min=10,
                              max=100_000)
    vacuum_pages: int = setting(2000, "pages returned to the disk per incremental_vacuum step", min=16,
                                max=1_000_000)

    @classmethod
    def from_config(cls, config: dict) -> "RetentionSettings":
        return parse(cls, (config or {}).get("retention"), "retention")


@dataclass(frozen=True)
class Target:
    """One table pruned by age: rows with `column` < now - days go, except (keep_latest_by) the
    newest row of each value of that column, and rows failing `floor_sql` (SQL on alias `d`)."""

    table: str
    column: str
    days: float
    keep_latest_by: str | None = None
    floor_sql: str | None = None


WATCH_TABLES = ("alerts", "watch_actions")  # v012; alert_messages after alerts (they refer to it)


def targets(settings: RetentionSettings, call_log_days: float, existing: set[str], now_sql: str) -> list[Target]:
    """What is pruned, for the tables that exist in this database, in this order. `now_sql`:
    the database's own time in seconds (ingest.backends: `now_sql`)."""
    day_old = DAY_OLD_SQL.format(now=now_sql)
    wanted = [
        Target("decisions", "at", settings.decisions_days, keep_latest_by="asin"),
        Target("lease_events", "at", settings.lease_events_days, floor_sql=day_old),
        Target("fenced_commits", "at", settings.fenced_commits_days),
        Target("keepa_calls", "at", call_log_days),
        Target("backups", "at", settings.history_days),
        *(Target(t, "at", settings.history_days, floor_sql=day_old) for t in WATCH_TABLES),
        Target("alert_messages", "at", settings.history_days, floor_sql=f"{day_old} AND {UNREFERENCED_MESSAGE_SQL}"),
    ]
    return [t for t in wanted if t.table in existing]


def batch_sql(t: Target) -> str:
    """The ids of the next batch of expired rows: parameters (after id, cutoff, limit), oldest first."""
    where = ["d.id > ?", f"d.{t.column} < ?"]
    if t.keep_latest_by:
        k = t.keep_latest_by
        where.append(f"EXISTS (SELECT 1 FROM {t.table} n WHERE n.{k} = d.{k} AND n.id > d.id)")
    if t.floor_sql:
        where.append(t.floor_sql)
    return f"SELECT d.id FROM {t.table} d WHERE {' AND '.join(where)} ORDER BY d.id LIMIT ?"


@dataclass
class PruneReport:
    deleted: dict[str, int] = field(default_factory=dict)
    pages_freed: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


Commit = Callable[[str, str], ContextManager]  # (what, source) -> (write conn, context): a worker's fenced commit


def unfenced(conn) -> Commit:
    """A Commit that is a plain write transaction (the CLI and benches: no lease of their own)."""

    @contextmanager
    def commit(what: str, source: str):
        with transaction(conn):
            yield conn, None

    return commit


def prune_table(conn, commit: Commit, t: Target, now: float, batch_rows: int,
                stop: Callable[[], bool] = lambda: False) -> int:
    """Delete `t`'s expired rows, `batch_rows` per write transaction; the number deleted."""
    sql, cutoff, after, deleted = batch_sql(t), now - t.days * DAY_S, 0, 0
    while not stop():
        ids = [r[0] for r in conn.execute(sql, (after, cutoff, batch_rows))]
        if not ids:
            break
        with commit("retention", "retention") as (write, _ctx):
            write.execute(f"DELETE FROM {t.table} WHERE id IN ({','.join('?' * len(ids))})", ids)
        deleted += len(ids)
        after = ids[-1]
        if len(ids) < batch_rows:
            break
    return deleted


def incremental_vacuum(conn, pages: int, max_steps: int = 10_000) -> int:
    """Give free pages back to the disk, `pages` per step (each its own short transaction);
    nothing on a file without auto_vacuum = INCREMENTAL. The number of pages freed. SQLite's
    (ingest.backends.sqlite.reclaim_pages); PostgreSQL's autovacuum does this itself."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        return 0
    freed = 0
    for _ in range(max_steps):
        before = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if before == 0:
            break
        try:
            # executescript steps the pragma to its end (execute() frees one page per step)
            conn.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
        except sqlite3.Error as e:
            if is_disk_full(e, database_file(conn)):
                raise disk_full(database_file(conn)) from None
            raise StoreError(f"incremental_vacuum failed: {e}") from None
        after = conn.execute("PRAGMA freelist_count").fetchone()[0]
        freed += before - after
        if after >= before:
            break
    return freed


def prune(conn, commit: Commit, now: float, settings: RetentionSettings,
          call_log_days: float, stop: Callable[[], bool] = lambda: False) -> PruneReport:
    """One retention pass over every target, then incremental_vacuum if anything went."""
    started = time.monotonic()
    report = PruneReport()
    backend = backend_of(conn)
    for t in targets(settings, call_log_days, backend.tables(conn), backend.now_sql):
        n = prune_table(conn, commit, t, now, settings.batch_rows, stop)
        if n:
            report.deleted[t.table] = n
    if report.total and not stop():
        report.pages_freed = backend.reclaim_pages(conn, settings.vacuum_pages)
    report.seconds = time.monotonic() - started
    return report
