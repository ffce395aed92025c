"""The PostgreSQL backend (psycopg 3, the `postgres` install extra) behind the store boundary
(ingest/backends/__init__.py, docs/postgres.md).

- Connections are autocommit; a write transaction is an explicit BEGIN ... COMMIT at READ
  COMMITTED. Writers are serialised per row, not per database: `locked_row` reads with
  SELECT ... FOR UPDATE (and takes a transaction-scoped advisory lock on the row's key first
  when the row does not exist yet, so its creation is serialised as well).
- SQL arrives with `?` placeholders, as SQLite takes them, and is translated once to `%s`.
- Rows can be read by column name and by position, as sqlite3.Row can.
- A lock waited for longer than the connection's lock timeout (what SQLite calls busy_timeout)
  fails the statement; it and every lost connection become one-line StoreErrors. A connection
  the server dropped is opened again at the start of the next transaction.
- Migrations: ingest/schema/postgres/vNNN_name.sql, with the version numbers of the SQLite files
  they port; each applied version is recorded in `ingest_schema`.
"""

import re
from importlib import resources
import psycopg
from psycopg.pq import TransactionStatus

from ..errors import DiskFull, StoreError

LEDGER_LOCK_TIMEOUT_MS = 10_000  # as long as the ledger's SQLite spin budget (store.Spin.budget_s)
MIGRATION_LOCK = 0x1A6E57  # advisory lock key: one migrating process at a time
CONNECT_TIMEOUT_S = 10
# A client stopped inside a transaction (SIGSTOP, a frozen VM) would hold its row locks for as
# long as its connection lives: the server ends such a session after this, so waiters (lock
# timeout 5 s by default) get the row. No transaction of ours pauses between statements (no CPU
# work inside a write transaction), so only a stuck client ever reaches it.
IDLE_IN_TRANSACTION_MS = 3_000


class Row:
    """One result row: by column name (row["fence"]) or position (row[0]); dict(row) works."""

    __slots__ = ("_values", "_index")

    def __init__(self, values: tuple, index: dict):
        self._values, self._index = values, index

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._index)

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other) -> bool:
        return tuple(self._values) == tuple(other)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values))})"


def _rows(cursor):
    description = cursor.description or ()
    index = {column.name: i for i, column in enumerate(description)}
    return lambda values: Row(values, index)


_TRANSLATED: dict[str, str] = {}


def translate(sql: str) -> str:
    """`?` placeholders to psycopg's `%s` (a literal % doubled). The SQL must hold no `?` in a
    string literal (ours never does)."""
    out = _TRANSLATED.get(sql)
    if out is None:
        out = _TRANSLATED[sql] = sql.replace("%", "%%").replace("?", "%s")
    return out


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")  # :name, not a ::cast
_TRANSLATED_NAMED: dict[str, str] = {}


