"""The test suite's PostgreSQL server (tests/pg_server.py) leaves nothing behind: stopped and
removed at the end, and also when the process that started it is killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT
from .pg_server import PgServer, why_unavailable

pytestmark = pytest.mark.timeout(120)

STARTER = """
import sys
from tests.pg_server import PgServer
server = PgServer.start()
print(server.root, flush=True)
sys.stdin.read()  # until the test kills us
"""


@pytest.fixture(autouse=True)
def _needs_a_server():
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)


def postmaster_running(data: Path) -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(data).encode() in cmdline and any(part.endswith(b"postgres") for part in cmdline[:1]):
            return True
    return False


def wait_until(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_stop_stops_the_server_and_removes_its_directory():
    server = PgServer.start()
    data = server.data
    assert postmaster_running(data)
    server.stop()
    assert not server.root.exists() and not postmaster_running(data)
    server.stop()  # idempotent


def test_a_kill_9_of_the_starting_process_still_stops_the_server():
    starter = subprocess.Popen([sys.executable, "-c", STARTER], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        root = Path(starter.stdout.readline().strip())
        assert root.is_dir() and postmaster_running(root / "data")
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait(10)
        assert wait_until(lambda: not root.exists() and not postmaster_running(root / "data"), 30)
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
