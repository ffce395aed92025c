"""The lease contract on both stores, proven the same way: the same tests run on an SQLite file
and on a real PostgreSQL server (tests/pg_server.py; they skip there, saying why, without one).
Time is a FakeClock: expiry is judged by the watcher's own monotonic clock, never by the wall
clock. Also the store boundary itself: migrations per dialect from one list of versions, and
the workers' --db refusing a URL until the whole store is ported."""

import dataclasses
from pathlib import Path
from importlib import resources

import pytest

from ingest.backends import open_store, transaction
from ingest.clock import FakeClock
from ingest.errors import ConfigError, StoreError
from ingest.lease_table import lease_history, lease_rows, read_lease
from ingest.leases import Lease, LeaseLost, LeaseTiming
from ingest.procinfo import Identity

TIMING = LeaseTiming(ttl_s=30, renew_s=10, retry_s=2)

from .pg_server import DB_ERRORS


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def conn(store_target):
    c = open_store(store_target).open()
    with transaction(c):
        c.execute("CREATE TABLE work (fence INTEGER NOT NULL, what TEXT)")
    yield c
    c.close()


def remote_identity() -> Identity:
    """A holder on another host: its pid and monotonic clock mean nothing here."""
    return Identity(host="elsewhere", boot="other-boot", pidns="pid:[1]", pid=4242, start="99")


def events(conn, name="job") -> list[tuple]:
    return [tuple(r) for r in conn.execute(
        "SELECT event, fence FROM lease_events WHERE name = ? ORDER BY id", (name,)).fetchall()]


def work(conn) -> list[tuple]:
    return [tuple(r) for r in conn.execute("SELECT fence, what FROM work ORDER BY fence, what").fetchall()]


def test_one_holder_per_epoch_and_each_change_of_holder_is_a_new_fence(store_target, conn, clock):
    a, b = Lease(store_target, "job", TIMING, clock), Lease(store_target, "job", TIMING, clock)
    assert a.try_acquire() and a.fence == 1
    assert not b.try_acquire()
    clock.advance(TIMING.ttl_s - 1)
    assert a.renew()
    clock.advance(TIMING.ttl_s - 1)  # a renewed: never expired, however long in all
    assert not b.try_acquire()
    a.release()
    assert b.try_acquire() and b.fence == 2
    assert events(conn) == [("acquired", 1), ("released", 1), ("acquired", 2)]
    b.close()
    a.close()


def test_fenced_writes_commit_for_the_holder_and_are_refused_after_a_takeover(store_target, conn, clock):
    old = Lease(store_target, "job", TIMING, clock, identity=remote_identity())
    assert old.try_acquire()
    with old.fenced(conn) as c:
        c.execute("INSERT INTO work (fence, what) VALUES (?, ?)", (old.fence, "old"))

    new = Lease(store_target, "job", TIMING, clock)
    assert not new.try_acquire()  # starts watching the remote row
    clock.advance(TIMING.ttl_s + 1)
    assert new.try_acquire() and new.fence == 2
    with new.fenced(conn) as c:
        c.execute("INSERT INTO work (fence, what) VALUES (?, ?)", (new.fence, "new"))

    with pytest.raises(LeaseLost, match="write refused"):
        with old.fenced(conn) as c:
            c.execute("INSERT INTO work (fence, what) VALUES (?, ?)", (1, "late"))
    assert work(conn) == [(1, "old"), (2, "new")]  # the late write never committed
    assert events(conn) == [("acquired", 1), ("taken_over_expired", 2), ("lost", 1)]
    assert old.lost.is_set() and not old.renew()
    new.close()
    old.close()


def test_an_expired_remote_holder_is_judged_by_our_monotonic_clock_not_the_wall_clock(store_target, conn, clock):
    holder = Lease(store_target, "job", TIMING, clock, identity=remote_identity())
    contender = Lease(store_target, "job", TIMING, clock)
    assert holder.try_acquire()
    assert not contender.try_acquire()  # starts watching the row
    clock.step_wall(10 * TIMING.ttl_s)  # the wall clock jumps: the row looks ancient by it
    assert not contender.try_acquire()
    assert lease_rows(conn, clock=clock)[0]["state"] == "expired"  # the display estimate may say so
    clock.advance(TIMING.ttl_s - 1)
    assert holder.renew()
    assert not contender.try_acquire()  # it saw the renewal: the watch starts again
    clock.advance(TIMING.ttl_s - 1)
    assert not contender.try_acquire()
    clock.advance(2)  # more than a ttl of observed silence since
    assert contender.try_acquire() and contender.fence == 2
    detail = lease_history(conn, "job")[-1]["detail"]
    assert "row unchanged for" in detail and "(observed)" in detail
    contender.close()
    holder.close()


