"""Lease rules in one process, time driven by FakeClock: expiry, renewal, takeover, fencing,
timing validation, wall-clock steps; and the `ingest leases` commands. The rule tests (acquiring
to releasing) run on an SQLite file and on a real PostgreSQL server (`store_target`); the
commands, corrupt rows and schema checks on SQLite (the CLI does not take a URL yet)."""

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from ingest.cli import main
from ingest.backends import open_store
from ingest.backends import transaction as store_transaction
from ingest.clock import SYSTEM_CLOCK, FakeClock
from ingest.errors import EXIT_DATABASE, ConfigError, StoreError
from ingest.lease_rules import LeaseEvent
from ingest.lease_table import CorruptLease, add_event, lease_rows
from ingest.leases import Lease, LeaseLost, LeaseTiming
from ingest.procinfo import UNKNOWN_BOOT, Identity, is_alive, start_time
from ingest.store import open_db, transaction

from .conftest import INGEST

TIMING = LeaseTiming(ttl_s=30, renew_s=10, retry_s=2)

from .pg_server import DB_ERRORS


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def conn(db_path):
    c = open_db(db_path)
    with transaction(c):
        c.execute("CREATE TABLE work (id INTEGER PRIMARY KEY, fence INTEGER)")
    return c


@pytest.fixture
def store_conn(store_target):
    """For the rule tests that run on both stores (SQLite file, PostgreSQL server)."""
    c = open_store(store_target).open()
    with store_transaction(c):
        c.execute("CREATE TABLE work (fence INTEGER)")
    yield c
    c.close()


def lease(db_path, clock, identity=None, timing=TIMING, name="job"):
    return Lease(db_path, name, timing, clock, identity=identity)


def remote_identity() -> Identity:
    """A holder on another host: its pid and monotonic clock mean nothing here."""
    return Identity(host="elsewhere", boot="other-boot", pidns="pid:[1]", pid=4242, start="99")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def event_names(conn, name="job"):
    return [r[0] for r in conn.execute("SELECT event FROM lease_events WHERE name = ? ORDER BY id", (name,))]


def row(conn, name="job"):
    return conn.execute("SELECT * FROM leases WHERE name = ?", (name,)).fetchone()


# ---------------------------------------------------------------- timing


def test_default_timing_is_valid_and_documented_values():
    assert LeaseTiming() == LeaseTiming(30.0, 10.0, 2.0)


@pytest.mark.parametrize(
    "ttl, renew, retry, message",
    [
        (10, 6, 1, "at least 2 x renew_s"),
        (30, 10, 6, "at least 2 x retry_s"),
        (0, 10, 2, "positive number"),
        (30, -1, 2, "positive number"),
        (30, 10, float("nan"), "positive number"),
        ("30", 10, 2, "positive number"),
        (True, 10, 2, "positive number"),
        (86400 * 10, 10, 2, "at most"),  # the incident's 10-day lock
    ],
)
def test_bad_timing_is_refused_at_construction(ttl, renew, retry, message):
    with pytest.raises(ConfigError, match=message):
        LeaseTiming(ttl, renew, retry)


def test_timing_from_config():
    assert LeaseTiming.from_config({}) == LeaseTiming()
    assert LeaseTiming.from_config({"leases": {"ttl_s": 9, "renew_s": 3, "retry_s": 1}}) == LeaseTiming(9, 3, 1)
    with pytest.raises(ConfigError, match=r"unknown setting \[leases\] ttl \(did you mean ttl_s\?\)"):
        LeaseTiming.from_config({"leases": {"ttl": 9}})
    with pytest.raises(ConfigError, match="at least 2 x renew_s"):
        LeaseTiming.from_config({"leases": {"ttl_s": 15}})


# ---------------------------------------------------------------- acquire, renew, expiry


def test_free_lease_is_acquired_with_fence_1(store_target, clock, store_conn):
    a = lease(store_target, clock)
    assert a.try_acquire() and a.fence == 1
    assert event_names(store_conn) == ["acquired"]
    r = row(store_conn)
    assert (r["holder_pid"], r["holder_start"], r["fence"], r["transitions"]) == (os.getpid(), start_time(os.getpid()), 1, 1)


