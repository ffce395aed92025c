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