def test_a_dead_local_holder_is_taken_over_at_once(store_target, conn, clock):
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = dataclasses.replace(Identity.current(), pid=child.pid)
    assert Lease(store_target, "job", TIMING, clock, identity=gone).try_acquire()
    b = Lease(store_target, "job", TIMING, clock)
    assert b.try_acquire() and b.fence == 2
    assert events(conn)[-1] == ("taken_over_dead", 2)
    b.close()


def test_the_fence_never_decreases_whatever_writes_the_row(store_target, conn, clock):
    a = Lease(store_target, "job", TIMING, clock)
    assert a.try_acquire()
    a.release()
    assert a.try_acquire() and a.fence == 2
    for fence in (1, 0):
        with pytest.raises(DB_ERRORS, match="lease fence only grows"):
            with transaction(conn):
                conn.execute("UPDATE leases SET fence = ? WHERE name = 'job'", (fence,))
    with transaction(conn):
        conn.execute("UPDATE leases SET fence = fence + 5 WHERE name = 'job'")  # growing is allowed
    with transaction(conn):
        assert read_lease(conn, "job").fence == 7
    a.close()


def test_lease_events_are_append_only(store_target, conn):
    # the system clock: on SQLite, events older than a day may be pruned by retention (v009)
    a = Lease(store_target, "job", TIMING)
    assert a.try_acquire()
    a.release()
    for statement in ("UPDATE lease_events SET event = 'released'", "DELETE FROM lease_events"):
        with pytest.raises(DB_ERRORS, match="lease_events is append-only"):
            with transaction(conn):
                conn.execute(statement)
    assert events(conn) == [("acquired", 1), ("released", 1)]


def test_the_heartbeat_keeps_the_lease_and_release_frees_it_for_the_next(store_target, conn):
    fast = LeaseTiming(ttl_s=1.0, renew_s=0.2, retry_s=0.05)
    a, b = Lease(store_target, "job", fast), Lease(store_target, "job", fast)
    assert a.try_acquire()
    a.start_heartbeat()
    assert not b.acquire(timeout=1.5)  # longer than the ttl: a kept renewing
    assert lease_rows(conn)[0]["renewals"] >= 3
    a.close()
    assert b.try_acquire() and b.fence == 2
    b.close()


# ---------------------------------------------------------------- PostgreSQL's own failure modes


def terminate_other_sessions(url: str) -> int:
    import psycopg  # PostgreSQL cases only run with it installed

    with psycopg.connect(url, autocommit=True) as admin:
        return len(admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall())


def test_a_connection_the_server_dropped_is_opened_again_at_the_next_transaction(pg_url, clock):
    a = Lease(pg_url, "job", TIMING, clock)
    assert a.try_acquire()
    assert terminate_other_sessions(pg_url) >= 1  # a server restart, as the client sees it
    clock.advance(TIMING.renew_s)
    assert a.renew()  # no error: reopened, and the row is still ours
    a.close()


