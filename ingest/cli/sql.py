"""`ingest sql "SELECT ..."`: one read-only query against the database, printed as a table
(default), CSV or JSON.

SQLite: read-only three times over: the file is opened with SQLite's `mode=ro` URI (it is never
created or migrated), `PRAGMA query_only` is on, and an authorizer allows only reads (SELECT,
reading columns, functions, recursive CTEs, and the PRAGMAs listed below), so a write, ATTACH
or VACUUM INTO is refused before it runs, with one line and exit 1. A missing database is one
line and exit 4.

PostgreSQL: the server enforces it: the connection's every transaction is READ ONLY
(`default_transaction_read_only`), the query runs inside `BEGIN READ ONLY` that is rolled back,
never committed, under a statement_timeout; it is sent as one prepared statement, which the
server refuses to hold two commands. A write is one line and exit 1; an unreachable server exit 4.
"""

import base64
import csv
import json
import os
import re
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import click

from ..errors import IngestError, StoreError
from ..logs import redact

ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
# PRAGMAs that only read; those in PRAGMAS_WITH_ARGUMENT take a table or index name
READ_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
                "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check", "user_version",
                "schema_version", "application_id", "journal_mode", "page_count", "page_size", "freelist_count",
                "encoding", "compile_options", "database_list", "collation_list", "function_list", "module_list",
                "pragma_list", "data_version", "query_only"}
PRAGMAS_WITH_ARGUMENT = {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
                         "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check"}
# the authorizer's action codes (sqlite3 has other constants with the same values)
ACTION_NAMES = {getattr(sqlite3, f"SQLITE_{n}"): n for n in (
    "CREATE_INDEX", "CREATE_TABLE", "CREATE_TEMP_INDEX", "CREATE_TEMP_TABLE", "CREATE_TEMP_TRIGGER",
    "CREATE_TEMP_VIEW", "CREATE_TRIGGER", "CREATE_VIEW", "DELETE", "DROP_INDEX", "DROP_TABLE", "DROP_TEMP_INDEX",
    "DROP_TEMP_TABLE", "DROP_TEMP_TRIGGER", "DROP_TEMP_VIEW", "DROP_TRIGGER", "DROP_VIEW", "INSERT", "PRAGMA",
    "READ", "SELECT", "TRANSACTION", "UPDATE", "ATTACH", "DETACH", "ALTER_TABLE", "REINDEX", "ANALYZE",
    "CREATE_VTABLE", "DROP_VTABLE", "FUNCTION", "SAVEPOINT", "RECURSIVE")}
BUSY_TIMEOUT_S = 5.0


class QueryRefused(IngestError):
    """The statement would write (or attach, or vacuum into a file): nothing was run."""


class QueryFailed(IngestError):
    """SQLite rejected the statement (syntax, unknown table, two statements...)."""


@dataclass
class QueryResult:
    columns: list[str]
    rows: "sqlite3.Cursor"   # iterated once, so big results stream for --csv and --json


# ---------------------------------------------------------------- opening and running

def open_read_only(path: Path) -> tuple[sqlite3.Connection, list[str]]:
    """The database opened read-only, with the authorizer on. Returns it and the list in which
    the authorizer records what it refused. A missing file is a StoreError (and is not created)."""
    if not path.is_file():
        raise StoreError(f"no database at {path} (ingest sql opens an existing database read-only)")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only = 1")
    except sqlite3.Error as e:
        raise StoreError(_describe_open_error(e, path)) from None
    refused: list[str] = []
    conn.set_authorizer(_authorizer(refused))
    return conn, refused


def _authorizer(refused: list[str]):
    def authorize(action: int, arg1, arg2, _db, _source) -> int:
        if action in ALLOWED_ACTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and _read_pragma(arg1, arg2):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master":
            # SQLite asks this when a statement first uses an eponymous virtual table such as
            # pragma_table_info(); writing the schema needs PRAGMA writable_schema (refused)
            return sqlite3.SQLITE_OK
        refused.append(_action_name(action, arg1, arg2))
        return sqlite3.SQLITE_DENY
    return authorize