def translate_named(sql: str) -> str:
    """`:name` placeholders (with a dict of parameters, as sqlite3 takes them) to psycopg's
    `%(name)s`; a `::type` cast is left alone. No `:name` may appear in a string literal."""
    out = _TRANSLATED_NAMED.get(sql)
    if out is None:
        out = _TRANSLATED_NAMED[sql] = _NAMED.sub(r"%(\1)s", sql.replace("%", "%%"))
    return out


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _redacted_target(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "the PostgreSQL database"
    return f"PostgreSQL database {info.get('dbname', '?')!r}"


class PgConnection:
    """A psycopg connection with the surface the lease and ledger code use (the same as
    sqlite3's): execute(sql, params) -> cursor, in_transaction, close()."""

    def __init__(self, url: str, lock_timeout_ms: int):
        self.url = url
        self.lock_timeout_ms = lock_timeout_ms
        self.backend = POSTGRES
        self.raw = self._dial()

    def _dial(self) -> psycopg.Connection:
        try:
            raw = psycopg.connect(self.url, autocommit=True, row_factory=_rows, connect_timeout=CONNECT_TIMEOUT_S)
            # 0 would mean "wait forever" to PostgreSQL, "never wait" to SQLite: wait 1 ms at least
            raw.execute(f"SET lock_timeout = {max(int(self.lock_timeout_ms), 1)}")
            raw.execute(f"SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_MS}")
        except psycopg.Error as e:
            raise StoreError(f"cannot open {_redacted_target(self.url)}: {_one_line(e)}") from None
        return raw

    @property
    def lost(self) -> bool:
        """Closed, or found broken by the last statement (server restart, network)."""
        return self.raw.closed or getattr(self.raw, "broken", False)

    def reopen(self) -> None:
        """Open the connection again; only between transactions (one in progress is gone with
        the old connection, rolled back by the server)."""
        self.raw.close()
        self.raw = self._dial()

    def execute(self, sql: str, params: "tuple | list | dict" = ()):
        if isinstance(params, dict):
            return self.raw.execute(translate_named(sql), params)
        if params:
            return self.raw.execute(translate(sql), params)
        return self.raw.execute(sql)

    def executemany(self, sql: str, seq) -> None:
        """The statement once per parameter set (one pipeline of round trips, as sqlite3's)."""
        rows = list(seq)
        if not rows:
            return
        text = translate_named(sql) if isinstance(rows[0], dict) else translate(sql)
        with self.raw.cursor() as cursor:
            cursor.executemany(text, rows)

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()

    def __repr__(self) -> str:
        return f"<PgConnection {_redacted_target(self.url)}>"


DISK_FULL = "53100"  # SQLSTATE disk_full: the server could not extend a file


def _is_disk_full(e: BaseException) -> bool:
    return getattr(e, "sqlstate", None) == DISK_FULL


def _failed(conn: PgConnection, e: BaseException) -> StoreError:
    """The error a failed, rolled-back transaction raises: DiskFull when the server's disk is
    full (workers wait for space and retry, as on SQLite), else a one-line StoreError."""
    if _is_disk_full(e):
        return DiskFull(f"disk full on the server of {_redacted_target(conn.url)}: {_one_line(e)}"
                        " (the transaction was rolled back)")
    return StoreError(f"write transaction failed and was rolled back: {_one_line(e)}")


class _Transaction:
    """BEGIN ... COMMIT, ROLLBACK on any exception; errors of the server or the connection are
    one-line StoreErrors (the rollback lost nothing)."""

    __slots__ = ("conn",)

    def __init__(self, conn: PgConnection):
        self.conn = conn

    def __enter__(self) -> PgConnection:
        conn = self.conn
        try:
            if conn.lost:
                conn.reopen()
            try:
                conn.raw.execute("BEGIN")
            except psycopg.OperationalError:
                if not conn.lost:
                    raise
                conn.reopen()  # dropped since its last use (nothing was done yet): once more
                conn.raw.execute("BEGIN")
        except psycopg.Error as e:
            raise StoreError(f"cannot start a write transaction: {_one_line(e)}") from None
        return conn

    def __exit__(self, kind, error, tb) -> bool:
        raw = self.conn.raw
        if kind is None:
            try:
                raw.execute("COMMIT")
                return False
            except psycopg.Error as e:
                self._rollback()
                raise _failed(self.conn, e) from None
        lost = self.conn.lost
        self._rollback()
        if issubclass(kind, psycopg.Error) and _is_disk_full(error):
            raise _failed(self.conn, error) from None
        if issubclass(kind, psycopg.OperationalError) or (lost and issubclass(kind, psycopg.Error)):
            # a lock timeout, a lost or ended session, a full disk on the server: one clear line
            raise StoreError(f"write transaction failed and was rolled back: {_one_line(error)}") from None
        return False

    def _rollback(self) -> None:
        if self.conn.lost:
            return  # the server rolled it back with the connection
        try:
            self.conn.raw.execute("ROLLBACK")
        except psycopg.Error:
            pass


class PostgresBackend:
    name = "postgresql"

    def connect(self, target: str, *, busy_timeout_ms: int) -> PgConnection:
        return PgConnection(target, busy_timeout_ms)

    def open(self, target: str, *, busy_timeout_ms: int) -> PgConnection:
        conn = self.connect(target, busy_timeout_ms=busy_timeout_ms)
        try:
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def ledger_connection(self, target: str) -> PgConnection:
        """Row locks are granted in order of arrival: the ledger waits on them, no spinning."""
        return self.open(target, busy_timeout_ms=LEDGER_LOCK_TIMEOUT_MS)

    def transaction(self, conn: PgConnection, *, attempts: int | None = None, spin=None) -> _Transaction:
        return _Transaction(conn)

    def locked_row(self, conn: PgConnection, sql: str, params: tuple, key: str):
        locked = sql + " FOR UPDATE"
        row = conn.execute(locked, params).fetchone()
        if row is None:  # nothing to lock yet: serialise the row's first writers on its key
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (key,))
            row = conn.execute(locked, params).fetchone()
        return row

    def read(self, conn: PgConnection, spin, fn, *args):
        return fn(*args)

    def checkpoint_every(self, conn, every: int) -> int | None:
        return None  # the server checkpoints

    def checkpoint(self, conn) -> None:
        pass

    # ------------------------------------------------ what the admin commands read

    errors = (psycopg.Error,)

    def read_only(self, target: str) -> "ReadOnlyPgConnection":
        """Every transaction READ ONLY (the server refuses a write), never migrated."""
        return ReadOnlyPgConnection(target, READ_ONLY_LOCK_TIMEOUT_MS)

    def describe(self, target: str) -> str:
        return _redacted_target(target)

    def tables(self, conn: PgConnection) -> set[str]:
        return {r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables"
                                           " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'")}

    def schema_version(self, conn: PgConnection) -> int:
        return schema_version(conn)

    def migrate(self, conn: PgConnection) -> list[int]:
        return migrate(conn)

    def disk_folder(self, target: str) -> None:
        return None  # the server's disk: not visible from here

    def storage(self, conn: PgConnection, target: str) -> "Storage":
        """The database's size on the server (pg_database_size); its disk and WAL are the server's."""
        from . import Storage

        if conn is None:
            return Storage(db_bytes=None)
        size, block = conn.execute("SELECT pg_database_size(current_database()),"
                                   " current_setting('block_size')::int").fetchone()
        return Storage(db_bytes=size, page_size=block)

    def object_sizes(self, conn: PgConnection) -> list[tuple[str, str, str, int | None]]:
        """(name, 'table' | 'index', its table, bytes) of the schema's tables (pg_table_size:
        with TOAST) and indexes (pg_relation_size)."""
        rows = conn.execute(
            "SELECT c.relname, CASE c.relkind WHEN 'r' THEN 'table' ELSE 'index' END, coalesce(t.relname, c.relname),"
            " CASE c.relkind WHEN 'r' THEN pg_table_size(c.oid) ELSE pg_relation_size(c.oid) END"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_index i ON i.indexrelid = c.oid LEFT JOIN pg_class t ON t.oid = i.indrelid"
            " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'i') ORDER BY 3, 2 DESC, 1").fetchall()
        return [(r[0], r[1], r[2], int(r[3])) for r in rows]

    def integrity(self, conn: PgConnection, *, quick: bool) -> "Integrity":
        """amcheck's bt_index_check of every B-tree index of the schema (and, unless `quick`,
        that every table row is in each index), where an administrator installed the extension
        (CREATE EXTENSION amcheck): ingest never creates one. Tables themselves are the server's
        data checksums' to guard."""
        from . import Integrity

        check = "bt_index_check" if quick else "bt_index_check(heapallindexed)"
        label = f"amcheck {check}"
        if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'").fetchall():
            return Integrity(check, label, skipped="not run: the amcheck extension is not installed in this database"
                                                   " (an administrator's CREATE EXTENSION amcheck)")
        problems = []
        for (index,) in conn.execute(BTREE_INDEXES_SQL).fetchall():
            try:
                conn.execute("SELECT bt_index_check(?::regclass, ?)", (index, not quick))
            except psycopg.Error as e:
                problems.append(f"{index}: {_one_line(e)}")
        return Integrity(check, label, tuple(problems),
                         remedy="REINDEX INDEX <name> rebuilds a damaged index from its table (workers may keep"
                                " running); a damaged table is the server administrator's: see docs/postgres.md")

    def database_file(self, conn) -> None:
        return None  # no local file: the server's

    def exists(self, target: str) -> bool:
        return True  # connecting tells

    def write_lock_file(self, target: str) -> None:
        return None  # no file lock: a transaction stopped midway is ended by the server (IDLE_IN_TRANSACTION_MS)

    def identity(self, target: str) -> None:
        return None  # no file to be deleted or replaced under us: the server keeps the database

    def check_identity(self, target: str, opened) -> None:
        pass

    now_sql = "unix_now()"  # v004: the server's wall clock at the statement, in seconds

    def reclaim_pages(self, conn, pages: int) -> int:
        return 0  # autovacuum's job on the server


