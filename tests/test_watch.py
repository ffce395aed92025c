"""The watchdog: its decisions as pure functions, the listener protocol, and the whole thing under a
real supervisord against the simulator (tests/supervised.py) with a webhook receiver on loopback.

What operators rely on: a 402 pauses the workers (both stay RUNNING), one alert names the cause,
and a recovered message follows when Keepa answers again; a SIGSTOPped backfill holder is
replaced within the TTL and a tick; a foreign process holding the write lock is named by pid and
never signalled; no pid that supervisord does not report as its own child is ever signalled.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ingest.watch import (TICK_S, Child, HeldLease, LockSeen, WatchSettings, announced_within, decide, listen, parse_tokens,
                          read_event, track_lock, track_stopped, write_lock_holders)

from .supervised import TTL_S, TEST_TOML, SupervisedProject
from .webhook_sink import WebhookSink

NOW = 1_700_000_000.0
SELF = 999
SETTINGS = WatchSettings()


def child(program, pid, proc_state="S", state="RUNNING"):
    return Child(program, pid, state, proc_state)


# ---------------------------------------------------------------- decisions (pure)


def test_a_stopped_child_is_killed_and_a_running_one_is_left_alone():
    children = [child("backfill", 10, "T"), child("upsert", 11, "S")]
    stopped = track_stopped({}, children, NOW)
    actions = decide(children, [], None, stopped, NOW, SETTINGS, SELF)
    assert [(a.action, a.pid, a.signal) for a in actions] == [("kill_stopped", 10, True)]


def test_a_grace_period_waits_for_a_stop_to_last():
    children = [child("backfill", 10, "T")]
    settings = WatchSettings(stopped_grace_s=10)
    stopped = track_stopped({}, children, NOW)
    assert decide(children, [], None, stopped, NOW + 5, settings, SELF) == []
    stopped = track_stopped(stopped, children, NOW + 10)
    assert [a.action for a in decide(children, [], None, stopped, NOW + 10, settings, SELF)] == ["kill_stopped"]
    assert track_stopped(stopped, [child("backfill", 10, "S")], NOW + 11) == {}   # continued: forgotten


def test_a_child_holding_a_lease_with_an_old_heartbeat_is_hung():
    children = [child("backfill", 10), child("upsert", 11)]
    leases = [HeldLease("backfill", 10, 31.0, 30.0), HeldLease("upsert", 11, 29.0, 30.0)]
    actions = decide(children, leases, None, {}, NOW, SETTINGS, SELF)
    assert [(a.action, a.pid) for a in actions] == [("kill_hung", 10)]
    assert "renewed it 31s ago (TTL 30s)" in actions[0].reason


def test_a_late_heartbeat_behind_another_write_lock_holder_is_not_hung():
    """Workers cannot renew while a foreign process holds the write lock: that one is the cause."""
    children = [child("backfill", 10)]
    leases = [HeldLease("backfill", 10, 31.0, 30.0)]
    assert decide(children, leases, LockSeen(20, NOW - 5), {}, NOW, SETTINGS, SELF) == []
    assert [a.action for a in decide(children, leases, LockSeen(10, NOW - 5), {}, NOW, SETTINGS, SELF)] == ["kill_hung"]


def test_no_foreign_pid_is_ever_given_a_signal():
    """Whatever is seen (a stopped foreign process, a foreign lease holder, a foreign lock
    holder, this very process), only supervisord's children get signal=True."""
    children = [child("backfill", 10, "T"), child("watch", SELF, "T"), child("sim", 12, "S", state="STOPPED")]
    foreign = [20, 21, 22, 12]
    leases = [HeldLease("backfill", 20, 999.0, 30.0), HeldLease("upsert", 21, 999.0, 30.0)]
    for lock_pid in [*foreign, SELF, 10]:
        lock = LockSeen(lock_pid, NOW - 100, "sqlite3 var/ingest.db")
        stopped = {10: NOW - 60, SELF: NOW - 60, 20: NOW - 60, 22: NOW - 60}
        for settings in (SETTINGS, WatchSettings(act=False), WatchSettings(stopped_grace_s=0, write_lock_max_s=1)):
            for action in decide(children, leases, lock, stopped, NOW, settings, SELF):
                if action.signal:
                    assert action.pid == 10, action
                    assert settings.act
    foreign_lock = decide(children, [], LockSeen(20, NOW - 31, "sqlite3 var/ingest.db"), {}, NOW, SETTINGS, SELF)
    assert [(a.action, a.pid, a.signal, a.detail) for a in foreign_lock] == [
        ("alert_foreign_lock", 20, False, "sqlite3 var/ingest.db")]


