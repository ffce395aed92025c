"""SQLite and PostgreSQL side by side in one run: ledger reservations/s, lease heartbeat p50/p99
and takeover time after kill -9 of a lease holder, each repeated, median and range.

    .venv/bin/python bench/pg_side_by_side.py [--reps 3] [--rounds 5] [--ttl 2 --renew 0.5 --retry 0.1]

The same code on both stores (ingest.ledger, ingest.leases through ingest.backends), on this
machine: an SQLite file in a temporary folder and a PostgreSQL server the bench starts from the
installed binaries (tests/pg_server.py, durable data files, synchronous_commit off: the promise
of SQLite's WAL with synchronous = NORMAL) on a unix socket.

  reserve    bench/pg_ledger.py's: N processes (1, 2, 4) reserve 1 token at a time until the
             ledger refuses; reservations/s in all, over-admission (must be 0)
  heartbeat  bench/pg_ledger.py's: Lease.renew() 5 ms apart, alone and while 2 processes
             reserve flat out on the same store; p50 / p99
  takeover   a holder process (tests/lease_worker.py hold: heartbeat every --renew, a fenced
             write every 0.2 s) is killed with SIGKILL at a random moment; a standby in this
             process, already polling try_acquire every --retry, takes the lease over:
             - same host: the standby sees the holder's pid dead (the dead-holder rule,
               taken_over_dead), so the lease is free within a retry interval;
             - remote: the standby runs as another host (its Identity names one), so it cannot
               ask the kernel about the holder's pid and waits for a TTL of silence of the row
               on its own monotonic clock (taken_over_expired), as a standby on a second
               machine does. The TTL runs from the holder's last renewal, up to --renew before
               the kill: expect TTL - renew .. TTL + retry.
             Time from the kill to the standby's successful try_acquire.
Needs psycopg (pip install -e '.[postgres]') and the server binaries; without them it prints
the SQLite figures and says why PostgreSQL was skipped.
"""

import argparse
import dataclasses
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))                # tests/pg_server.py, tests/lease_worker.py
sys.path.insert(0, str(ROOT / "bench"))      # bench/pg_ledger.py

import pg_ledger  # noqa: E402

LEASE = "takeover-bench"
HOLDER = ROOT / "tests" / "lease_worker.py"
PHASE = random.Random(17)  # the moment of the kill within a renewal interval


# ---------------------------------------------------------------- takeover after kill -9


def start_holder(db, timing) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(HOLDER), str(db), LEASE, "hold", "--ttl", str(timing.ttl_s),
                             "--renew", str(timing.renew_s), "--retry", str(timing.retry_s)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("ACQUIRED"):
            return proc
    proc.wait()
    raise RuntimeError(f"the holder exited ({proc.returncode}) before it held the lease")


def last_event(db) -> str:
    from ingest.backends import open_store

    conn = open_store(db).connect()
    try:
        return conn.execute("SELECT event FROM lease_events WHERE name = ? ORDER BY id DESC LIMIT 1",
                            (LEASE,)).fetchone()[0]
    finally:
        conn.close()


def takeover_round(db, timing, remote: bool) -> tuple[float, str]:
    """(seconds from the kill -9 to the standby's takeover, the event it recorded)."""
    from ingest.leases import Lease
    from ingest.procinfo import Identity

    identity = dataclasses.replace(Identity.current(), host="standby-host") if remote else None
    holder = start_holder(db, timing)
    standby = Lease(db, LEASE, timing, identity=identity)
    took = threading.Event()
    at = {}

    def poll() -> None:  # the standby, polling as a worker waiting for its lease does
        while not standby.try_acquire():
            time.sleep(timing.retry_s)
        at["acquired"] = time.monotonic()
        took.set()

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        time.sleep(timing.renew_s * 2 + PHASE.uniform(0, timing.renew_s))  # watching, holder renewing
        if took.is_set():
            raise RuntimeError("the standby took a live holder's lease")
        killed = time.monotonic()
        holder.send_signal(signal.SIGKILL)
        if not took.wait(timing.ttl_s * 3 + 5):
            raise RuntimeError("no takeover within 3 TTLs")
        return at["acquired"] - killed, last_event(db)
    finally:
        holder.kill()
        holder.wait()
        watcher.join(timing.ttl_s * 3 + 5)
        standby.close()  # releases the lease for the next round's holder


def takeover_figures(db, timing, rounds: int) -> dict:
    out = {}
    for remote in (False, True):
        times, events = [], set()
        for _ in range(rounds):
            t, event = takeover_round(db, timing, remote)
            times.append(t)
            events.add(event)
        out["remote" if remote else "same host"] = {"seconds": times, "events": sorted(events)}
    return out


# ---------------------------------------------------------------- the run


