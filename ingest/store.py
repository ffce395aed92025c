"""The state store: one SQLite file, its connections, migrations and write transactions.

Every read-then-write goes through `transaction()`: BEGIN IMMEDIATE takes the write lock up
front, so two processes can never both read a value and then both write from it (the deferred
"SELECT then UPDATE" pattern that over-admits; see tests/test_store.py).
"""

import errno
import os
import random
import shutil
import sqlite3
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

from .errors import DiskFull, StoreError

DEFAULT_DB_PATH = "var/ingest.db"
BUSY_TIMEOUT_MS = 5_000
BEGIN_ATTEMPTS = 6
BEGIN_BACKOFF_S = 0.05
PG_URL_SCHEMES = ("postgresql://", "postgres://")  # --db names a PostgreSQL database (ingest.backends)


def resolve_db_path(explicit: str | None = None, config: dict | None = None) -> "Path | str":
    """--db, else env INGEST_DB, else [store] db in the config, else var/ingest.db: an SQLite
    file's Path, or a `postgresql://` URL as given (ingest.backends.open_store takes either;
    never print the URL: it may hold a password)."""
    chosen = (
        explicit
        or os.environ.get("INGEST_DB")
        or ((config or {}).get("store") or {}).get("db")
        or DEFAULT_DB_PATH
    )
    if chosen.startswith(PG_URL_SCHEMES):
        return chosen
    return Path(chosen)



def require_database(target: "str | os.PathLike") -> "Path | str":
    """The database a read-only command reads: a path naming no file is a StoreError, and
    nothing (no folder, no file) is created. A PostgreSQL URL is returned as it is: connecting
    tells whether the database is there."""
    if isinstance(target, str) and target.startswith(PG_URL_SCHEMES):
        return target
    path = Path(target)
    if not path.is_file():
        what = "a folder, not a database" if path.is_dir() else "missing"
        raise StoreError(f"no database at {path} ({what}; nothing created): check --db, INGEST_DB or [store] db")
    return path


class DatabaseReplaced(StoreError):
    """The path no longer names the file this process opened (deleted, or replaced by `mv`)."""


@dataclass(frozen=True)
class FileIdentity:
    """Which file a path names: device and inode (a delete-and-recreate or `mv` changes them)."""

    device: int
    inode: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> "FileIdentity | None":
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino)


def check_same_file(path: str | os.PathLike, opened: FileIdentity) -> None:
    """DatabaseReplaced unless `path` still names the file `opened` identifies."""
    now = FileIdentity.of(path)
    if now is None:
        raise DatabaseReplaced(f"database {path} was deleted under this process: stopping without writing")
    if now != opened:
        raise DatabaseReplaced(f"database {path} was replaced under this process (another file is at the path now):"
                               " stopping without writing")


def _ensure_private_file(path: Path) -> None:
    """Create the folder (0700) and the file (0600) before SQLite does, so neither is ever
    world-readable. SQLite gives the -wal and -shm files the database file's permissions."""
    folder = path.parent
    if not folder.exists():
        try:
            folder.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass  # another process or thread created it between our check and mkdir
        except OSError as e:
            raise StoreError(f"cannot create database folder {folder}: {e.strerror}") from None
    if not path.exists():
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreError(f"cannot create database {path}: {e.strerror}") from None


def _describe(e: sqlite3.Error, path: Path) -> str:
    text = str(e)
    if "not a database" in text:
        return f"{path} is not an SQLite database"
    if "readonly" in text or "read-only" in text:
        return f"database {path} is read-only"
    if "unable to open" in text:
        return f"cannot open database {path}"
    return f"database {path}: {text}"