def test_the_write_lock_holder_is_acted_on_past_write_lock_max_s_only_and_reported_once():
    children = [child("upsert", 11)]
    assert decide(children, [], LockSeen(11, NOW - 29), {}, NOW, SETTINGS, SELF) == []
    [ours] = decide(children, [], LockSeen(11, NOW - 31), {}, NOW, SETTINGS, SELF)
    assert (ours.action, ours.signal) == ("kill_lock_holder", True)
    assert decide(children, [], LockSeen(20, NOW - 31, reported=True), {}, NOW, SETTINGS, SELF) == []


def test_report_only_mode_never_signals():
    actions = decide([child("backfill", 10, "T")], [], None, {10: NOW}, NOW, WatchSettings(act=False), SELF)
    assert [(a.action, a.signal) for a in actions] == [("kill_stopped", False)]
    assert "report only" in actions[0].reason


def test_lock_tracking_keeps_the_first_sight_of_one_holder():
    first = track_lock(None, 10, NOW, "x")
    assert track_lock(first, 10, NOW + 5) is first
    assert track_lock(first, 11, NOW + 5).since == NOW + 5
    assert track_lock(first, None, NOW + 5) is None


def test_proc_locks_lines_are_read_for_the_wal_write_byte_of_this_file_only():
    text = "\n".join([
        "1: POSIX  ADVISORY  WRITE 8215 fe:00:2146369 120 120",
        "2: POSIX  ADVISORY  READ 8216 fe:00:2146369 124 124",
        "3: POSIX  ADVISORY  WRITE 8217 fe:00:999 120 120",          # another file
        "4: POSIX  ADVISORY  WRITE 8218 fe:00:2146369 128 128",      # a read-mark slot, not the write lock
        "5: -> POSIX  ADVISORY  WRITE 8219 fe:00:2146369 120 120",   # a waiter
        "6: FLOCK  ADVISORY  WRITE 8220 fe:00:2146369 0 EOF",
        "7: POSIX  ADVISORY  WRITE 8221 08:01:2146369 0 EOF",        # another device
    ])
    assert write_lock_holders(text, (0xfe, 0), 2146369) == [8215]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/locks")
def test_a_real_sqlite_transaction_is_seen_as_the_write_lock_holder(tmp_path):
    import sqlite3

    from ingest.watch import shm_lock_holder

    path = tmp_path / "x.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x)")
    assert shm_lock_holder(path) is None
    conn.execute("BEGIN IMMEDIATE")
    assert shm_lock_holder(path) == os.getpid()
    conn.execute("COMMIT")
    assert shm_lock_holder(path) is None


# ---------------------------------------------------------------- the listener protocol


def test_protocol_tokens_and_events_are_parsed():
    assert parse_tokens("ver:3.0 server:supervisor eventname:TICK_5 len:15\n") == {
        "ver": "3.0", "server": "supervisor", "eventname": "TICK_5", "len": "15"}
    payload = "processname:backfill groupname:backfill from_state:RUNNING expected:0 pid:42"
    stdin = io.StringIO(f"ver:3.0 eventname:PROCESS_STATE_EXITED len:{len(payload)}\n{payload}")
    header, tokens, _ = read_event(stdin)
    assert header["eventname"] == "PROCESS_STATE_EXITED" and tokens["expected"] == "0" and tokens["pid"] == "42"
    assert read_event(stdin) is None


def test_listen_acknowledges_every_event_and_looks_on_ticks_and_unexpected_exits():
    events = [("TICK_5", "when:1 serial:1"),
              ("PROCESS_STATE_EXITED", "processname:backfill groupname:backfill from_state:RUNNING expected:1 pid:4"),
              ("PROCESS_STATE_RUNNING", "processname:backfill groupname:backfill from_state:STARTING pid:5"),
              ("PROCESS_STATE_FATAL", "processname:upsert groupname:upsert from_state:BACKOFF")]
    stdin = io.StringIO("".join(f"ver:3.0 eventname:{n} len:{len(p)}\n{p}" for n, p in events))
    stdout = io.StringIO()

    class Counting:
        looks = 0

        def look(self):
            self.looks += 1
            time.sleep(1.05)  # past the minimum gap between looks
    watcher = Counting()
    assert listen(watcher, stdin, stdout) == 0
    assert stdout.getvalue() == "READY\n" + "RESULT 2\nOKREADY\n" * 4
    assert watcher.looks == 2   # the tick and the FATAL; not an expected exit, not RUNNING