def measure(name: str, db, workdir: Path, args, timing) -> dict:
    folder = workdir / name
    folder.mkdir()
    reps = []
    for rep in range(args.reps):
        rep_dir = folder / f"rep{rep}"
        rep_dir.mkdir()
        figures = {"reserve": {n: pg_ledger.reserve_figures(db, rep_dir, n, args.tokens) for n in args.procs},
                   "heartbeat": heartbeat(db, rep_dir, args.renewals)}
        reps.append(figures)
        print(f"  {name}: repetition {rep + 1} of {args.reps} done", file=sys.stderr, flush=True)
    takeover = takeover_figures(db, timing, args.rounds)
    print(f"  {name}: takeovers done", file=sys.stderr, flush=True)
    return {"reps": reps, "takeover": takeover}


def heartbeat(db, workdir: Path, renewals: int) -> dict:
    """p50 / p99 (ms) of Lease.renew alone, and while 2 processes reserve flat out."""
    alone = pg_ledger.renew_latencies(db, renewals)
    procs, _ = pg_ledger.start_reservers(db, workdir, 2, tokens=10**9, seconds=pg_ledger.LOAD_SECONDS,
                                         tag="load", per_s=0.0)
    try:
        loaded = pg_ledger.renew_latencies(db, renewals)
    finally:
        for p in procs:
            p.kill()
        pg_ledger.stop(procs)
    return {label: (pg_ledger.pct(v, 50) * 1000, pg_ledger.pct(v, 99) * 1000)
            for label, v in (("alone", alone), ("flat out", loaded))}


def spread(values, fmt: str) -> str:
    """median (min-max)."""
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def rows(results: dict, args, timing) -> list[tuple[str, list[str]]]:
    out = []
    for n in args.procs:
        out.append((f"reservations/s, {n} process{'es' if n > 1 else ''}",
                    [spread([r["reserve"][n]["per_s"] for r in res["reps"]], ",.0f") for res in results.values()]))
    out.append(("over-admission (all runs)",
                [str(sum(r["reserve"][n]["over"] for r in res["reps"] for n in args.procs)) for res in results.values()]))
    for key, label in (("alone", "alone"), ("flat out", "2 processes reserving flat out")):
        for i, p in ((0, "p50"), (1, "p99")):
            out.append((f"heartbeat {p} ms, {label}",
                        [spread([r["heartbeat"][key][i] for r in res["reps"]], ".2f") for res in results.values()]))
    for key, label in (("same host", "same host (dead holder)"), ("remote", f"remote (TTL {timing.ttl_s:g} s)")):
        out.append((f"takeover s after kill -9, {label}",
                    [spread(res["takeover"][key]["seconds"], ".2f") for res in results.values()]))
        out.append(("  event", [", ".join(res["takeover"][key]["events"]) for res in results.values()]))
    return out


def report(results: dict, args, timing) -> None:
    table = rows(results, args, timing)
    width = max(len(label) for label, _ in table) + 2
    cell = max(24, *(len(c) + 2 for _, cells in table for c in cells))
    print(f"\n{args.reps} repetitions (reservations, heartbeat) and {args.rounds} takeovers of each kind per store;"
          " median (min-max)")
    print(f"lease TTL {timing.ttl_s:g} s, renew {timing.renew_s:g} s, retry {timing.retry_s:g} s;"
          f" {args.tokens} tokens per reservation run; {args.renewals} renewals 5 ms apart")
    print(f"load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)\n")
    print(" " * width + "".join(f"{name:>{cell}}" for name in results))
    for label, cells in table:
        print(f"{label:<{width}}" + "".join(f"{c:>{cell}}" for c in cells))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--reserver":  # never reached: pg_ledger.py runs those
        return pg_ledger.main()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, help="takeovers of each kind per store")
    p.add_argument("--procs", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--tokens", type=int, default=4000)
    p.add_argument("--renewals", type=int, default=300)
    p.add_argument("--ttl", type=float, default=2.0)
    p.add_argument("--renew", type=float, default=0.5)
    p.add_argument("--retry", type=float, default=0.1)
    args = p.parse_args()

    from ingest.leases import LeaseTiming
    from tests.pg_server import PgServer, why_unavailable

    timing = LeaseTiming(args.ttl, args.renew, args.retry)
    workdir = Path(tempfile.mkdtemp(prefix="ingest-bench-side-"))
    results, server = {}, None
    try:
        results["SQLite"] = measure("sqlite", str(workdir / "bench.db"), workdir, args, timing)
        reason = why_unavailable()
        if reason:
            print(f"PostgreSQL skipped: {reason}", file=sys.stderr)
        else:
            server = PgServer.start(durable=True)
            results["PostgreSQL"] = measure("postgresql", server.create_database(), workdir, args, timing)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, args, timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