def test_live_holder_keeps_the_lease_while_renewing(store_target, clock, store_conn):
    a, b = lease(store_target, clock), lease(store_target, clock)
    assert a.try_acquire()
    for _ in range(10):
        clock.advance(TIMING.ttl_s - 1)
        assert a.renew()
        assert not b.try_acquire()
    assert row(store_conn)["renewals"] == 10 and a.fence == 1


def test_holder_that_stops_renewing_expires_after_ttl(store_target, clock, store_conn):
    a, b = lease(store_target, clock), lease(store_target, clock)
    assert a.try_acquire()
    clock.advance(TIMING.ttl_s - 0.1)
    assert not b.try_acquire()
    clock.advance(0.2)
    assert b.try_acquire() and b.fence == 2
    assert event_names(store_conn) == ["acquired", "taken_over_expired"]


def test_dead_local_holder_is_taken_over_at_once(store_target, clock, store_conn):
    me = Identity.current()
    gone = dataclasses.replace(me, pid=dead_pid(), nonce="gone")
    a = lease(store_target, clock, identity=gone)
    assert a.try_acquire()
    b = lease(store_target, clock)
    assert b.try_acquire() and b.fence == 2  # no clock advance at all
    assert event_names(store_conn) == ["acquired", "taken_over_dead"]


def test_reused_pid_counts_as_dead(store_target, clock, store_conn):
    """Our own pid, but a different start time: the original holder is gone."""
    impostor = dataclasses.replace(Identity.current(), start="1", nonce="old")
    assert lease(store_target, clock, identity=impostor).try_acquire()
    assert lease(store_target, clock).try_acquire()
    assert event_names(store_conn)[-1] == "taken_over_dead"


def test_remote_holder_expires_only_after_a_ttl_of_observed_silence(store_target, clock, store_conn):
    holder = lease(store_target, clock, identity=remote_identity())
    contender = lease(store_target, clock)
    assert holder.try_acquire()
    clock.advance(TIMING.ttl_s * 10)   # stale by any clock, but we have not watched it yet
    assert not contender.try_acquire()  # first look starts the observation
    clock.advance(TIMING.ttl_s - 1)
    assert holder.renew()               # the holder is alive: the observation restarts
    assert not contender.try_acquire()
    clock.advance(TIMING.ttl_s - 1)
    assert not contender.try_acquire()
    clock.advance(2)
    assert contender.try_acquire() and contender.fence == 2
    assert event_names(store_conn)[-1] == "taken_over_expired"


def test_without_a_boot_id_no_holder_counts_as_local(store_target, clock):
    """No /proc (not Linux): a pid check would be meaningless, so only the TTL rule applies."""
    blind = dataclasses.replace(Identity.current(), boot=UNKNOWN_BOOT)
    assert lease(store_target, clock, identity=dataclasses.replace(blind, pid=dead_pid(), nonce="x")).try_acquire()
    contender = lease(store_target, clock, identity=blind)
    assert not contender.try_acquire()
    clock.advance(TIMING.ttl_s + 1)
    assert contender.try_acquire()


def test_acquire_waits_then_takes_over_or_gives_up(store_target, clock):
    a, b = lease(store_target, clock), lease(store_target, clock)
    assert a.try_acquire()
    assert not b.acquire(timeout=TIMING.ttl_s / 2)   # FakeClock: sleeping advances time
    stop = threading.Event()
    stop.set()
    assert not b.acquire(stop=stop)
    assert b.acquire(timeout=TIMING.ttl_s)           # a stopped renewing: expires meanwhile
    assert b.fence == 2


def test_fence_only_grows_across_holders(store_target, clock, store_conn):
    fences = []
    for _ in range(4):
        x = lease(store_target, clock)
        assert x.try_acquire()
        fences.append(x.fence)
        x.release()
    assert fences == [1, 2, 3, 4]
    with pytest.raises(DB_ERRORS, match="fence only grows"):
        store_conn.execute("UPDATE leases SET fence = 1")