# ---------------------------------------------------------------- the 402 pause, one worker process


@pytest.mark.slow
def test_a_worker_paused_by_402_resumes_by_itself_and_loses_nothing(tmp_path, db_path):
    from ingest.simulator import SimConfig, Simulator

    from .workers_support import FAST_CONFIG, query, run_worker, scalar, worker_env

    simulator = Simulator(SimConfig(port=0, refill_rate=6000, seed=7, products=1200,
                                    force_402_window=(0.0, 4.0))).start()
    try:
        config = tmp_path / "ingest.toml"
        config.write_text(FAST_CONFIG.replace("[worker]\n", "[worker]\npayment_retry_s = 0.5\n"))
        env = worker_env(simulator.url, db_path, config)
        result = run_worker("backfill", env, "--once", timeout=90)
        stats = simulator.stats()
    finally:
        simulator.stop()
    assert result.returncode == 0, result.stderr[-2000:]
    assert stats["faults"]["forced_402"] >= 2   # the first call, and re-checks with /token
    paused = [line for line in result.stderr.splitlines() if "paused: Keepa subscription inactive (402)" in line]
    assert len(paused) == 1 and "re-checking with /token every 0.5 s" in paused[0]
    assert "resuming" in result.stderr
    stored = {a for (a,) in query(db_path, "SELECT asin FROM deals")}
    assert stored == set(stats["listed_asins"])
    assert scalar(db_path, "SELECT last_error FROM worker_progress WHERE worker = 'backfill'") == \
        "paused: Keepa subscription inactive (402)"   # kept as the last error, with its time


# ---------------------------------------------------------------- under a real supervisord

WORKERS = ("backfill", "upsert")
CONFIRM_S = 2.0
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; supervisord is POSIX-only")


@pytest.fixture
def sim():
    from ingest.simulator import SimConfig, Simulator

    simulator = Simulator(SimConfig(port=0, refill_rate=6000, products=60_000, seed=3)).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def sink():
    with WebhookSink() as s:
        yield s


@pytest.fixture
def project(sim, sink):
    toml = TEST_TOML + (f"\n[alerts]\nconfirm_s = {CONFIRM_S}\nwebhooks = [\"{sink.url}\"]\nbackoff_s = 0.2\n"
                        "\n[worker]\npayment_retry_s = 1.0\n")
    p = SupervisedProject(sim.url, toml=toml)
    yield p
    p.close()


def start(project) -> dict[str, int]:
    done = project.script("start", check=False, timeout=60)
    assert done.returncode == 0, f"scripts/start exited {done.returncode}:\n{done.stdout}{done.stderr}"
    states = project.wait_running(*WORKERS, "watch")
    pids = {w: states[w]["pid"] for w in WORKERS}
    for worker, pid in pids.items():
        project.wait_held_by(worker, pid)
    return pids


def settled_healthy(project, sink) -> float:
    """Wait until ingest status says healthy and the watchdog has seen it for confirm_s + a tick."""
    def healthy():
        done = project.script("status", "--json", check=False)
        return json.loads(done.stdout)["verdict"] == "healthy"
    project.wait(healthy, 60, "ingest status to say healthy", interval=0.5)
    time.sleep(announced_within(CONFIRM_S))
    return time.time()


def actions(project) -> list[dict]:
    return [dict(r) for r in project.query("SELECT * FROM watch_actions ORDER BY id")]