def _read_pragma(name: str | None, value: str | None) -> bool:
    name = (name or "").lower()
    return name in READ_PRAGMAS and (value is None or name in PRAGMAS_WITH_ARGUMENT)


def _action_name(action: int, arg1, arg2) -> str:
    what = ACTION_NAMES.get(action, f"action {action}")
    target = " ".join(str(a) for a in (arg1, arg2) if a)
    return f"{what} {target}".strip()


def _describe_open_error(e: sqlite3.Error, path: Path) -> str:
    text = str(e)
    if "not a database" in text:
        return f"{path} is not an SQLite database"
    if "unable to open" in text:
        return f"cannot open database {path}"
    return f"database {path}: {text}"


def run_query(conn: sqlite3.Connection, refused: list[str], sql: str, params: dict[str, str],
              path: Path) -> QueryResult:
    try:
        cursor = conn.execute(sql, params)
    except sqlite3.Error as e:
        raise _query_error(e, refused, path) from None
    if cursor.description is None:
        raise QueryRefused("refused: ingest sql runs a query that returns rows (BEGIN, REINDEX... do nothing here)")
    return QueryResult(_unique([d[0] for d in cursor.description]), cursor)


def _query_error(e: sqlite3.Error, refused: list[str], path: Path) -> IngestError:
    text = str(e)
    if refused or "readonly" in text or "read-only" in text:
        named = [r for r in refused if "sqlite_" not in r] or refused  # the statement's target first
        what = f" ({named[0]})" if named else ""
        return QueryRefused(f"refused: ingest sql is read-only{what}; nothing was changed")
    if "not a database" in text or "unable to open" in text or "disk I/O" in text:
        return StoreError(_describe_open_error(e, path))
    return QueryFailed(f"SQL: {text}")


def _unique(columns: list[str]) -> list[str]:
    """Duplicate column names (SELECT a.id, b.id) get _2, _3 (for JSON keys)."""
    seen: dict[str, int] = {}
    out = []
    for c in columns:
        seen[c] = seen.get(c, 0) + 1
        out.append(c if seen[c] == 1 else f"{c}_{seen[c]}")
    return out


# ---------------------------------------------------------------- output

def text_cell(value):
    """A cell for the table and CSV: blobs (compressed histories) as their size, text redacted."""
    if isinstance(value, bytes):
        return f"<blob {len(value)} bytes>"
    return redact(value) if isinstance(value, str) else value


def json_cell(value):
    if isinstance(value, bytes):
        return {"$base64": True, "encoded": base64.b64encode(value).decode()}
    return redact(value) if isinstance(value, str) else value


def _fetch(result: QueryResult, refused: list[str], path: Path):
    """The rows, turning an error met while stepping (e.g. a corrupt page) into one line."""
    try:
        yield from result.rows
    except sqlite3.Error as e:
        raise _query_error(e, refused, path) from None


def print_table(result: QueryResult, rows) -> None:
    from . import echo_table

    echo_table(result.columns, [[text_cell(v) for v in row] for row in rows], missing="NULL")


def print_csv(result: QueryResult, rows) -> None:
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(result.columns)
    for row in rows:
        out.writerow([text_cell(v) for v in row])


def print_json(result: QueryResult, rows) -> None:
    """A JSON array of objects, one per row, streamed."""
    sys.stdout.write("[")
    count = 0
    for row in rows:
        obj = {c: json_cell(v) for c, v in zip(result.columns, row)}
        sys.stdout.write(("," if count else "") + "\n  " + json.dumps(obj, default=str))
        count += 1
    sys.stdout.write("\n]\n" if count else "]\n")


PRINTERS = {"table": print_table, "csv": print_csv, "json": print_json}


