"""The chaos run, short: the whole system under a real supervisord against the simulator with
faults on, while workers are killed (-9), paused past their lease TTL, a lease is force-released
and supervisord restarted; then it settles and every invariant of bench/chaos.py must hold
(docs/chaos.md). About 75 s of chaos plus the settle phase.
"""

import sys

import pytest

from bench.chaos import settings_for
from bench.chaos_checks import all_rows, format_table
from bench.chaos_lib import ChaosRun

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; supervisord is POSIX-only"),
]


@pytest.mark.timeout(240)
def test_nothing_lost_nothing_stalls_no_token_wasted_under_chaos():
    settings = settings_for(75.0, seed=2)
    lines: list[str] = []
    run = ChaosRun(settings, log=lines.append)
    try:
        result = run.execute()
        rows = all_rows(result)
    finally:
        run.close()

    injected = {r.name: r.value for r in rows if r.verdict == "injected"}
    assert not injected["kill -9 of a worker (holders)"].startswith("0"), injected
    assert not injected["SIGSTOP of a holder past the TTL (holding the write lock)"].startswith("0"), injected
    assert injected["supervisord restarts"] != "0" and injected["forced lease releases"] != "0", injected
    failed = [r.name for r in rows if r.failed]
    assert not failed, "\n".join(lines) + "\n\n" + format_table(rows)
