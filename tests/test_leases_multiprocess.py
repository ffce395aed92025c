"""Leases between real processes: mutual exclusion, kill -9, SIGSTOP/SIGCONT, SIGTERM.

Workers are tests/lease_worker.py processes; their CLOCK_MONOTONIC readings are comparable with
ours (one host, one boot). Every test runs on an SQLite file and on a real PostgreSQL server
(tests/pg_server.py). Short timings (ttl 3 s, renew 1 s, retry 0.2 s) keep each test a few
seconds; the timed assertions are generous bounds on the behaviour that is the point of the test.
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ingest.backends import open_store
from ingest.errors import EXIT_LEASE_LOST

HELPER = str(Path(__file__).with_name("lease_worker.py"))
TTL, RENEW, RETRY = 3.0, 1.0, 0.2
pytestmark = pytest.mark.timeout(90)


def mono() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class Worker:
    """A lease_worker.py process whose stdout lines we can wait for."""

    def __init__(self, db, name, mode, *extra):
        self.proc = subprocess.Popen(
            [sys.executable, HELPER, str(db), name, mode, "--ttl", str(TTL), "--renew", str(RENEW),
             "--retry", str(RETRY), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[list[str]] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.split())

    def expect(self, word: str, timeout: float = 15.0) -> list[str]:
        end = mono() + timeout
        while True:
            try:
                parts = self.lines.get(timeout=max(0.01, end - mono()))
            except queue.Empty:
                raise AssertionError(f"no {word} from worker within {timeout}s; saw {self.seen}") from None
            self.seen.append(parts)
            if parts[0] == word:
                return parts

    def signal(self, signum):
        os.kill(self.proc.pid, signum)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def workers():
    started = []

    def start(*args):
        w = Worker(*args)
        started.append(w)
        return w

    yield start
    for w in started:  # never leave a process behind, stopped ones included
        if w.proc.poll() is None:
            os.kill(w.proc.pid, signal.SIGCONT)
        w.stop()


def query(db, sql: str, params: tuple = ()) -> list[tuple]:
    conn = open_store(db).connect()
    try:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def events(db, name="job"):
    return query(db, "SELECT event, fence, holder FROM lease_events WHERE name = ? ORDER BY id", (name,))


def work_fences(db) -> list[tuple[int, int]]:
    return query(db, "SELECT fence, pid FROM lease_work ORDER BY id")


def assert_writes_never_interleave(db):
    """Fenced writes in commit order: fences never go back, and one fence belongs to one process."""
    rows = work_fences(db)
    assert rows
    fences = [f for f, _ in rows]
    assert fences == sorted(fences)
    owners = {}
    for fence, pid in rows:
        assert owners.setdefault(fence, pid) == pid


def test_two_contenders_never_hold_the_lease_at_once(store_target, workers):
    rounds = 30
    fast = ["--rounds", str(rounds)]
    a = workers(store_target, "job", "contend", *fast)
    b = workers(store_target, "job", "contend", *fast)
    assert a.proc.wait(60) == 0 and b.proc.wait(60) == 0, (a.proc.stderr.read(), b.proc.stderr.read())

    # events: strictly acquired(n), released(n), acquired(n+1), ... with no takeover
    evs = events(store_target)
    assert len(evs) == 4 * rounds
    for i in range(0, len(evs), 2):
        fence = i // 2 + 1
        assert evs[i][:2] == ("acquired", fence) and evs[i + 1][:2] == ("released", fence)
        assert evs[i][2] == evs[i + 1][2]  # released by whoever acquired
    assert_writes_never_interleave(store_target)

    # each process's own view: holding intervals (monotonic, comparable across processes) are disjoint
    intervals = []
    for w in (a, b):
        while not w.lines.empty():
            w.seen.append(w.lines.get())
        acquired = [float(p[2]) for p in w.seen if p[0] == "ACQUIRED"]
        released = [float(p[2]) for p in w.seen if p[0] == "RELEASED"]
        assert len(acquired) == len(released) == rounds
        intervals += zip(acquired, released)
    intervals.sort()
    for (_, end), (start, _) in zip(intervals, intervals[1:]):
        assert end < start


def test_kill_9_holder_is_taken_over_through_the_liveness_rule(store_target, workers):
    a = workers(store_target, "job", "hold")
    a.expect("ACQUIRED")
    b = workers(store_target, "job", "hold")
    b.expect("READY")
    time.sleep(2 * RETRY)  # b is polling now
    killed_at = mono()
    a.signal(signal.SIGKILL)  # not reaped yet: a zombie is dead too
    acquired = b.expect("ACQUIRED")
    assert float(acquired[2]) - killed_at < TTL / 2  # well before the TTL: ~one retry interval
    assert events(store_target)[-1][:2] == ("taken_over_dead", 2)
    b.signal(signal.SIGTERM)
    assert b.proc.wait(10) == 0


def test_new_process_takes_over_a_dead_processes_row_at_once(store_target, workers):
    a = workers(store_target, "job", "hold")
    a.expect("ACQUIRED")
    a.signal(signal.SIGKILL)
    a.proc.wait(10)
    b = workers(store_target, "job", "hold")
    _, fence, _, attempts = b.expect("ACQUIRED")
    assert (fence, attempts) == ("2", "1")  # first try, no waiting for the TTL
    assert events(store_target)[-1][0] == "taken_over_dead"


def test_stopped_holder_loses_lease_and_its_next_fenced_write_is_refused(store_target, workers):
    a = workers(store_target, "job", "hold")
    a.expect("ACQUIRED")
    time.sleep(0.5)
    stopped_at = mono()
    a.signal(signal.SIGSTOP)
    b = workers(store_target, "job", "hold")
    taken = float(b.expect("ACQUIRED", timeout=TTL + 10)[2]) - stopped_at
    # a's last renewal was at most renew_s before the stop: expiry is TTL after that renewal
    assert TTL - RENEW - 0.2 <= taken <= TTL + 3
    assert events(store_target)[-1][:2] == ("taken_over_expired", 2)
    time.sleep(0.5)  # b writes a little under fence 2

    continued_at = mono()
    a.signal(signal.SIGCONT)
    lost = a.expect("LOST")
    assert a.proc.wait(10) == EXIT_LEASE_LOST
    assert float(lost[2]) - continued_at < RENEW + 0.5  # noticed within a heartbeat
    assert_writes_never_interleave(store_target)  # a's write after SIGCONT never committed
    assert ("lost", 1) in [e[:2] for e in events(store_target)]

    b.signal(signal.SIGTERM)
    b.expect("RELEASED")
    assert b.proc.wait(10) == 0


def test_sigterm_releases_so_the_next_contender_need_not_wait(store_target, workers):
    a = workers(store_target, "job", "hold")
    a.expect("ACQUIRED")
    b = workers(store_target, "job", "hold")
    b.expect("READY")
    a.signal(signal.SIGTERM)
    assert a.proc.wait(10) == 0
    released_at = mono()
    assert float(b.expect("ACQUIRED")[2]) - released_at < 2 * RETRY + 0.5
    assert [e[0] for e in events(store_target)][-2:] == ["released", "acquired"]