@pytest.mark.slow
@linux_only
@pytest.mark.timeout(240)
def test_402_pauses_both_workers_one_alert_then_recovered(project, sim, sink):
    pids = start(project)
    since = settled_healthy(project, sink)
    window_s = 15.0
    sim.app.faults.update({"force_402": [0, window_s]})
    began = time.time()

    alert = project.wait(lambda: sink.of_kind("alert", since), announced_within(CONFIRM_S) + 5, "an alert")[0]
    assert alert["verdict"] == "down" and "402" in alert["text"], alert
    assert any(p["check"] == "subscription" and "402" in p["detail"] for p in alert["problems"]), alert
    print(f"alert {alert['_received'] - began:.1f}s after the 402 window opened")
    # confirm_s rounded up to whole ticks, plus the tick that first sees it (docs/watch.md)
    assert alert["_received"] - began < announced_within(CONFIRM_S) + 2
    state = json.loads(project.script("status", "--json", check=False).stdout)
    assert state["verdict"] == "down" and any("402" in p for p in state["problems"])

    recovered = project.wait(lambda: sink.of_kind("recovered", since), window_s + 30, "a recovered message")[0]
    print(f"recovered {recovered['_received'] - began - window_s:.1f}s after Keepa answered again")
    assert sink.kinds(since) == ["alert", "recovered"], sink.kinds(since)
    for worker in WORKERS:   # the same processes throughout: paused, never exited
        assert project.states()[worker] | {} and project.states()[worker]["state"] == "RUNNING"
        assert project.pid(worker) == pids[worker]
    before = project.query("SELECT max(id) FROM fenced_commits")[0][0]
    project.wait(lambda: project.query("SELECT max(id) FROM fenced_commits")[0][0] > before, 30, "commits again")
    assert actions(project) == []   # a paused worker is not hung: nothing was killed
    listing = project.run(str(project.root / ".venv/bin/ingest"), "alerts", "--json")
    sent = json.loads(listing.stdout)
    assert [m["kind"] for m in sent[:2]] == ["recovered", "alert"]
    assert all(d["result"] == "sent" for m in sent[:2] for d in m["deliveries"])