BTREE_INDEXES_SQL = ("SELECT c.oid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                     " JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_am a ON a.oid = c.relam"
                     " WHERE n.nspname = current_schema() AND a.amname = 'btree' ORDER BY 1")

READ_ONLY_LOCK_TIMEOUT_MS = 2_000
READ_ONLY_STATEMENT_TIMEOUT_MS = 30_000  # an admin query (ingest sql, a scrape) never runs longer


class ReadOnlyPgConnection(PgConnection):
    """A connection whose every transaction is READ ONLY (`default_transaction_read_only`: the
    server refuses any write) at REPEATABLE READ (one snapshot per transaction), and whose
    statements end after READ_ONLY_STATEMENT_TIMEOUT_MS."""

    statement_timeout_ms = READ_ONLY_STATEMENT_TIMEOUT_MS

    def _dial(self) -> psycopg.Connection:
        raw = super()._dial()
        try:
            raw.execute("SET default_transaction_read_only = on")
            # a BEGIN sees one moment, as SQLite's read transaction does (a scrape's figures agree)
            raw.execute("SET default_transaction_isolation = 'repeatable read'")
            raw.execute(f"SET statement_timeout = {int(self.statement_timeout_ms)}")
        except psycopg.Error as e:
            raw.close()
            raise StoreError(f"cannot open {_redacted_target(self.url)}: {_one_line(e)}") from None
        return raw


