"""The SQLite backend: ingest/store.py as it is (one file, WAL, BEGIN IMMEDIATE), behind the
store boundary (ingest/backends/__init__.py). Nothing here changes how SQLite is used."""

import os
import shutil
import sqlite3
from pathlib import Path
from urllib.parse import quote

from ..errors import StoreError
from ..store import BEGIN_ATTEMPTS, FileIdentity, check_same_file, connect, database_file, migrate, open_db, retry_busy, schema_version, transaction

READ_ONLY_BUSY_TIMEOUT_S = 2.0
AUTO_VACUUM = {0: "none", 1: "full", 2: "incremental"}


class SQLiteBackend:
    name = "sqlite"

    def connect(self, target, *, busy_timeout_ms: int) -> sqlite3.Connection:
        return connect(target, busy_timeout_ms=busy_timeout_ms)

    def open(self, target, *, busy_timeout_ms: int) -> sqlite3.Connection:
        return open_db(target, busy_timeout_ms=busy_timeout_ms)

    def ledger_connection(self, target) -> sqlite3.Connection:
        """Migrated, busy_timeout = 0, so the ledger's own retries (ledger.SPIN) decide how long
        and how fairly to wait for the lock; and no automatic checkpoint: the Ledger checkpoints
        every ledger.CHECKPOINT_EVERY commits itself.

        Why: once the WAL passes wal_autocheckpoint pages, SQLite checkpoints after *every*
        commit until a writer manages to restart the WAL, which another process's BEGIN attempt
        (holding a read mark for a moment) keeps preventing under contention: each of those
        commits paid two fsyncs (0.3-8 ms). Measured with 2 processes: 40k reservations in
        2.8 s, 1.9 s without."""
        conn = open_db(target)
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        return conn

    def transaction(self, conn, *, attempts: int | None = None, spin=None):
        """BEGIN IMMEDIATE (ingest.store.transaction): the write lock of the whole file."""
        return transaction(conn, attempts=BEGIN_ATTEMPTS if attempts is None else attempts, spin=spin)

    def locked_row(self, conn, sql: str, params: tuple, key: str):
        # BEGIN IMMEDIATE already excludes every other writer: a plain read decides safely
        return conn.execute(sql, params).fetchone()

    def read(self, conn, spin, fn, *args):
        """On a busy_timeout = 0 connection a read may be refused for a moment: retried."""
        return retry_busy(spin, fn, *args)

    def checkpoint_every(self, conn, every: int) -> int | None:
        """`every` when the connection does not checkpoint automatically (ledger_connection),
        None when SQLite does."""
        autocheckpoint = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        return every if autocheckpoint <= 0 else None

    def checkpoint(self, conn) -> None:
        """A passive checkpoint: never waits, never fails for busy."""
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # ------------------------------------------------ what the admin commands read

    errors = (sqlite3.Error,)

    def read_only(self, target) -> sqlite3.Connection:
        """`mode=ro` (never created or migrated) and `PRAGMA query_only`. A missing file is a StoreError."""
        path = Path(target)
        if not path.is_file():
            raise StoreError(f"no database at {path}")
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=READ_ONLY_BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA query_only = 1")
        except sqlite3.Error as e:
            raise StoreError(f"database {path}: {e}") from None
        return conn

    def describe(self, target) -> str:
        return str(target)

    def tables(self, conn) -> set[str]:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def schema_version(self, conn) -> int:
        return schema_version(conn)

    def migrate(self, conn) -> list[int]:
        return migrate(conn)

    def disk_folder(self, target) -> Path:
        return Path(target).parent

    def storage(self, conn, target) -> "Storage":
        """The file (None when there is none), its -wal and -shm, its pages (with `conn`), and
        the disk it is on."""
        from . import Storage

        path = str(target)
        try:
            db_bytes = os.stat(path).st_size
        except OSError:
            db_bytes = None
        try:
            usage = shutil.disk_usage(self.disk_folder(target))
            free, total = usage.free, usage.total
        except OSError:
            free = total = None
        pages = {}
        if conn is not None:
            pages = dict(page_size=conn.execute("PRAGMA page_size").fetchone()[0],
                         free_pages=conn.execute("PRAGMA freelist_count").fetchone()[0],
                         auto_vacuum=AUTO_VACUUM.get(conn.execute("PRAGMA auto_vacuum").fetchone()[0], "?"))
        return Storage(db_bytes=db_bytes, wal_bytes=_size(path + "-wal"), shm_bytes=_size(path + "-shm"),
                       disk_folder=str(self.disk_folder(target)), disk_free=free, disk_total=total, **pages)

    def object_sizes(self, conn) -> list[tuple[str, str, str, int | None]]:
        """(name, 'table' | 'index', its table, bytes) of every table and index; bytes from
        `dbstat` (None where SQLite was built without it)."""
        objects = conn.execute("SELECT name, type, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"
                               " ORDER BY tbl_name, type DESC, name").fetchall()
        try:
            sizes = {r[0]: r[1] for r in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name")}
        except sqlite3.OperationalError:  # SQLite built without SQLITE_ENABLE_DBSTAT_VTAB
            sizes = None
        return [(name, kind, table, sizes.get(name, 0) if sizes is not None else None) for name, kind, table in objects]

    def integrity(self, conn, *, quick: bool) -> "Integrity":
        """PRAGMA integrity_check (quick_check, which skips the index checks, when `quick`)."""
        from . import Integrity

        pragma = "quick_check" if quick else "integrity_check"
        try:
            rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}(20)").fetchall()]
        except sqlite3.DatabaseError as e:
            rows = [str(e)]
        return Integrity(pragma, f"PRAGMA {pragma}", () if rows == ["ok"] else tuple(rows),
                         remedy="stop the workers (scripts/stop), copy the files aside, then recover:"
                                " sqlite3 DB .recover | sqlite3 NEW.db; see docs/diagnostics.md")

    def database_file(self, conn) -> str:
        """The main database file of `conn` ('' for an in-memory database, or unknown)."""
        return database_file(conn) or ""

    def exists(self, target) -> bool:
        return Path(target).exists()

    def write_lock_file(self, target) -> Path:
        """The file whose POSIX locks show who holds the write lock (ingest.watch): the -shm."""
        return Path(f"{target}-shm")

    def identity(self, target) -> "FileIdentity | None":
        return FileIdentity.of(target)

    def check_identity(self, target, opened: "FileIdentity") -> None:
        check_same_file(target, opened)

    now_sql = "(julianday('now') - 2440587.5) * 86400.0"  # the database's wall clock, in seconds

    def reclaim_pages(self, conn, pages: int) -> int:
        """Free pages back to the disk after a prune (PRAGMA incremental_vacuum)."""
        from ..retention import incremental_vacuum

        return incremental_vacuum(conn, pages)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


SQLITE = SQLiteBackend()


# ---------------------------------------------------------------- the catalogue (ingest db copy)


def table_columns(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """Every table of the file (not SQLite's own) with its columns in order, in the order the
    schema created them."""
    names = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid")]
    return {name: [c[1] for c in conn.execute("SELECT * FROM pragma_table_info(?)", (name,))] for name in names}


def references(conn: sqlite3.Connection, table: str) -> set[str]:
    """The tables `table`'s foreign keys name."""
    return {r[0] for r in conn.execute('SELECT "table" FROM pragma_foreign_key_list(?)', (table,))}