def test_a_client_stopped_inside_a_transaction_does_not_hold_the_lease_row_for_ever(pg_url, clock):
    """A holder stopped (SIGSTOP, a frozen VM) inside a fenced write keeps the lease row locked;
    the server ends that session after IDLE_IN_TRANSACTION_MS, well within the waiters' lock
    timeout, and the stopped client's write, when it runs again, fails with one line."""
    import threading
    import time

    from ingest.backends.postgres import IDLE_IN_TRANSACTION_MS

    holder = Lease(pg_url, "job", TIMING, clock)
    assert holder.try_acquire()
    stuck_conn, other = open_store(pg_url).open(), open_store(pg_url).connect()
    locked, resume, outcome = threading.Event(), threading.Event(), []

    def stuck():
        try:
            with holder.fenced(stuck_conn) as c:
                locked.set()
                resume.wait(30)  # "stopped" with the lease row locked
                c.execute("INSERT INTO work (fence, what) VALUES (?, ?)", (1, "after the stop"))
            outcome.append("committed")
        except Exception as e:
            outcome.append(e)

    with transaction(stuck_conn):
        stuck_conn.execute("CREATE TABLE work (fence INTEGER NOT NULL, what TEXT)")
    thread = threading.Thread(target=stuck)
    thread.start()
    try:
        assert locked.wait(10)
        began = time.monotonic()
        with transaction(other):  # waits for the row until the server ends the stuck session
            assert read_lease(other, "job").fence == 1
        waited = time.monotonic() - began
    finally:
        resume.set()
        thread.join(30)
    assert IDLE_IN_TRANSACTION_MS / 1000 - 0.5 < waited < 5
    [error] = outcome
    assert isinstance(error, StoreError) and "rolled back" in str(error) and "\n" not in str(error)
    assert other.execute("SELECT count(*) FROM work").fetchone()[0] == 0
    with holder.fenced(stuck_conn) as c:  # its next write: a new session, still the holder
        c.execute("INSERT INTO work (fence, what) VALUES (?, ?)", (1, "next"))
    holder.close()


# ---------------------------------------------------------------- the boundary itself


def test_every_postgresql_migration_ports_an_sqlite_version_of_the_same_name():
    from ingest.backends.postgres import migrations as pg_migrations
    from ingest.store import migrations as sqlite_migrations

    sqlite_versions = {version: name for version, name, _ in sqlite_migrations()}
    ported = [(version, name) for version, name, _ in pg_migrations()]
    assert [version for version, _ in ported] == [1, 2, 3, 4, 5, 8, 9, 10, 11, 12]
    for version, name in ported:
        assert sqlite_versions[version] == name


def test_postgresql_connections_take_sqlite_placeholders_and_give_rows_by_name_and_position(pg_url):
    conn = open_store(pg_url).connect()
    row = conn.execute("SELECT ? AS n, 'x%' AS pattern WHERE 'x%y' LIKE ?", (7, "x%")).fetchone()
    assert row["n"] == 7 and row[1] == "x%" and tuple(row) == (7, "x%")
    assert dict(row) == {"n": 7, "pattern": "x%"} and row.keys() == ["n", "pattern"]
    assert conn.execute("SELECT 1 WHERE 'a' LIKE 'a%'").fetchone()[0] == 1  # no parameters: % as is
    assert not conn.in_transaction
    conn.close()


def test_postgresql_migrations_are_recorded_once_and_a_newer_schema_is_refused(pg_url):
    from ingest.backends.postgres import applied_versions, migrate

    conn = open_store(pg_url).open()
    assert applied_versions(conn) == [1, 2, 3, 4, 5, 8, 9, 10, 11, 12]
    assert migrate(conn) == []  # nothing twice
    with transaction(conn):
        conn.execute("INSERT INTO ingest_schema (version, name) VALUES (999, 'from_the_future')")
    with pytest.raises(StoreError, match="newer than this ingest knows"):
        migrate(conn)
    conn.close()


def test_a_postgresql_server_that_cannot_be_reached_is_one_line_without_the_password(tmp_path):
    url = f"postgresql://ingest:s3cret@/nowhere?host={tmp_path}&port=1"
    with pytest.raises(StoreError) as e:
        open_store(url).open()
    assert "s3cret" not in str(e.value) and "\n" not in str(e.value)
    assert "cannot open PostgreSQL database 'nowhere'" in str(e.value)


def test_the_postgresql_files_ship_as_package_data():
    names = {p.name for p in (resources.files("ingest.schema") / "postgres").iterdir()}
    assert {"v001_leases.sql", "v002_ledger.sql", "v005_ledger_holds.sql"} <= names


def test_db_option_takes_a_postgresql_url_as_given():
    from ingest.store import resolve_db_path

    assert resolve_db_path("postgresql://ingest@db.example/ingest") == "postgresql://ingest@db.example/ingest"
    assert resolve_db_path("var/x.db") == Path("var/x.db")
