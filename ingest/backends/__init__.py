"""The store boundary: everything the lease and ledger code does that differs between SQLite and
PostgreSQL, in one place (docs/postgres.md).

`open_store(target)` takes what `--db` takes: a file path (SQLite, the default) or a
`postgresql://` URL, and returns a `Store` that opens connections. A connection's backend
(`backend_of(conn)`) then provides, for the code above it:

- `transaction(conn, ...)`: a write transaction. SQLite: BEGIN IMMEDIATE, one writer at a time.
  PostgreSQL: BEGIN (READ COMMITTED); what serialises writers there is the row lock below.
- `locked_row(conn, sql, params, key)`: read the one row a read-then-write transaction decides
  on. SQLite: a plain read (BEGIN IMMEDIATE already excludes every other writer). PostgreSQL:
  SELECT ... FOR UPDATE, so two transactions can never both decide from the same row; when the
  row does not exist yet (nothing to lock), a transaction-scoped advisory lock on `key` first,
  so two first writers of one row are serialised too.
- `read(conn, spin, fn, *args)`: a read outside a transaction (SQLite retries SQLITE_BUSY).
- `checkpoint_every(conn)` / `checkpoint(conn)`: the ledger's own WAL checkpoints (SQLite only).

SQL is written once, with `?` placeholders (the PostgreSQL connection translates them) and
`INSERT ... ON CONFLICT (key) DO UPDATE` upserts, which both dialects read the same way.
"""

import os
import sqlite3
from dataclasses import dataclass
from typing import Protocol

from ..store import BUSY_TIMEOUT_MS, PG_URL_SCHEMES


class Backend(Protocol):
    name: str

    def connect(self, target, *, busy_timeout_ms: int): ...
    def open(self, target, *, busy_timeout_ms: int): ...
    def ledger_connection(self, target): ...
    def transaction(self, conn, *, attempts: int | None = None, spin=None): ...
    def locked_row(self, conn, sql: str, params: tuple, key: str): ...
    def read(self, conn, spin, fn, *args): ...
    def checkpoint_every(self, conn, every: int) -> int | None: ...
    def checkpoint(self, conn) -> None: ...
    # what the admin commands read (ingest status, db stats, metrics, diagnose, sql, watch)
    errors: tuple
    def read_only(self, target): ...
    def describe(self, target) -> str: ...
    def tables(self, conn) -> set[str]: ...
    def schema_version(self, conn) -> int: ...
    def migrate(self, conn) -> list[int]: ...
    def storage(self, conn, target) -> "Storage": ...
    def object_sizes(self, conn) -> "list[tuple[str, str, str, int | None]]": ...
    def disk_folder(self, target) -> "os.PathLike | None": ...
    def integrity(self, conn, *, quick: bool) -> "Integrity": ...
    def database_file(self, conn) -> str | None: ...
    def exists(self, target) -> bool: ...
    def write_lock_file(self, target) -> "os.PathLike | None": ...
    def identity(self, target): ...
    now_sql: str
    def reclaim_pages(self, conn, pages: int) -> int: ...
    def check_identity(self, target, opened) -> None: ...


@dataclass(frozen=True)
class Storage:
    """How big the database is and how much room it has, as far as this host can see: SQLite's
    file, its -wal and -shm, and the disk they are on; PostgreSQL's `pg_database_size` only (the
    server's disk is not visible from here: None)."""

    db_bytes: int | None
    wal_bytes: int | None = None
    shm_bytes: int | None = None
    page_size: int | None = None
    free_pages: int | None = None
    auto_vacuum: str | None = None
    disk_folder: str | None = None       # where free space is measured (None: not visible from here)
    disk_free: int | None = None
    disk_total: int | None = None

    @property
    def total_bytes(self) -> int:
        """The database with its logs (what a copy of it needs)."""
        return sum(n or 0 for n in (self.db_bytes, self.wal_bytes, self.shm_bytes))


@dataclass(frozen=True)
class Integrity:
    """An integrity check's result: `problems` empty when it found none; `skipped` says why the
    check was not run (None when it was)."""

    check: str                       # e.g. 'integrity_check'
    label: str                       # how a summary names it: 'PRAGMA integrity_check'
    problems: tuple[str, ...] = ()
    skipped: str | None = None
    remedy: str = ""                 # what an operator does about problems


def is_url(target) -> bool:
    """A PostgreSQL URL (rather than an SQLite file path)?"""
    return isinstance(target, str) and target.startswith(PG_URL_SCHEMES)


@dataclass(frozen=True)
class Store:
    """Where the state lives: an SQLite file or a PostgreSQL database, and its backend."""

    target: "str | os.PathLike"
    backend: Backend

    def connect(self, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS):
        """A connection, schema untouched. `busy_timeout_ms`: how long a write waits for a lock."""
        return self.backend.connect(self.target, busy_timeout_ms=busy_timeout_ms)

    def open(self, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS):
        """Connect and bring the schema up to date: what every process does at start."""
        return self.backend.open(self.target, busy_timeout_ms=busy_timeout_ms)

    def ledger_connection(self):
        """A migrated connection tuned for a Ledger of its own (ingest.ledger.ledger_connection)."""
        return self.backend.ledger_connection(self.target)

    def __str__(self) -> str:
        return str(self.target)

    def identity(self):
        """What tells later whether `target` still names the database opened now (SQLite: the
        file's device and inode, None when there is no file; PostgreSQL: None, the server's)."""
        return self.backend.identity(self.target)

    def check_identity(self, opened) -> None:
        """DatabaseReplaced (ingest.store) unless `target` still names the database `opened`
        (from `identity()`) identifies; nothing to check when that is None."""
        if opened is not None:
            self.backend.check_identity(self.target, opened)

    def read_only(self):
        """A connection that cannot write and never migrates (SQLite: `mode=ro` and query_only;
        PostgreSQL: default_transaction_read_only). A missing database is a StoreError."""
        return self.backend.read_only(self.target)

    @property
    def label(self) -> str:
        """How output names the database: its path, or `PostgreSQL database 'name'` (never the
        URL: it may hold a password)."""
        return self.backend.describe(self.target)


def open_store(target: "str | os.PathLike | Store") -> Store:
    """The store for `target`: a `postgresql://` URL, or an SQLite file path."""
    if isinstance(target, Store):
        return target
    if is_url(target):
        from .postgres import POSTGRES  # psycopg is an install extra: imported only when used

        return Store(target, POSTGRES)
    from .sqlite import SQLITE

    return Store(target, SQLITE)


def backend_of(conn) -> Backend:
    """The backend a connection belongs to: sqlite3 connections are SQLite's; a PostgreSQL
    connection (ingest.backends.postgres.PgConnection) names its own."""
    if isinstance(conn, sqlite3.Connection):
        from .sqlite import SQLITE

        return SQLITE
    return conn.backend


def transaction(conn, *, attempts: int | None = None, spin=None):
    """A write transaction on `conn`, on its backend (see the module doc): COMMIT at the end,
    ROLLBACK on any exception. `attempts` / `spin`: how SQLite retries a busy BEGIN
    (ingest.store.transaction); PostgreSQL waits on row locks instead, up to the connection's
    lock timeout."""
    return backend_of(conn).transaction(conn, attempts=attempts, spin=spin)


def locked_row(conn, sql: str, params: tuple, key: str):
    """The row that `sql` (a single-row SELECT) finds, locked for the rest of the caller's write
    transaction on backends that lock rows; `key` names it (e.g. 'leases:backfill')."""
    return backend_of(conn).locked_row(conn, sql, params, key)
