"""The chaos run, short: the whole system under a real supervisord against the simulator with
faults on, while workers are killed (-9), paused past their lease TTL, a lease is force-released
and supervisord restarted; then it settles and every invariant of bench/chaos.py must hold
(docs/chaos.md). About 75 s of chaos plus the settle phase. And bench/chaos.py interrupted
leaves nothing of its run behind.
"""

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.chaos import settings_for
from bench.chaos_checks import all_rows, format_table
from bench.chaos_lib import ChaosRun, kill_processes_of, processes_of

ROOT = Path(__file__).resolve().parent.parent
UP_LINE = re.compile(r"supervisord up: pid (\d+) in (\S+)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; supervisord is POSIX-only"),
]


def chaos(settings) -> tuple[list, list[str]]:
    """Run it; the verdict rows and the run's timeline (for a failure's message)."""
    lines: list[str] = []
    run = ChaosRun(settings, log=lines.append)
    try:
        result = run.execute()
        return all_rows(result), lines
    finally:
        run.close()


def assert_every_fault_injected_and_every_invariant_held(rows, lines) -> dict:
    injected = {r.name: r.value for r in rows if r.verdict == "injected"}
    assert not injected["kill -9 of a worker (holders)"].startswith("0"), injected
    assert not injected["SIGSTOP of a holder past the TTL (holding the write lock)"].startswith("0"), injected
    assert injected["supervisord restarts"] != "0" and injected["forced lease releases"] != "0", injected
    failed = [r.name for r in rows if r.failed]
    assert not failed, "\n".join(lines) + "\n\n" + format_table(rows)
    return {r.name: r for r in rows}


@pytest.mark.timeout(240)
def test_nothing_lost_nothing_stalls_no_token_wasted_under_chaos():
    assert_every_fault_injected_and_every_invariant_held(*chaos(settings_for(75.0, seed=2)))


@pytest.mark.timeout(240)
def test_the_same_invariants_hold_with_the_state_in_postgresql(pg_server):
    """The programs get the URL as INGEST_DB in ingest.env, as an operator gives it; shorter than
    the SQLite run (bench/chaos.py --postgres --duration 120 is the long one, docs/chaos.md)."""
    pg_url = pg_server.create_database(extensions=("amcheck",))  # the integrity check's
    rows = assert_every_fault_injected_and_every_invariant_held(*chaos(settings_for(50.0, seed=3, db=pg_url)))
    assert rows["amcheck bt_index_check(heapallindexed)"].value == "ok"
    assert int(rows["lease events: taken_over_dead"].value) > 0


def _lines(stream) -> "queue.Queue[str | None]":
    """The stream's lines as they come (None at its end), so the test can wait with a timeout."""
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for_line(lines, pattern, timeout: float, seen: list[str]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if match := pattern.search(line):
            return match
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(200)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_chaos_run_stops_supervisord_and_every_process_it_started(sig):
    run = subprocess.Popen([sys.executable, "bench/chaos.py", "--duration", "60", "--no-standby"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output: list[str] = []
    project = None
    try:
        lines = _lines(run.stdout)
        up = _wait_for_line(lines, UP_LINE, 90, output)
        assert up, "no 'supervisord up' line:\n" + "".join(output)
        supervisord, project = int(up.group(1)), Path(up.group(2))
        before = processes_of(project)
        assert supervisord in before and len(before) >= 4, before  # supervisord, 2 workers, the simulator

        os.kill(run.pid, sig)
        code = run.wait(120)
        while (line := lines.get(timeout=5)) is not None:
            output.append(line)

        assert code == 128 + sig, "".join(output)
        assert not _alive(supervisord)
        assert processes_of(project) == [], "".join(output)
        assert not project.exists()  # the project copy is deleted too
        assert "everything stopped" in output[-1]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
        if project is not None:
            kill_processes_of(project, grace_s=1.0)
            shutil.rmtree(project, ignore_errors=True)
