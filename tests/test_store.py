import os
import sqlite3
import stat
import subprocess
import threading

import pytest
from click.testing import CliRunner

from ingest.cli import main
from ingest.errors import EXIT_DATABASE, StoreError
from ingest.store import connect, latest_version, migrate, migrations, open_db, schema_version, transaction

from .conftest import INGEST


def test_migrate_empty_file_reaches_latest_version(db_path):
    conn = connect(db_path)
    assert schema_version(conn) == 0
    assert migrate(conn) == [v for v, _, _ in migrations()]
    assert schema_version(conn) == latest_version()
    assert migrate(conn) == []  # idempotent
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_file_and_folder_are_owner_only(db_path):
    open_db(db_path)
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(db_path.parent).st_mode) == 0o700


def test_newer_schema_is_refused_with_one_line(db_path):
    conn = open_db(db_path)
    conn.execute(f"PRAGMA user_version = {latest_version() + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this ingest knows"):
        open_db(db_path)
    result = subprocess.run([INGEST, "--db", str(db_path), "db", "migrate"], capture_output=True, text=True)
    assert result.returncode == EXIT_DATABASE
    assert result.stderr.count("\n") == 1 and "newer" in result.stderr


def test_not_sqlite_file_is_a_clear_error_and_untouched(db_path):
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not a database" * 100)
    before = db_path.read_bytes()
    result = CliRunner().invoke(main, ["--db", str(db_path), "db", "migrate"])
    assert result.exit_code == EXIT_DATABASE
    assert "is not an SQLite database" in result.output
    assert db_path.read_bytes() == before


def test_uncreatable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["--db", str(blocker / "sub" / "x.db"), "db", "migrate"])
    assert result.exit_code == EXIT_DATABASE
    assert "cannot create database folder" in result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_file_is_a_clear_error(db_path):
    open_db(db_path).close()
    os.chmod(db_path, 0o400)
    result = CliRunner().invoke(main, ["--db", str(db_path), "db", "migrate"])
    assert result.exit_code == EXIT_DATABASE


def test_read_only_file_via_immutable_uri_is_refused(db_path, monkeypatch):
    # Root ignores chmod, so model read-only with SQLite's own read-only open.
    open_db(db_path).close()
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    with pytest.raises(StoreError, match="readonly|read-only"):
        with transaction(conn):
            conn.execute("CREATE TABLE t (x)")


def test_db_path_resolution_order(tmp_path, monkeypatch):
    from ingest.store import resolve_db_path

    assert str(resolve_db_path()) == "var/ingest.db"
    assert str(resolve_db_path(config={"store": {"db": "c.db"}})) == "c.db"
    monkeypatch.setenv("INGEST_DB", "e.db")
    assert str(resolve_db_path(config={"store": {"db": "c.db"}})) == "e.db"
    assert str(resolve_db_path("o.db", {"store": {"db": "c.db"}})) == "o.db"


def test_transaction_rolls_back_on_error(db_path):
    conn = open_db(db_path)
    conn.execute("CREATE TABLE t (x INTEGER)")
    with pytest.raises(RuntimeError):
        with transaction(conn):
            conn.execute("INSERT INTO t VALUES (1)")
            raise RuntimeError("boom")
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    assert not conn.in_transaction


def test_busy_begin_is_retried_then_reported(db_path):
    conn = open_db(db_path, busy_timeout_ms=10)
    blocker = connect(db_path, busy_timeout_ms=10)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="stayed locked"):
        with transaction(conn, attempts=3, backoff_s=0.01):
            pass
    blocker.execute("ROLLBACK")
    # and once the lock is gone the same helper succeeds
    with transaction(conn):
        pass


def test_busy_begin_succeeds_when_lock_is_released_during_backoff(db_path):
    conn = open_db(db_path, busy_timeout_ms=10)
    blocker = connect(db_path, busy_timeout_ms=10)
    blocker.execute("BEGIN IMMEDIATE")
    threading.Timer(0.1, lambda: blocker.execute("ROLLBACK")).start()
    with transaction(conn, attempts=8, backoff_s=0.05):
        conn.execute("CREATE TABLE ok (x)")
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name='ok'").fetchone()[0] == 1
