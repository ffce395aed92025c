"""`ingest db stats`: what the file holds and where its growth goes.

Rows and bytes per table and index (SQLite's `dbstat`; PostgreSQL's pg_table_size and
pg_relation_size), the WAL, free pages inside the file, free disk, the growth of the last day
and the days until the disk is full at that rate. On PostgreSQL the file facts are the server's:
the database's size is pg_database_size, its WAL, free pages and disk are not visible from here
(None).

Growth is net: rows added in the last day (by each table's time column) minus the rows retention
will prune in the next day (those within a day of its cutoff) and, for deals, the janitor's
removals of the last day, each weighed by its table's bytes per row (indexes included; a deal
counts its stored product history too).
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .backends import backend_of
from .retention import DAY_S, RetentionSettings, targets

# the column that says when a row was added
ADDED_AT = {"decisions": "at", "keepa_calls": "at", "fenced_commits": "at", "lease_events": "at",
            "deals": "first_seen", "backups": "at", "alerts": "at", "watch_actions": "at"}
COUNTED_WITH = {"product_history": "deals"}  # a table whose bytes belong to another's rows


@dataclass(frozen=True)
class ObjectSize:
    name: str
    kind: str         # table | index
    table: str        # the table an index belongs to (itself for a table)
    rows: int | None  # tables only
    bytes: int | None  # None without dbstat


@dataclass(frozen=True)
class DbStats:
    path: str                # the file, or `PostgreSQL database 'name'`
    page_size: int
    file_bytes: int
    wal_bytes: int | None    # None: not visible from here (PostgreSQL), as the free pages and the disk
    free_pages: int | None
    auto_vacuum: str | None
    disk_free: int | None
    disk_total: int | None
    objects: list[ObjectSize]
    growth_bytes_per_day: float | None
    growth_rows: dict[str, int] = field(default_factory=dict)
    days_until_full: float | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        out["free_bytes_in_file"] = None if self.free_pages is None else self.free_pages * self.page_size
        return out


def object_sizes(conn) -> list[ObjectSize]:
    out = []
    for name, kind, table, size in backend_of(conn).object_sizes(conn):
        rows = conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] if kind == "table" else None
        out.append(ObjectSize(name, kind, table, rows, size))
    return out


def bytes_per_row(objects: list[ObjectSize]) -> dict[str, float]:
    """Table -> bytes per row, its indexes (and COUNTED_WITH tables) included."""
    total: dict[str, int] = {}
    rows: dict[str, int] = {}
    for o in objects:
        if o.bytes is None:
            return {}
        owner = COUNTED_WITH.get(o.table, o.table)
        total[owner] = total.get(owner, 0) + o.bytes
        if o.kind == "table" and o.table == owner:
            rows[owner] = o.rows or 0
    return {t: total[t] / rows[t] for t in total if rows.get(t)}


def net_growth(added: dict[str, int], leaving: dict[str, int], per_row: dict[str, float]) -> float:
    """Bytes per day: rows added minus rows leaving, weighed by bytes per row (pure)."""
    return sum((added.get(t, 0) - leaving.get(t, 0)) * per_row.get(t, 0.0) for t in set(added) | set(leaving))


def days_until_full(free: int | None, growth: float | None) -> float | None:
    if free is None or growth is None or growth <= 0:
        return None
    return free / growth


def _rows_between(conn, table: str, column: str, start: float, end: float) -> int:
    return conn.execute(f"SELECT count(*) FROM {table} WHERE {column} >= ? AND {column} < ?", (start, end)).fetchone()[0]


def growth_rows(conn, now: float, retention: RetentionSettings,
                call_log_days: float) -> tuple[dict[str, int], dict[str, int]]:
    """(rows added in the last day, rows leaving in the next day) per table."""
    backend = backend_of(conn)
    existing = backend.tables(conn)
    added = {t: _rows_between(conn, t, c, now - DAY_S, now + DAY_S) for t, c in ADDED_AT.items() if t in existing}
    leaving = {}
    for t in targets(retention, call_log_days, existing, backend.now_sql):
        cutoff = now - t.days * DAY_S
        leaving[t.table] = _rows_between(conn, t.table, t.column, cutoff, cutoff + DAY_S)
    if "decisions" in existing:
        leaving["deals"] = conn.execute("SELECT count(*) FROM decisions WHERE outcome = 'removed' AND at >= ?",
                                        (now - DAY_S,)).fetchone()[0]
    return added, leaving


def collect(conn, db_path: "Path | str", now: float, retention: RetentionSettings,
            call_log_days: float) -> DbStats:
    backend = backend_of(conn)
    storage = backend.storage(conn, db_path)
    objects = object_sizes(conn)
    free, total = storage.disk_free, storage.disk_total
    per_row = bytes_per_row(objects)
    added, leaving = growth_rows(conn, now, retention, call_log_days)
    growth = net_growth(added, leaving, per_row) if per_row else None
    net = {t: added.get(t, 0) - leaving.get(t, 0) for t in sorted(set(added) | set(leaving))}
    return DbStats(backend.describe(db_path), storage.page_size, storage.db_bytes or 0, storage.wal_bytes,
                   storage.free_pages, storage.auto_vacuum, free, total, objects,
                   growth, net, days_until_full(free, growth))