def connect(path: str | os.PathLike, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """Open (creating owner-only) the database in WAL mode, autocommit, foreign keys on.

    Autocommit (isolation_level=None) means Python never opens a transaction behind our back:
    every write transaction is an explicit `transaction()`.
    """
    path = Path(path)
    new_file = not path.exists() or path.stat().st_size == 0
    _ensure_private_file(path)
    try:
        conn = sqlite3.connect(
            str(path), timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # a new file returns freed pages to the disk (retention prunes, then incremental_vacuum);
        # only possible before the first table exists: `ingest db vacuum` converts an old file.
        # Not asked of an existing file: there it changes nothing and, on a full disk, fails
        if new_file:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")

        def set_journal_mode():
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]

        # SQLITE_BUSY can come back at once, past the busy timeout, while another process closes
        # the last connection (checkpoint, WAL reset) or recovers the WAL: wait and try again.
        try:
            mode = set_journal_mode()
        except sqlite3.OperationalError as e:
            if not is_busy(e):
                raise
            mode = OPEN_BACKOFF.after_busy(set_journal_mode, f"open {path}")
        if mode.lower() != "wal":
            raise StoreError(f"database {path} cannot switch to WAL mode (got {mode})")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.Error as e:
        if is_disk_full(e, path):
            raise disk_full(path) from None
        raise StoreError(_describe(e, path)) from None
    return conn


LOW_SPACE_BYTES = 1 * 2**20  # an I/O error with less than this free on the database's filesystem: full


def is_disk_full(e: BaseException, path: str | os.PathLike | None = None) -> bool:
    """SQLITE_FULL, or an I/O error (ENOSPC growing the -shm or a log) while the filesystem of
    `path` is (nearly) full."""
    if not isinstance(e, sqlite3.Error):
        return isinstance(e, OSError) and e.errno == errno.ENOSPC
    code = getattr(e, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(e):
        return True
    if path is not None and (code is not None and code & 0xFF == sqlite3.SQLITE_IOERR or "disk I/O error" in str(e)):
        free = free_bytes(path)
        return free is not None and free < LOW_SPACE_BYTES
    return False


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem holding `path` (its folder when it does not exist yet)."""
    path = Path(path)
    try:
        return shutil.disk_usage(path if path.is_dir() else path.parent).free
    except OSError:
        return None


def size_text(n: int | None) -> str:
    """'512 B', '12.0 KiB', '3.4 MiB', '1.20 GiB' ('unknown' for None)."""
    if n is None:
        return "unknown"
    if n < 1024:
        return f"{n} B"
    if n < 2**20:
        return f"{n / 1024:.1f} KiB"
    if n < 2**30:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**30:.2f} GiB"


def database_file(conn: sqlite3.Connection) -> str | None:
    """The main database file of `conn` ('' for an in-memory database)."""
    try:
        for row in conn.execute("PRAGMA database_list"):
            if row[1] == "main":
                return row[2]
    except sqlite3.Error:
        return None
    return None


def disk_full(path: str | os.PathLike | None) -> DiskFull:
    """The one line a full disk gives: which file, how much is free."""
    free = free_bytes(path) if path else None
    return DiskFull(f"disk full: cannot write {path or 'the database'} ({size_text(free)} free);"
                    " the transaction was rolled back, nothing was stored")


def is_busy(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and (
        getattr(e, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
        or "database is locked" in str(e)
    )


@dataclass(frozen=True)
class Backoff:
    """The default way to wait for the write lock: SQLite's own busy_timeout first, then up to
    `attempts` tries in all, with jittered exponential sleeps from `first_s` (capped at 2 s)."""

    attempts: int = BEGIN_ATTEMPTS
    first_s: float = BEGIN_BACKOFF_S

    def after_busy(self, attempt, what: str):
        """`attempt()` failed with SQLITE_BUSY once: sleep and try again, `attempts` in all."""
        delay = self.first_s
        for _ in range(self.attempts - 1):
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
            try:
                return attempt()
            except sqlite3.OperationalError as e:
                if not is_busy(e):
                    raise
        raise StoreError(f"database stayed locked through {self.attempts} attempts to {what}")


OPEN_BACKOFF = Backoff(attempts=10, first_s=0.02)  # ~5 s in all


@dataclass(frozen=True)
class Spin:
    """Retry BEGIN IMMEDIATE ourselves: short jittered sleeps growing from `first_s` to `max_s`,
    for at most `budget_s` in all. Meant for a connection with busy_timeout = 0: SQLite's own
    busy handler sleeps 1, 2, 5 ... 100 ms and is unfair (a waiter can starve for seconds while
    another process re-takes the lock between its naps); sleeps of tens to hundreds of µs hand the
    lock over within a few of the holder's transactions."""

    first_s: float = 20e-6
    max_s: float = 500e-6
    growth: float = 1.5
    budget_s: float = 10.0

    def after_busy(self, attempt, what: str):
        """`attempt()` failed with SQLITE_BUSY once: sleep and try again, for `budget_s` at most."""
        delay, deadline = self.first_s, time.monotonic() + self.budget_s
        while True:
            if time.monotonic() >= deadline:
                raise StoreError(f"database stayed locked for {self.budget_s:g} s while trying to {what}")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * self.growth, self.max_s)
            try:
                return attempt()
            except sqlite3.OperationalError as e:
                if not is_busy(e):
                    raise


def retry_busy(spin: Spin, fn, *args):
    """`fn(*args)` (a read outside a transaction) retried on SQLITE_BUSY, for busy_timeout = 0
    connections: in WAL mode a read is refused only briefly (recovery, a closing last connection)."""
    try:
        return fn(*args)
    except sqlite3.OperationalError as e:
        if not is_busy(e):
            raise
        return spin.after_busy(lambda: fn(*args), "read")


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any exception. A class, not a generator: it is the
    ledger's hot path (microseconds count there)."""

    __slots__ = ("conn", "waiting")

    def __init__(self, conn: sqlite3.Connection, waiting: "Backoff | Spin"):
        self.conn, self.waiting = conn, waiting

    def _begin(self):
        return self.conn.execute("BEGIN IMMEDIATE")

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if not is_busy(e):
                raise StoreError(f"cannot start a write transaction: {e}") from None
            try:
                self.waiting.after_busy(self._begin, "start a write transaction")
            except sqlite3.OperationalError as e2:
                raise StoreError(f"cannot start a write transaction: {e2}") from None
        return self.conn

    def __exit__(self, kind, error, tb) -> bool:
        conn = self.conn
        if kind is None:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if is_disk_full(e, database_file(conn)):
                    raise disk_full(database_file(conn)) from None
                raise
            return False
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if issubclass(kind, sqlite3.Error) and is_disk_full(error, database_file(conn)):
            raise disk_full(database_file(conn)) from None
        if issubclass(kind, sqlite3.OperationalError):
            # read-only file, disk full, I/O error: one clear line; the rollback lost nothing
            raise StoreError(f"write transaction failed and was rolled back: {error}") from None
        return False


def transaction(
    conn: sqlite3.Connection, *, attempts: int = BEGIN_ATTEMPTS, backoff_s: float = BEGIN_BACKOFF_S,
    spin: Spin | None = None,
) -> _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception).

    SQLITE_BUSY at BEGIN (after SQLite's own busy_timeout) is retried with jittered exponential
    backoff, `attempts` times in all, then raised as a StoreError. Once BEGIN IMMEDIATE returns we
    hold the write lock, so in WAL mode nothing later in the transaction waits for it.
    With `spin`, BEGIN is retried by `spin` instead (short sleeps, bounded in time; see Spin).
    """
    return _Transaction(conn, spin if spin is not None else Backoff(attempts, backoff_s))


# ---------------------------------------------------------------- migrations
#
# Migrations are the files ingest/schema/vNNN_<name>.sql, applied in order. The schema version
# is PRAGMA user_version: migration N leaves it at N, in the same transaction as its DDL, so a
# crash mid-migration leaves the previous version intact. A file whose version is newer than the
# newest migration we know was written by a newer ingest: we refuse to touch it. Versions only
# need to increase (a number may be skipped); a new migration is always numbered above the newest.


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration shipped in the package, in order."""
    found = []
    for entry in resources.files("ingest.schema").iterdir():
        name = entry.name
        if name.startswith("v") and name.endswith(".sql"):
            version = int(name[1:4])
            found.append((version, name[5:-4], entry.read_text()))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise StoreError(f"schema migrations must have distinct versions from 1 up: {versions}")
    return found


def latest_version() -> int:
    known = migrations()
    return known[-1][0] if known else 0


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _statements(sql: str) -> Iterator[str]:
    buffer = ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                yield buffer
            buffer = ""
    if buffer.strip() and not all(l.strip().startswith("--") or not l.strip() for l in buffer.splitlines()):
        raise StoreError("a schema migration ends with an incomplete statement")


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Apply pending migrations; returns the versions applied. Safe to race: each step re-reads
    the version inside its own BEGIN IMMEDIATE."""
    applied = []
    known = migrations()
    try:
        current = schema_version(conn)
    except sqlite3.Error as e:
        raise StoreError(f"cannot read the schema version: {e}") from None
    newest = known[-1][0] if known else 0
    if current > newest:
        raise StoreError(
            f"database schema is version {current}, newer than this ingest knows ({newest}): upgrade ingest"
        )
    for version, name, sql in known:
        try:
            with transaction(conn):
                if schema_version(conn) >= version:
                    continue
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")
            applied.append(version)
        except sqlite3.Error as e:
            raise StoreError(f"migration v{version:03d} ({name}) failed: {e}") from None
    return applied


def open_db(path: str | os.PathLike, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """Connect and bring the schema up to date. What every process does at start."""
    conn = connect(path, busy_timeout_ms=busy_timeout_ms)
    try:
        migrate(conn)
    except StoreError:
        conn.close()
        raise
    except sqlite3.Error as e:
        conn.close()
        raise StoreError(_describe(e, Path(path))) from None
    return conn
