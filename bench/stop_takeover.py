"""kill -STOP of the backfill lease holder under a real supervisord with the watchdog: how long
until a new backfill process holds the lease. Baseline, in the same run: kill -9 of the holder
(supervisord restarts it; the new process takes a dead holder's lease at once).

    .venv/bin/python bench/stop_takeover.py [--rounds 10] [--ttl 10 --renew 3 --retry 0.5]

The project is a throwaway copy run by supervisord (tests/supervised.py) against the in-process
simulator, with a short lease TTL from its ingest.toml. Before the watchdog, a stopped holder
was never replaced (one backfill process, nothing takes an alive holder's lease until it expires,
and the stopped process keeps it "alive"); the bound the watchdog aims for is TTL + 10 s.
Each round waits for both workers to hold their leases, sends the signal to the holder, and
polls the lease row every 50 ms until a different pid holds it.
"""

import argparse
import os
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


def toml(ttl: float, renew: float, retry: float) -> str:
    return (f"[leases]\nttl_s = {ttl}\nrenew_s = {renew}\nretry_s = {retry}\n\n[backfill]\npass_pause_s = 1\n\n"
            "[metrics]\nlisten = \"127.0.0.1:0\"\n")


def holder(project: SupervisedProject) -> int | None:
    row = project.lease("backfill") if project.db_path.exists() else None
    return row["holder_pid"] if row else None


def one_round(project: SupervisedProject, sig: int, timeout: float) -> float:
    states = project.wait_running(*WORKERS, "watch", timeout=60)
    pid = states["backfill"]["pid"]
    project.wait_held_by("backfill", pid, timeout=60)
    began = time.monotonic()
    os.kill(pid, sig)
    try:
        project.wait(lambda: holder(project) not in (None, pid), timeout, "a new backfill holder", 0.05)
        return time.monotonic() - began
    finally:
        if sig == signal.SIGSTOP:
            try:
                os.kill(pid, signal.SIGCONT)  # if the watchdog did not kill it, do not leave it stopped
            except ProcessLookupError:
                pass


def measure(project: SupervisedProject, sig: int, rounds: int, timeout: float) -> list[float]:
    out = []
    for i in range(rounds):
        took = one_round(project, sig, timeout)
        out.append(took)
        print(f"  {signal.Signals(sig).name} round {i + 1}: {took:.2f}s", flush=True)
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
        kills = project.query("SELECT count(*) FROM watch_actions WHERE action = 'kill_stopped'")[0][0]
        print()
        print(summary("kill -STOP", stopped) + f"   within the bound: {sum(t < bound for t in stopped)}/{len(stopped)}")
        print(summary("kill -9", killed))
        print(f"watchdog kill_stopped actions recorded: {kills}")
    finally:
        project.close()
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