POSTGRES = PostgresBackend()


# ---------------------------------------------------------------- migrations
#
# The versions are those of ingest/schema/vNNN_name.sql (SQLite); ingest/schema/postgres/ holds
# the ones ported so far, under the same version and name. Each applied version is a row of
# ingest_schema, so a version ported later (below the newest applied) is still applied.


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every PostgreSQL migration shipped, in order."""
    found = []
    for entry in (resources.files("ingest.schema") / "postgres").iterdir():
        name = entry.name
        if name.startswith("v") and name.endswith(".sql"):
            found.append((int(name[1:4]), name[5:-4], entry.read_text()))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise StoreError(f"PostgreSQL migrations must have distinct versions: {versions}")
    return found


_SCHEMA_TABLE = ("CREATE TABLE IF NOT EXISTS ingest_schema (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                 " applied_at DOUBLE PRECISION NOT NULL DEFAULT extract(epoch FROM clock_timestamp()))")


def applied_versions(conn: PgConnection) -> list[int]:
    exists = conn.execute("SELECT to_regclass('ingest_schema') IS NOT NULL").fetchone()[0]
    if not exists:
        return []
    return [r[0] for r in conn.execute("SELECT version FROM ingest_schema ORDER BY version").fetchall()]


def schema_version(conn: PgConnection) -> int:
    """The newest version applied (0 for an empty database)."""
    return max(applied_versions(conn), default=0)


def migrate(conn: PgConnection) -> list[int]:
    """Apply the migrations not applied yet, each in its own transaction with its record; safe to
    race (an advisory lock admits one migrating process at a time). Returns the versions applied."""
    known = migrations()
    newest = known[-1][0] if known else 0
    applied = []
    try:
        with _Transaction(conn):
            conn.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            conn.execute(_SCHEMA_TABLE)
        current = schema_version(conn)
    except psycopg.Error as e:
        raise StoreError(f"cannot read the schema version: {_one_line(e)}") from None
    if current > newest:
        raise StoreError(f"database schema is version {current}, newer than this ingest knows ({newest}):"
                         " upgrade ingest")
    for version, name, sql in known:
        try:
            with _Transaction(conn):
                conn.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                if version in applied_versions(conn):
                    continue
                conn.execute(sql)
                conn.execute("INSERT INTO ingest_schema (version, name) VALUES (?, ?)", (version, name))
        except psycopg.Error as e:
            raise StoreError(f"migration v{version:03d} ({name}) failed: {_one_line(e)}") from None
        applied.append(version)
    return applied


# ---------------------------------------------------------------- bulk copy (ingest db copy)


def table_columns(conn: PgConnection) -> dict[str, list[str]]:
    """Every table of the current schema with its columns in order (views are not tables)."""
    rows = conn.execute(
        "SELECT c.table_name, c.column_name FROM information_schema.columns c"
        " JOIN information_schema.tables t ON t.table_schema = c.table_schema AND t.table_name = c.table_name"
        " WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE'"
        " ORDER BY c.table_name, c.ordinal_position").fetchall()
    out: dict[str, list[str]] = {}
    for table, column in rows:
        out.setdefault(table, []).append(column)
    return out


def identity_columns(conn: PgConnection) -> dict[str, str]:
    """table -> its identity column (GENERATED ... AS IDENTITY), in the current schema."""
    rows = conn.execute("SELECT table_name, column_name FROM information_schema.columns"
                        " WHERE table_schema = current_schema() AND is_identity = 'YES'").fetchall()
    return {table: column for table, column in rows}


def _ident(name: str) -> str:
    """A quoted identifier."""
    return '"' + name.replace('"', '""') + '"'


def copy_rows(conn: PgConnection, table: str, columns: list[str], rows, progress=None) -> int:
    """COPY `rows` (tuples in the order of `columns`) into `table`, inside the caller's
    transaction. Identity columns take the values given (COPY writes them as INSERT ...
    OVERRIDING SYSTEM VALUE would); row triggers fire. `progress(n)` is called every 5,000 rows.
    A row the server refuses is a one-line StoreError naming the table (the caller's
    transaction then rolls back)."""
    statement = f"COPY {_ident(table)} ({', '.join(_ident(c) for c in columns)}) FROM STDIN"
    n = 0
    try:
        with conn.raw.cursor().copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
                n += 1
                if progress is not None and n % 5000 == 0:
                    progress(n)
    except psycopg.Error as e:
        raise StoreError(f"copying {table} failed: {_one_line(e)}") from None
    return n


def advance_identity(conn: PgConnection, table: str, column: str) -> int | None:
    """Set the identity sequence of `table`.`column` past the largest value present, so the next
    insert takes max + 1 (the ids were copied as they were). Returns that max (None: no rows)."""
    largest = conn.execute(f"SELECT max({_ident(column)}) FROM {_ident(table)}").fetchone()[0]
    if largest is not None:
        conn.execute("SELECT setval(pg_get_serial_sequence(?, ?), ?)", (_ident(table), column, largest))
    return largest
