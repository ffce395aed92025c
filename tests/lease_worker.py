"""A small lease-holding process for the multi-process lease tests and bench/leases.py.

    python tests/lease_worker.py DB NAME hold     [--ttl 3 --renew 1 --retry 0.2 --write-every 0.2]
    python tests/lease_worker.py DB NAME contend  --rounds 30

DB is an SQLite file or a postgresql:// URL (ingest.backends.open_store).

It prints one line per event on stdout, with CLOCK_MONOTONIC readings (system-wide, so the test
process can compare them with its own):
    READY <mono>                       about to contend
    ACQUIRED <fence> <mono> <attempts>
    RELEASED <fence> <mono>            (contend: just before release; hold: after SIGTERM's release)
    LOST <fence> <mono> <how>          how = fenced (a fenced write was refused) | heartbeat; exit 5
    WRITE_FAILED <mono>                a fenced write failed (StoreError) and is tried again: on
                                       PostgreSQL, the session of a holder stopped inside it was
                                       ended by the server (idle_in_transaction_session_timeout)

Every fenced write inserts (fence, pid, mono) into lease_work, so the tests can check that the
writes of successive holders never interleave.
"""

import argparse
import os
import random
import signal
import sys
import threading
import time

from ingest.errors import EXIT_LEASE_LOST, StoreError
from ingest.leases import Lease, LeaseLost, LeaseTiming
from ingest.backends import open_store, transaction

# id: commit order of the fenced writes (successive holders' writes are serialised by the lease)
WORK_TABLE = {
    "sqlite": ["CREATE TABLE IF NOT EXISTS lease_work (id INTEGER PRIMARY KEY, fence INTEGER, pid INTEGER, mono REAL)"],
    "postgresql": [
        "SELECT pg_advisory_xact_lock(4242)",  # two workers starting at once: one CREATE at a time
        "CREATE TABLE IF NOT EXISTS lease_work (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " fence BIGINT, pid BIGINT, mono DOUBLE PRECISION)",
    ],
}


def mono() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def say(*parts) -> None:
    print(*parts, flush=True)


def wait_for_lease(lease: Lease, timing: LeaseTiming, stop: threading.Event) -> int | None:
    """try_acquire every retry_s; returns the number of attempts, None when stopped."""
    attempts = 0
    while not stop.is_set():
        attempts += 1
        if lease.try_acquire():
            return attempts
        stop.wait(timing.retry_s)
    return None


def fenced_write(lease: Lease, conn) -> None:
    with lease.fenced(conn) as c:
        c.execute("INSERT INTO lease_work (fence, pid, mono) VALUES (?, ?, ?)", (lease.fence, os.getpid(), mono()))


def hold(lease: Lease, timing: LeaseTiming, conn, write_every: float) -> int:
    stop = threading.Event()
    # the handler only sets a flag: release() runs on the main path below, outside any transaction
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    say("READY", mono())
    attempts = wait_for_lease(lease, timing, stop)
    if attempts is None:
        return 0
    say("ACQUIRED", lease.fence, mono(), attempts)
    lease.start_heartbeat()
    try:
        while not stop.is_set():
            if lease.lost.is_set():
                say("LOST", lease.fence, mono(), "heartbeat")
                return EXIT_LEASE_LOST
            try:
                fenced_write(lease, conn)
            except StoreError:  # rolled back whole: the step runs again, as a worker's would
                say("WRITE_FAILED", mono())
            stop.wait(write_every)
    except LeaseLost:
        say("LOST", lease.fence, mono(), "fenced")
        return EXIT_LEASE_LOST
    fence = lease.fence
    lease.release()
    say("RELEASED", fence, mono())
    return 0


def contend(lease: Lease, timing: LeaseTiming, conn, rounds: int) -> int:
    never = threading.Event()
    for _ in range(rounds):
        say("READY", mono())
        attempts = wait_for_lease(lease, timing, never)
        say("ACQUIRED", lease.fence, mono(), attempts)
        lease.start_heartbeat()
        for _ in range(3):
            fenced_write(lease, conn)
            time.sleep(random.uniform(0, 0.005))
        say("RELEASED", lease.fence, mono())
        lease.release()
        time.sleep(random.uniform(0, 0.02))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("db")
    p.add_argument("name")
    p.add_argument("mode", choices=["hold", "contend"])
    p.add_argument("--ttl", type=float, default=3.0)
    p.add_argument("--renew", type=float, default=1.0)
    p.add_argument("--retry", type=float, default=0.2)
    p.add_argument("--write-every", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    timing = LeaseTiming(args.ttl, args.renew, args.retry)
    store = open_store(args.db)
    conn = store.open()
    with transaction(conn):
        for statement in WORK_TABLE[store.backend.name]:
            conn.execute(statement)
    lease = Lease(store, args.name, timing)
    if args.mode == "hold":
        return hold(lease, timing, conn, args.write_every)
    return contend(lease, timing, conn, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