@pytest.mark.slow
@linux_only
@pytest.mark.timeout(240)
def test_a_stopped_backfill_holder_is_replaced_within_the_ttl_and_a_tick(project, sink):
    pids = start(project)
    since = time.time()
    stopped_at = time.time()
    os.kill(pids["backfill"], signal.SIGSTOP)
    try:
        new_pid = project.wait(lambda: (p := project.pid("backfill")) not in (None, pids["backfill"]) and p,
                               TTL_S + 10, "the watchdog to kill the stopped backfill")
        project.wait_held_by("backfill", new_pid, timeout=TTL_S + 10 - (time.time() - stopped_at))
    finally:
        try:
            os.kill(pids["backfill"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    took = time.time() - stopped_at
    print(f"stopped holder replaced in {took:.1f}s")
    assert took < TTL_S + 10
    [action] = [a for a in actions(project) if a["pid"] == pids["backfill"]]
    assert action["action"] == "kill_stopped" and action["program"] == "backfill"
    assert project.pid("upsert") == pids["upsert"]
    project.wait(lambda: sink.of_kind("action", since), 15, "the action message")
    assert str(pids["backfill"]) in sink.of_kind("action", since)[0]["text"]


FOREIGN_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


@pytest.mark.slow
@linux_only
@pytest.mark.timeout(240)
def test_a_foreign_write_lock_holder_is_named_by_pid_and_never_signalled(project, sink):
    """An operator's shell in an open transaction: reported with pid and command line, alive."""
    start(project)
    toml = project.root / "ingest.toml"
    toml.write_text(toml.read_text() + "\n[watch]\nwrite_lock_max_s = 3\n")
    project.ctl("restart", "watch")
    project.wait_running("watch")
    since = time.time()
    holder = subprocess.Popen([sys.executable, "-c", FOREIGN_HOLDER, str(project.db_path), "45"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = project.wait(lambda: sink.of_kind("action", since), announced_within(3) + 15, "the foreign-lock alert")[0]
        assert f"pid {holder.pid}" in message["text"] and "not signalled" in message["text"], message
        assert f"{sys.executable} -c" in message["text"]   # its command line, as ps shows it
        assert holder.poll() is None, "the foreign holder was signalled"
        time.sleep(TICK_S * 2)
        assert holder.poll() is None
        assert len(sink.of_kind("action", since)) == 1   # once per hold, not every tick
    except AssertionError:
        print((project.root / "var/log/watch.log").read_text()[-4000:])
        raise
    finally:
        holder.kill()
        holder.wait(10)
    # recorded once the lock is free (the message went out while it was held)
    rows = project.wait(lambda: [a for a in actions(project) if a["action"] == "alert_foreign_lock"], 20,
                        "the action row")
    assert [(r["pid"], r["program"]) for r in rows] == [(holder.pid, None)]
    assert "not signalled" in rows[0]["reason"]


HUNG_PROGRAM = """[program:hung]
command = PYTHON -c "import sys, time; from ingest.leases import Lease, LeaseTiming; from ingest.store import open_db; open_db(sys.argv[1]); lease = Lease(sys.argv[1], 'hung', LeaseTiming(ttl_s=4.0, renew_s=1.0, retry_s=0.25)); print('held', lease.try_acquire(), flush=True); time.sleep(3600)" %(here)s/../../var/ingest.db
directory = %(here)s/../..
autostart = true
autorestart = true
startsecs = 1
redirect_stderr = true
stdout_logfile = %(here)s/../../var/log/hung.log
"""


@pytest.mark.slow
@linux_only
@pytest.mark.timeout(240)
def test_a_child_holding_a_lease_it_no_longer_renews_is_killed_as_hung(project, sink):
    """Alive and not stopped (a deadlock, a stuck syscall), but its heartbeat is older than the TTL."""
    # the test's own interpreter (the copy's .venv/bin/python link runs outside the venv)
    (project.root / "supervisor.d" / "programs" / "hung.conf").write_text(HUNG_PROGRAM.replace("PYTHON", sys.executable))
    start(project)
    first = project.wait_running("hung")["hung"]["pid"]
    project.wait_held_by("hung", first)
    row = project.wait(lambda: [a for a in actions(project) if a["pid"] == first], 4.0 + TICK_S * 2 + 5,
                       "the watchdog to kill the hung holder")[0]
    assert (row["action"], row["program"]) == ("kill_hung", "hung")
    assert "holds lease hung but renewed it" in row["reason"] and "(TTL 4s)" in row["reason"]
    again = project.wait(lambda: (p := project.pid("hung")) not in (None, first) and p, 15, "hung restarted")
    project.wait_held_by("hung", again)   # the next process takes the dead holder's lease at once
    assert project.pid("backfill") and not [a for a in actions(project) if a["program"] in WORKERS]


LOCKER_PROGRAM = """[program:locker]
command = PYTHON -c "import os, sqlite3, sys, time; from ingest.store import open_db; open_db(sys.argv[1]).close(); [time.sleep(0.1) for _ in iter(lambda: os.path.exists(sys.argv[1] + '.go'), True)]; conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60); conn.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(3600)" %(here)s/../../var/ingest.db
directory = %(here)s/../..
autostart = true
autorestart = false
startsecs = 1
redirect_stderr = true
stdout_logfile = %(here)s/../../var/log/locker.log
"""


@pytest.mark.slow
@linux_only
@pytest.mark.timeout(240)
def test_a_child_holding_the_write_lock_too_long_is_killed_and_the_workers_go_on(project, sink):
    (project.root / "supervisor.d" / "programs" / "locker.conf").write_text(LOCKER_PROGRAM.replace("PYTHON", sys.executable))
    toml = project.root / "ingest.toml"
    toml.write_text(toml.read_text() + "\n[watch]\nwrite_lock_max_s = 3\n")
    pids = start(project)
    locker = project.wait_running("locker")["locker"]["pid"]
    (project.root / "var" / "ingest.db.go").touch()   # now it takes the lock
    project.wait(lambda: "locked" in (project.root / "var/log/locker.log").read_text(), 30, "the locker's transaction")
    try:
        row = project.wait(lambda: [a for a in actions(project) if a["pid"] == locker], announced_within(3) + 20,
                           "the watchdog to kill the lock holder")[0]
    except AssertionError:
        print((project.root / "var/log/watch.log").read_text()[-3000:])
        raise
    assert (row["action"], row["program"]) == ("kill_lock_holder", "locker")
    assert "held SQLite's write lock for" in row["reason"]
    # the workers were waiting for the lock, not hung: they were not killed, and they commit again
    assert {w: project.pid(w) for w in WORKERS} == pids
    assert not [a for a in actions(project) if a["program"] in WORKERS]
    before = project.query("SELECT max(id) FROM fenced_commits")[0][0] or 0
    project.wait(lambda: (project.query("SELECT max(id) FROM fenced_commits")[0][0] or 0) > before, 30, "commits again")
