"""`ingest db copy --to postgresql://...`: an existing SQLite database into an empty PostgreSQL
one (docs/postgres.md, "Moving up").

The rules:
- the source is read in one snapshot, and refused while any of its leases is held by a process
  that may be alive (the workers must be stopped: `ingest.backup.live_holders`, as restore and
  vacuum use);
- the target is migrated first and must hold no row in any table (ingest_schema, PostgreSQL's
  record of its migrations, aside); its tables are locked for the copy;
- every table is copied in one transaction on the target, parents before the tables whose
  foreign keys name them, with the ids as they were (identity sequences then set past them);
  the row counts are compared inside that transaction: a failure or a mismatch leaves the
  target as empty as it was;
- the totals kept by AFTER INSERT triggers (v008: `keepa_call_totals` from `keepa_calls`,
  `decision_totals` from `decisions`) are copied after the rows that feed them and replace what
  those triggers added, so they equal the source's (which may count calls since pruned);
- leases arrive free (no holder), with their fences: a fence never decreases, so the workers
  that start on PostgreSQL continue the epochs.

Planning is pure (`copy_order`, `freed`); the rest reads and writes the two stores.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends import open_store, transaction
from .backends import sqlite as sqlite_backend
from .backup import live_holders
from .errors import StoreError
from .lease_table import HOLDER_COLUMNS
from .store import schema_version

TARGET_OWN = frozenset({"ingest_schema"})  # PostgreSQL's record of its migrations
# table -> the table whose AFTER INSERT trigger adds to it (ingest/schema/*/v008_metrics_totals.sql)
TOTALS_KEPT_BY_TRIGGERS = {"keepa_call_totals": "keepa_calls", "decision_totals": "decisions"}
LEASES = "leases"
PROGRESS_EVERY_S = 1.0


class CopyRefused(StoreError):
    """The copy was not started: the source is in use, or the target is not empty."""


@dataclass(frozen=True)
class TableCopy:
    name: str
    source_rows: int
    target_rows: int
    seconds: float

    def to_json(self) -> dict:
        return {"table": self.name, "source_rows": self.source_rows, "target_rows": self.target_rows,
                "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class CopyResult:
    source: str
    target: str  # redacted: "PostgreSQL database 'name'"
    schema_version: int
    seconds: float
    tables: list[TableCopy] = field(default_factory=list)
    freed_leases: list[str] = field(default_factory=list)  # holders of dead processes, cleared

    @property
    def rows(self) -> int:
        return sum(t.target_rows for t in self.tables)

    def to_json(self) -> dict:
        return {"source": self.source, "target": self.target, "schema_version": self.schema_version,
                "seconds": round(self.seconds, 3), "rows": self.rows, "counts_match": True,
                "tables": [t.to_json() for t in self.tables], "freed_leases": self.freed_leases}


# ---------------------------------------------------------------- planning (pure)


def copy_order(tables: list[str], needs: dict[str, set[str]]) -> list[str]:
    """`tables` (in the schema's order) reordered so that every table comes after the tables it
    `needs` (its foreign keys' parents; the rows a trigger-kept total counts), otherwise in the
    given order. A cycle is a StoreError (none in the schema)."""
    order: list[str] = []
    placed: set[str] = set()
    pending = list(tables)
    while pending:
        ready = next((t for t in pending if needs.get(t, set()) & set(tables) <= placed), None)
        if ready is None:
            raise StoreError(f"cannot order the copy: the tables {', '.join(pending)} depend on each other")
        order.append(ready)
        placed.add(ready)
        pending.remove(ready)
    return order


def freed(columns: list[str], row: tuple) -> tuple:
    """A lease row with its holder cleared (free), everything else as it was (the fence too)."""
    return tuple(None if c in HOLDER_COLUMNS else v for c, v in zip(columns, row))


def schema_mismatch(source: dict[str, list[str]], target: dict[str, list[str]]) -> str | None:
    """Why the two schemas cannot be copied table to table, or None: the same tables (the
    target's own aside) with the same columns in the same order."""
    target = {t: c for t, c in target.items() if t not in TARGET_OWN}
    missing = sorted(set(source) - set(target))
    extra = sorted(set(target) - set(source))
    if missing or extra:
        return f"tables differ (only in the source: {missing or 'none'}; only in the target: {extra or 'none'})"
    for table, columns in source.items():
        if target[table] != columns:
            return f"columns of {table} differ: {columns} in the source, {target[table]} in the target"
    return None


# ---------------------------------------------------------------- the stores


def _count(conn, table: str) -> int:
    return conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]


def _refuse_if_held(src) -> None:
    holders = live_holders(src)
    if holders:
        raise CopyRefused(f"db copy refused: {'; '.join(holders)}; stop the workers first (scripts/stop)"
                          " (a holder on another host that is gone: `ingest leases release NAME --force`)")


def _refuse_if_not_empty(dst, tables: list[str], target: str) -> None:
    for table in tables:
        n = _count(dst, table)
        if n:
            raise CopyRefused(f"db copy refused: {target} is not empty ({table} has {n} rows);"
                              " copy into a new database (createdb)")


def _dead_holders(src) -> list[str]:
    return [f"{r['name']} (was {r['holder']}, fence {r['fence']})"
            for r in src.execute(f"SELECT name, holder_host || ':' || holder_pid AS holder, fence FROM {LEASES}"
                                 " WHERE holder_nonce IS NOT NULL ORDER BY name").fetchall()]


def _rows(src, table: str, columns: list[str]):
    cursor = src.execute(f'SELECT {", ".join(chr(34) + c + chr(34) for c in columns)} FROM "{table}"')
    if table == LEASES:
        return (freed(columns, tuple(r)) for r in cursor)
    return (tuple(r) for r in cursor)


def _copy_table(src, dst, pg, table: str, columns: list[str], total: int, progress) -> float:
    started = time.monotonic()
    last = [started]

    def report(n: int) -> None:
        now = time.monotonic()
        if progress is not None and now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            progress(table, n, total, now - started)

    if table in TOTALS_KEPT_BY_TRIGGERS:  # what the triggers counted from the copied rows
        dst.execute(f'DELETE FROM "{table}"')
    pg.copy_rows(dst, table, columns, _rows(src, table, columns), report)
    seconds = time.monotonic() - started
    if progress is not None and seconds >= PROGRESS_EVERY_S:
        progress(table, total, total, seconds)
    return seconds


def copy_database(source: "str | Path", target_url: str, *, progress=None, clock=time.monotonic) -> CopyResult:
    """Copy the SQLite database at `source` (migrated first, as every command opens it) into the
    empty PostgreSQL database `target_url` (migrated first). `progress(table, done, total,
    seconds)` is called about once a second while a big table is copied. CopyRefused when the
    source is in use or the target holds rows; StoreError when the copy fails (the target is
    left as it was)."""
    from .backends import postgres as pg  # psycopg is an install extra

    started = clock()
    label = pg._redacted_target(target_url)
    src = open_store(Path(source)).open()
    try:
        dst = open_store(target_url).open()
        try:
            # The copy is one long transaction with client work between statements (reading
            # the source): not a stuck client, whatever the server's limit for those says.
            dst.execute("SET idle_in_transaction_session_timeout = 0")
            src.execute("BEGIN")  # one snapshot of the source for the checks, the counts and the rows
            try:
                return _copy(src, dst, pg, str(source), label, started, progress, clock)
            finally:
                src.execute("ROLLBACK")
        finally:
            dst.close()
    finally:
        src.close()


def _copy(src, dst, pg, source: str, label: str, started: float, progress, clock) -> CopyResult:
    source_tables = sqlite_backend.table_columns(src)
    _refuse_if_held(src)
    problem = schema_mismatch(source_tables, pg.table_columns(dst))
    if problem:
        raise StoreError(f"cannot copy into {label}: {problem}")
    needs = {t: sqlite_backend.references(src, t) for t in source_tables}
    for total, feeder in TOTALS_KEPT_BY_TRIGGERS.items():
        needs.setdefault(total, set()).add(feeder)
    order = copy_order(list(source_tables), needs)
    counts = {t: _count(src, t) for t in order}
    dead = _dead_holders(src)
    identities = pg.identity_columns(dst)
    copied = []
    with transaction(dst):
        dst.execute(f"LOCK TABLE {', '.join(chr(34) + t + chr(34) for t in order)} IN EXCLUSIVE MODE")
        _refuse_if_not_empty(dst, order, label)
        for table in order:
            copied.append((table, _copy_table(src, dst, pg, table, source_tables[table], counts[table], progress)))
        result = [TableCopy(t, counts[t], _count(dst, t), s) for t, s in copied]
        wrong = [f"{t.name} {t.source_rows} in the source, {t.target_rows} copied" for t in result
                 if t.source_rows != t.target_rows]
        if wrong:
            raise StoreError(f"copy into {label} rolled back: counts differ: {'; '.join(wrong)}")
        # last: setval is not undone by a rollback, so nothing that can fail comes after it
        for table, column in identities.items():
            pg.advance_identity(dst, table, column)
    return CopyResult(source, label, schema_version(src), clock() - started, result, dead)