# ---------------------------------------------------------------- wall-clock steps


@pytest.mark.parametrize("holder_identity", [None, remote_identity()], ids=["local", "remote"])
def test_wall_clock_forward_step_does_not_expire_a_live_holder(store_target, clock, holder_identity):
    holder, contender = lease(store_target, clock, identity=holder_identity), lease(store_target, clock)
    assert holder.try_acquire()
    assert not contender.try_acquire()
    for _ in range(5):
        clock.advance(TIMING.renew_s)
        assert holder.renew()
        clock.step_wall(+86400)           # NTP jumps a day ahead: the renewal looks a day old
        assert not contender.try_acquire()


@pytest.mark.parametrize("holder_identity", [None, remote_identity()], ids=["local", "remote"])
def test_wall_clock_backward_step_does_not_extend_a_silent_holder(store_target, clock, holder_identity):
    holder, contender = lease(store_target, clock, identity=holder_identity), lease(store_target, clock)
    assert holder.try_acquire()
    assert not contender.try_acquire()
    clock.step_wall(-86400)               # wall clock goes back a day: its expires_at looks far away
    clock.advance(TIMING.ttl_s + 1)
    assert contender.try_acquire()


def test_status_uses_monotonic_age_for_local_holders(store_target, clock, store_conn):
    a = lease(store_target, clock)
    assert a.try_acquire()
    clock.step_wall(+86400)
    [r] = lease_rows(store_conn, clock=clock)
    assert r["state"] == "held" and r["basis"] == "monotonic" and r["expires_in"] == TIMING.ttl_s
    clock.advance(TIMING.ttl_s + 1)
    assert lease_rows(store_conn, clock=clock)[0]["state"] == "expired"


# ---------------------------------------------------------------- losing, fencing, releasing


def test_renewal_after_takeover_marks_the_lease_lost_once(store_target, clock, store_conn):
    a, b = lease(store_target, clock), lease(store_target, clock)
    assert a.try_acquire()
    clock.advance(TIMING.ttl_s + 1)
    assert b.try_acquire()
    assert not a.renew() and a.lost.is_set()
    assert not a.renew()
    with pytest.raises(LeaseLost):
        a.check()
    assert event_names(store_conn) == ["acquired", "taken_over_expired", "lost"]


def test_fenced_write_commits_while_held(store_target, clock, store_conn):
    a = lease(store_target, clock)
    assert a.try_acquire()
    with a.fenced(store_conn) as c:
        c.execute("INSERT INTO work (fence) VALUES (?)", (a.fence,))
    assert [tuple(r) for r in store_conn.execute("SELECT fence FROM work")] == [(1,)]
    with pytest.raises(ZeroDivisionError):
        with a.fenced(store_conn) as c:
            c.execute("INSERT INTO work (fence) VALUES (99)")
            1 / 0
    assert store_conn.execute("SELECT count(*) FROM work").fetchone()[0] == 1  # rolled back
    assert not store_conn.in_transaction


def test_fenced_write_after_takeover_is_refused_and_nothing_written(store_target, clock, store_conn):
    a, b = lease(store_target, clock), lease(store_target, clock)
    assert a.try_acquire()
    clock.advance(TIMING.ttl_s + 1)   # a was paused; nobody told it
    assert b.try_acquire()
    ran = []
    with pytest.raises(LeaseLost, match="write refused"):
        with a.fenced(store_conn) as c:
            ran.append(1)
            c.execute("INSERT INTO work (fence) VALUES (1)")
    assert ran == [] and store_conn.execute("SELECT count(*) FROM work").fetchone()[0] == 0
    assert a.lost.is_set() and event_names(store_conn)[-1] == "lost"
    with pytest.raises(LeaseLost):
        with a.fenced(store_conn):
            pass
    assert event_names(store_conn).count("lost") == 1


