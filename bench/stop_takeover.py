"""kill -STOP of the backfill lease holder under a real supervisord with the watchdog: how long
until a new backfill process holds the lease. Baseline, in the same run: kill -9 of the holder
(supervisord restarts it; the new process takes a dead holder's lease at once).

    .venv/bin/python bench/stop_takeover.py [--rounds 10] [--ttl 10 --renew 3 --retry 0.5]

The project is a throwaway copy run by supervisord (tests/supervised.py) against the in-process
simulator, with a short lease TTL from its ingest.toml. Before the watchdog, a stopped holder
was never replaced (one backfill process, nothing takes an alive holder's lease until it expires,
and the stopped process keeps it "alive"); the bound the watchdog aims for is TTL + 10 s.
Each round waits for both workers to hold their leases and a random 0-5 s (the moment between
two watchdog ticks), sends the signal to the holder, and polls the lease row every 50 ms until a
different pid holds it. For kill -STOP it also prints when the watchdog's kill came (its
watch_actions row): the rest is the kill -9 path (supervisord's restart, start-up, takeover).
"""

import argparse
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest.simulator import SimConfig, Simulator  # noqa: E402
from tests.supervised import SupervisedProject  # noqa: E402

WORKERS = ("backfill", "upsert")
TICK_S = 5.0
# without it a round's signal lands at the same moment after a tick every time: the restarted
# process is RUNNING (startsecs 3 s) about 4 s after the tick that killed the last one
PHASE = random.Random(1)


def toml(ttl: float, renew: float, retry: float) -> str:
    return (f"[leases]\nttl_s = {ttl}\nrenew_s = {renew}\nretry_s = {retry}\n\n[backfill]\npass_pause_s = 1\n\n"
            "[metrics]\nlisten = \"127.0.0.1:0\"\n")


def holder(project: SupervisedProject) -> int | None:
    row = project.lease("backfill") if project.db_path.exists() else None
    return row["holder_pid"] if row else None


def killed_at(project: SupervisedProject, pid: int) -> float | None:
    """When the watchdog killed `pid` (its watch_actions row, written once the kill is done)."""
    rows = project.query("SELECT at FROM watch_actions WHERE pid = ? AND action = 'kill_stopped'", pid)
    return rows[0][0] if rows else None


def one_round(project: SupervisedProject, sig: int, timeout: float) -> tuple[float, float | None]:
    """(seconds until a new holder, seconds until the watchdog's kill or None)."""
    states = project.wait_running(*WORKERS, "watch", timeout=60)
    pid = states["backfill"]["pid"]
    project.wait_held_by("backfill", pid, timeout=60)
    time.sleep(PHASE.uniform(0, TICK_S))   # a random moment between two watchdog ticks
    began, wall = time.monotonic(), time.time()
    os.kill(pid, sig)
    try:
        project.wait(lambda: holder(project) not in (None, pid), timeout, "a new backfill holder", 0.05)
        took = time.monotonic() - began
        if sig != signal.SIGSTOP:
            return took, None
        at = project.wait(lambda: killed_at(project, pid), 30, "the watchdog's action row", 0.1)
        return took, at - wall
    finally:
        if sig == signal.SIGSTOP:
            try:
                os.kill(pid, signal.SIGCONT)  # if the watchdog did not kill it, do not leave it stopped
            except ProcessLookupError:
                pass


def measure(project: SupervisedProject, sig: int, rounds: int, timeout: float) -> list[tuple[float, float | None]]:
    out = []
    for i in range(rounds):
        took, kill = one_round(project, sig, timeout)
        out.append((took, kill))
        seen = f" (killed by the watchdog after {kill:.2f}s)" if kill is not None else ""
        print(f"  {signal.Signals(sig).name} round {i + 1}: {took:.2f}s{seen}", flush=True)
        time.sleep(1.0)
    return out


def summary(name: str, times: list[float]) -> str:
    return (f"{name:<10} median {statistics.median(times):6.2f}s  min {min(times):6.2f}s  max {max(times):6.2f}s"
            f"  (n={len(times)})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--ttl", type=float, default=10.0)
    parser.add_argument("--renew", type=float, default=3.0)
    parser.add_argument("--retry", type=float, default=0.5)
    args = parser.parse_args(argv)

    sim = Simulator(SimConfig(port=0, refill_rate=6000, products=60_000, seed=3)).start()
    project = SupervisedProject(sim.url, toml=toml(args.ttl, args.renew, args.retry))
    try:
        project.script("start", timeout=60)
        bound = args.ttl + 10
        print(f"lease TTL {args.ttl:g}s, renew {args.renew:g}s, retry {args.retry:g}s; watchdog tick 5s;"
              f" bound for a stopped holder: TTL + 10s = {bound:g}s")
        stopped = measure(project, signal.SIGSTOP, args.rounds, timeout=bound + 30)
        killed = measure(project, signal.SIGKILL, args.rounds, timeout=bound + 30)
        load = os.getloadavg()[0]
        print()
        took = [t for t, _ in stopped]
        print(summary("kill -STOP", took) + f"   within the bound: {sum(t < bound for t in took)}/{len(took)}")
        print(summary("  of which until the watchdog's kill", [k for _, k in stopped]))
        print(summary("kill -9", [t for t, _ in killed]))
        print(f"load average at the end: {load:.1f} ({os.cpu_count()} cores)")
    finally:
        project.close()
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
