"""Lease figures: takeover time, heartbeat latency under write load, operations per second.

    .venv/bin/python bench/leases.py [--rounds 20] [--ttl 30 --renew 10 --retry 2]

Each figure comes with a baseline measured in the same run:
  takeover after kill -9 / SIGTERM   vs  takeover of a SIGSTOPped (alive, silent) holder: the TTL path
  heartbeat p50/p99 with a writer    vs  the same heartbeat with no other writer
  acquire / renew ops per second     vs  a bare BEGIN IMMEDIATE + one-row UPDATE + COMMIT
Takeover times are contender's CLOCK_MONOTONIC at acquisition minus ours at the signal (one host).
"""

import argparse
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ingest.leases import Lease, LeaseTiming
from ingest.store import open_db, transaction

ROOT = Path(__file__).resolve().parent.parent

HELPER = str(ROOT / "tests" / "lease_worker.py")


def mono() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class Worker:
    def __init__(self, db, timing: LeaseTiming):
        self.proc = subprocess.Popen(
            [sys.executable, HELPER, db, "bench", "hold", "--ttl", str(timing.ttl_s), "--renew",
             str(timing.renew_s), "--retry", str(timing.retry_s), "--write-every", "0.5"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(l.split()) for l in self.proc.stdout], daemon=True).start()

    def expect(self, word, timeout=120.0):
        end = mono() + timeout
        while True:
            parts = self.lines.get(timeout=max(0.01, end - mono()))
            if parts[0] == word:
                return parts

    def end(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


def takeovers(db, timing, signum, rounds) -> list[float]:
    """A chain: the holder gets `signum` while a fresh contender polls; the contender is the next holder."""
    holder = Worker(db, timing)
    holder.expect("ACQUIRED")
    times = []
    try:
        for _ in range(rounds):
            contender = Worker(db, timing)
            contender.expect("READY")
            # it has looked at least once and is polling; a random phase within its retry interval
            time.sleep(timing.retry_s * (1 + random.random()))
            sent = mono()
            os.kill(holder.proc.pid, signum)
            times.append(float(contender.expect("ACQUIRED")[2]) - sent)
            holder.end()
            holder = contender
    finally:
        holder.end()
    return times


def renew_latencies(lease: Lease, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        assert lease.renew()
        out.append(time.perf_counter() - t)
        time.sleep(0.005)
    return out


WRITER = """
import sqlite3, sys, time
from ingest.store import connect, transaction
conn = connect(sys.argv[1])
conn.execute("CREATE TABLE IF NOT EXISTS load (id INTEGER PRIMARY KEY, payload TEXT)")
n = 0
start = time.monotonic()
while time.monotonic() - start < float(sys.argv[2]):
    with transaction(conn):
        conn.executemany("INSERT INTO load (payload) VALUES (?)", [("x" * 200,)] * 50)
    n += 1
print(n / (time.monotonic() - start), flush=True)
"""


def pct(values, p) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


def heartbeat_figures(db, n=400):
    lease = Lease(db, "heartbeat-bench")
    assert lease.try_acquire()
    quiet = renew_latencies(lease, n)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, db, "30"], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    time.sleep(0.5)
    loaded = renew_latencies(lease, n)
    writer.kill()
    writer.wait()
    lease.release()
    return quiet, loaded


def rate(fn, seconds=2.0) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def ops_figures(db):
    conn = open_db(db)
    with transaction(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER)")
        conn.execute("INSERT OR IGNORE INTO counter VALUES (1, 0)")

    def bare():
        with transaction(conn):
            conn.execute("UPDATE counter SET n = n + 1 WHERE id = 1")

    holder, contender = Lease(db, "ops-bench"), Lease(db, "ops-bench")
    assert holder.try_acquire()
    figures = {
        "bare BEGIN IMMEDIATE/UPDATE/COMMIT (baseline)": rate(bare),
        "renew": rate(holder.renew),
        "try_acquire refused (held by a live holder)": rate(contender.try_acquire),
    }
    holder.release()
    cycler = Lease(db, "ops-bench")

    def cycle():
        cycler.try_acquire()
        cycler.release()

    figures["try_acquire + release of a free lease (pairs)"] = rate(cycle)
    return figures


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--ttl", type=float, default=30.0)
    p.add_argument("--renew", type=float, default=10.0)
    p.add_argument("--retry", type=float, default=2.0)
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # figures appear as they are measured
    timing = LeaseTiming(args.ttl, args.renew, args.retry)
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "bench.db")
        open_db(db).close()
        print(f"lease timing: ttl {timing.ttl_s:g}s, renew {timing.renew_s:g}s, retry {timing.retry_s:g}s; "
              f"sqlite WAL, synchronous=NORMAL, {os.cpu_count()} cpus")

        print("\ntakeover time (signal to contender holding the lease)")
        for label, signum, rounds in [("kill -9 of the holder", signal.SIGKILL, args.rounds),
                                      ("SIGTERM (holder releases)", signal.SIGTERM, args.rounds),
                                      ("SIGSTOP (baseline: alive but silent, TTL path)", signal.SIGSTOP, 1)]:
            t = takeovers(db, timing, signum, rounds)
            print(f"  {label:48s} median {statistics.median(t):7.3f}s  min {min(t):.3f}s  max {max(t):.3f}s  (n={len(t)})")

        print("\nheartbeat transaction (one renew(): BEGIN IMMEDIATE, check, UPDATE, COMMIT)")
        quiet, loaded = heartbeat_figures(db)
        print(f"  no other writer (baseline)                   p50 {ms(pct(quiet, 50))}  p99 {ms(pct(quiet, 99))}")
        print(f"  another process writing 50-row txns nonstop  p50 {ms(pct(loaded, 50))}  p99 {ms(pct(loaded, 99))}"
              f"  max {ms(max(loaded))}")

        print("\noperations per second (one process)")
        for label, value in ops_figures(db).items():
            print(f"  {label:48s} {value:9.0f}/s")


if __name__ == "__main__":
    main()