def _params(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return {name.lstrip(":"): value for name, value in pairs}


class SqliteSession:
    """The SQLite path: `mode=ro`, query_only and the authorizer (open_read_only)."""

    def __init__(self, path):
        self.path = Path(path)
        self.conn, self.refused = open_read_only(self.path)

    def run(self, sql: str, params: dict[str, str]) -> QueryResult:
        return run_query(self.conn, self.refused, sql, params, self.path)

    def rows(self, result: QueryResult):
        return _fetch(result, self.refused, self.path)

    def close(self) -> None:
        self.conn.close()


NAMED_PARAMETER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")  # :name, not the ::int of a cast


class PgSession:
    """The PostgreSQL path: a read-only connection (ingest.backends.postgres.ReadOnlyPgConnection),
    one prepared statement inside BEGIN READ ONLY, rolled back at the end."""

    def __init__(self, url: str):
        from ..backends import open_store

        self.conn = open_store(url).read_only()  # unreachable: StoreError, one line without the password
        self.conn.raw.execute("BEGIN READ ONLY")

    def run(self, sql: str, params: dict[str, str]) -> QueryResult:
        import psycopg

        if params:  # psycopg's %(name)s for SQLite's :name (a literal % doubled)
            sql = NAMED_PARAMETER.sub(r"%(\1)s", sql.replace("%", "%%"))
        try:
            cursor = self.conn.raw.execute(sql, params or None, prepare=True)
        except psycopg.Error as e:
            raise self._error(e) from None
        if cursor.description is None:
            raise QueryRefused("refused: ingest sql runs a query that returns rows (SET, BEGIN... do nothing here)")
        return QueryResult(_unique([d.name for d in cursor.description]), cursor)

    def rows(self, result: QueryResult):
        import psycopg

        try:
            yield from result.rows
        except psycopg.Error as e:
            raise self._error(e) from None

    def _error(self, e) -> IngestError:
        import psycopg

        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, psycopg.errors.ReadOnlySqlTransaction):
            return QueryRefused(f"refused: ingest sql is read-only ({text}); nothing was changed")
        if "multiple commands" in text:
            return QueryRefused("refused: ingest sql runs one statement; nothing was run")
        if isinstance(e, psycopg.errors.QueryCanceled):
            return QueryFailed(f"SQL: {text} (ingest sql stops a query after"
                               f" {self.conn.statement_timeout_ms / 1000:g} s)")
        if isinstance(e, psycopg.OperationalError) and self.conn.lost:
            return StoreError(f"the connection to the database was lost: {text}")
        return QueryFailed(f"SQL: {text}")

    def close(self) -> None:
        self.conn.close()  # the transaction is rolled back with the session: nothing is ever committed


SESSIONS = {"sqlite": SqliteSession, "postgresql": PgSession}  # by backend name: the authorizer is SQLite's own


def open_session(target) -> "SqliteSession | PgSession":
    from ..backends import open_store

    return SESSIONS[open_store(target).backend.name](target)


@click.command("sql")
@click.argument("query")
@click.option("--table", "fmt", flag_value="table", default=True, help="An aligned table (the default).")
@click.option("--csv", "fmt", flag_value="csv", help="CSV with a header row.")
@click.option("--json", "fmt", flag_value="json", help="A JSON array of objects.")
@click.option("-p", "--param", "params", type=(str, str), multiple=True, metavar="NAME VALUE",
              help="A value for :NAME in the query (repeatable).")
@click.pass_obj
def sql_command(app, query, fmt, params):
    """One read-only SQL query, printed as a table, CSV or JSON.

    QUERY is one SELECT (WITH ... SELECT) or a PRAGMA that only reads. Writes are refused before they run (exit 1); the database is opened read-only and never
    created (a missing file: exit 4). Blobs print as their size (as base64 in --json).
    On PostgreSQL the server refuses writes (a READ ONLY transaction, rolled back)."""
    session = open_session(app.db_path)
    try:
        result = session.run(query, _params(params))
        PRINTERS[fmt](result, session.rows(result))
        sys.stdout.flush()
    except BrokenPipeError:
        # `ingest sql ... --csv | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        session.close()


commands = [sql_command]
