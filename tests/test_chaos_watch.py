"""The watchdog's chaos run, as a test: a stopped holder with no standby, a holder SIGSTOPped
while it holds the write lock, a 402 window, under a real supervisord against the simulator with
a webhook receiver; every invariant of bench/chaos_watch.py must hold (docs/chaos.md)."""

import sys

import pytest

from bench.chaos_checks import format_table
from bench.chaos_watch import WatchChaos, WatchChaosSettings, rows

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; supervisord is POSIX-only"),
]


@pytest.mark.timeout(400)
def test_stalls_leases_cannot_fix_are_unstuck_and_announced_once():
    settings = WatchChaosSettings(stops=2, window_402_s=15.0)
    lines: list[str] = []
    run = WatchChaos(settings, log=lines.append)
    try:
        result = run.execute()
    finally:
        run.close()
    table = rows(result, settings)
    injected = {r.name: r.value for r in table if r.verdict == "injected"}
    assert injected["stopped holder, no standby"] == "2", injected
    assert injected["SIGSTOP while holding the write lock"] == "1", "\n".join(lines)
    failed = [r.name for r in table if r.failed]
    assert not failed, "\n".join(lines) + "\n\n" + format_table(table)