def test_release_is_idempotent_and_never_clears_a_new_holder(store_target, clock, store_conn):
    a, b = lease(store_target, clock), lease(store_target, clock)
    a.release()  # never held: nothing
    assert a.try_acquire()
    a.release()
    a.release()
    assert row(store_conn)["holder_nonce"] is None and event_names(store_conn) == ["acquired", "released"]
    assert a.try_acquire() and a.fence == 2
    clock.advance(TIMING.ttl_s + 1)
    assert b.try_acquire()
    a.release()  # a lost it: b keeps it
    assert row(store_conn)["holder_nonce"] == b.me.nonce
    with pytest.raises(LeaseLost):
        a.fence


def test_context_manager_acquires_heartbeats_and_releases(db_path, conn):
    fast = LeaseTiming(ttl_s=0.4, renew_s=0.1, retry_s=0.05)
    with Lease(db_path, "job", fast) as a:
        time.sleep(0.8)  # two TTLs: only heartbeats keep it
        assert lease(db_path, SYSTEM_CLOCK, timing=fast).try_acquire() is False
        assert row(conn)["renewals"] >= 3 and not a.lost.is_set()
    assert row(conn)["holder_nonce"] is None


def test_heartbeat_notices_a_forced_release_within_a_renew_interval(db_path, conn):
    fast = LeaseTiming(ttl_s=2, renew_s=0.2, retry_s=0.05)
    a = Lease(db_path, "job", fast)
    assert a.try_acquire()
    a.start_heartbeat()
    result = CliRunner().invoke(main, ["--db", str(db_path), "leases", "release", "job", "--force"])
    assert result.exit_code == 0, result.output
    assert a.lost.wait(fast.renew_s + 1)
    assert event_names(conn) == ["acquired", "force_released", "lost"]
    a.release()


def test_heartbeat_gives_up_when_renewals_fail_for_a_ttl(db_path, clock, monkeypatch):
    """Database unusable (locked, I/O): after a TTL without a renewal others may take over, so
    the holder must consider the lease lost. FakeClock: each heartbeat sleep advances time."""
    a = lease(db_path, clock)
    assert a.try_acquire()
    attempts = []

    def failing(conn):
        attempts.append(clock.monotonic())
        raise StoreError("database stayed locked")

    monkeypatch.setattr(a, "_renew_on", failing)
    started = clock.monotonic()
    a.start_heartbeat()
    assert a.lost.wait(5)
    assert attempts[0] - started == TIMING.renew_s  # then retried every retry_s
    assert TIMING.ttl_s < attempts[-1] - started <= TIMING.ttl_s + TIMING.retry_s
    with pytest.raises(LeaseLost):
        a.check()


# ---------------------------------------------------------------- corrupt rows


def corrupt(conn, sql):
    conn.execute("PRAGMA ignore_check_constraints = ON")
    conn.execute(sql)
    conn.execute("PRAGMA ignore_check_constraints = OFF")


@pytest.mark.parametrize(
    "damage, message",
    [("UPDATE leases SET holder_pid = 'abc'", "holder_pid is not a positive integer"),
     ("UPDATE leases SET ttl_s = NULL", "ttl_s is not a positive number")],
)
def test_corrupt_row_is_refused_with_one_line_and_left_alone(db_path, clock, conn, damage, message):
    holder = lease(db_path, clock, identity=dataclasses.replace(Identity.current(), pid=dead_pid()))
    assert holder.try_acquire()
    corrupt(conn, damage)
    before = [tuple(row(conn))], event_names(conn)
    with pytest.raises(CorruptLease, match=message):
        lease(db_path, clock).try_acquire()
    for args in (["leases"], ["leases", "--json"], ["leases", "release", "job", "--force"]):
        result = subprocess.run([INGEST, "--db", str(db_path), *args], capture_output=True, text=True)
        assert result.returncode == EXIT_DATABASE
        assert result.stderr.count("\n") == 1 and message in result.stderr and "corrupt" in result.stderr
    assert ([tuple(row(conn))], event_names(conn)) == before


def test_the_schema_accepts_exactly_the_lease_event_names(conn):
    with transaction(conn):
        for event in LeaseEvent:
            add_event(conn, "job", event, 1, None, 0.0)
    assert event_names(conn) == [e.value for e in LeaseEvent]
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        conn.execute("INSERT INTO lease_events (name, at, event, fence) VALUES ('job', 0, 'stolen', 1)")


# ---------------------------------------------------------------- procinfo


def test_liveness_checks_pid_and_start_time():
    me = os.getpid()
    assert is_alive(me, start_time(me))
    assert not is_alive(me, "1")
    assert not is_alive(dead_pid(), None)


# ---------------------------------------------------------------- CLI


def run(db_path, *args):
    return CliRunner().invoke(main, ["--db", str(db_path), "leases", *args])


def test_leases_json_is_an_empty_list_on_a_new_file(tmp_path):
    from ingest.store import open_db

    open_db(tmp_path / "x.db").close()  # a new, empty database (a missing one is exit 4)
    result = subprocess.run([INGEST, "--db", str(tmp_path / "x.db"), "leases", "--json"], capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout) == []


def test_leases_table_and_json_show_states(db_path, conn):
    held = Lease(db_path, "backfill")
    dead = Lease(db_path, "upsert", identity=dataclasses.replace(Identity.current(), pid=dead_pid()))
    free = Lease(db_path, "janitor")
    for x in (held, dead, free):
        assert x.try_acquire()
    free.release()
    rows = {r["name"]: r for r in json.loads(run(db_path, "--json").output)}
    assert {n: r["state"] for n, r in rows.items()} == {"backfill": "held", "upsert": "dead-holder", "janitor": "free"}
    assert rows["backfill"]["pid"] == os.getpid() and rows["backfill"]["alive"] is True
    assert 29 < rows["backfill"]["expires_in"] <= 30 and rows["upsert"]["expires_in"] == 0
    assert {"name", "holder", "pid", "fence", "state", "expires_in"} <= set(rows["janitor"])
    table = run(db_path).output.splitlines()
    assert table[0].split()[:3] == ["NAME", "HOLDER", "PID"]
    assert [line.split()[-1] for line in table[1:]] == ["held", "free", "dead-holder"]


def test_history_filters_and_limits(db_path, conn):
    for name in ("a", "b", "a"):
        x = Lease(db_path, name)
        assert x.try_acquire()
        x.release()
    got = json.loads(run(db_path, "history", "a", "--limit", "3", "--json").output)
    assert [(e["name"], e["event"], e["fence"]) for e in got] == [("a", "released", 1), ("a", "acquired", 2), ("a", "released", 2)]
    assert len(json.loads(run(db_path, "history", "--json").output)) == 6
    assert "released" in run(db_path, "history").output
    result = run(db_path, "history", "nope")
    assert result.exit_code != 0 and "no lease named 'nope'" in result.output


def test_release_refuses_a_live_holder_unless_forced(db_path, conn):
    a = Lease(db_path, "job")
    assert a.try_acquire()
    result = subprocess.run([INGEST, "--db", str(db_path), "leases", "release", "job"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "--force" in result.stderr
    assert row(conn)["holder_nonce"] == a.me.nonce
    result = run(db_path, "release", "job", "--force")
    assert result.exit_code == 0 and "force-released" in result.output
    assert row(conn)["holder_nonce"] is None and event_names(conn) == ["acquired", "force_released"]
    assert not a.renew() and a.lost.is_set()
    assert "already free" in run(db_path, "release", "job").output


def test_release_of_a_dead_holder_needs_no_force(db_path, conn):
    assert Lease(db_path, "job", identity=dataclasses.replace(Identity.current(), pid=dead_pid())).try_acquire()
    result = run(db_path, "release", "job")
    assert result.exit_code == 0 and "dead-holder" in result.output
    assert event_names(conn) == ["acquired", "released"]


def test_release_of_unknown_lease_is_one_line(db_path, conn):
    result = subprocess.run([INGEST, "--db", str(db_path), "leases", "release", "nope"], capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr == "ingest: error: no lease named 'nope'\n"
