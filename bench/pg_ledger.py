"""Ledger reservations/s and lease heartbeat p99, SQLite and PostgreSQL side by side in one run.

    .venv/bin/python bench/pg_ledger.py [--procs 1,2,4] [--tokens 4000] [--renewals 300]

The same code (ingest.ledger, ingest.leases through ingest.backends) on both stores, on this
machine: an SQLite file in a temporary folder, and a PostgreSQL server that the bench starts
itself from the installed binaries (tests/pg_server.py; durable data files, commits not waiting
for their WAL flush: the promise of SQLite's WAL with synchronous = NORMAL) on a unix socket.

  reserve   N processes each reserve 1 token at a time as fast as they can until the ledger
            refuses (a starting balance of --tokens, no refill): reservations per second in all,
            p99 of one reservation, and over-admission (admitted - balance; must be 0)
  heartbeat --renewals Lease.renew() calls 5 ms apart: p50 and p99, alone, and while 2
            processes reserve tokens on the same store, --paced a second each (the real load
            is a few a second) and flat out (the worst case)
Needs psycopg (pip install -e '.[postgres]') and the server binaries; without them it prints
the SQLite figures and says why PostgreSQL was skipped.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/pg_server.py

NOW = 1_700_000_000.0
LOAD_SECONDS = 60.0  # the heartbeat's background reservers stop by themselves after this


def pct(values, p) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


# ---------------------------------------------------------------- one reserving process


def reserver(db: str, go: str, out: str, worker: str, seconds: float, per_s: float) -> None:
    """Reserve 1 token at a time until refused (or `seconds` pass), `per_s` a second (0: as fast
    as it can); write admitted, latencies and the monotonic start and end."""
    from ingest.clock import FakeClock
    from ingest.ledger import Ledger, ledger_connection
    from ingest.token_model import LedgerPolicy, Reservation

    ledger = Ledger(ledger_connection(db), "bench", LedgerPolicy(), FakeClock(wall=NOW))
    while not os.path.exists(go):
        time.sleep(0.001)
    latencies, admitted = [], 0
    started = time.monotonic()
    end, pause = started + seconds, 1 / per_s if per_s else 0.0
    while time.monotonic() < end:
        t = time.perf_counter()
        ok = isinstance(ledger.try_reserve(1, worker, "deal"), Reservation)
        latencies.append(time.perf_counter() - t)
        if not ok:
            break
        admitted += 1
        if pause:
            time.sleep(pause)
    Path(out).write_text(json.dumps({"admitted": admitted, "latencies": latencies, "start": started,
                                     "end": time.monotonic()}))


def start_reservers(db, workdir: Path, n: int, tokens: int, seconds: float, tag: str, per_s: float = 0.0):
    from ingest.backends import open_store
    from ingest.clock import FakeClock
    from ingest.ledger import Ledger
    from ingest.token_model import LedgerPolicy

    conn = open_store(db).open()
    Ledger(conn, "bench", LedgerPolicy(), FakeClock(wall=NOW)).set_state(
        balance=tokens, refill_rate=tokens / 60 + 1, next_tick=NOW + 3600)
    conn.close()
    go = workdir / f"go-{tag}"
    outs = [workdir / f"{tag}-{i}.json" for i in range(n)]
    procs = [subprocess.Popen([sys.executable, __file__, "--reserver", str(db), str(go), str(out), f"w{i}",
                               str(seconds), str(per_s)], cwd=ROOT) for i, out in enumerate(outs)]
    time.sleep(1.0)  # all connected and waiting for the go file
    go.write_text("go")
    return procs, outs


def stop(procs, timeout=120) -> None:
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def reserve_figures(db, workdir: Path, n: int, tokens: int) -> dict:
    procs, outs = start_reservers(db, workdir, n, tokens, seconds=300, tag=f"reserve{n}")
    stop(procs)
    results = [json.loads(o.read_text()) for o in outs]
    took = max(r["end"] for r in results) - min(r["start"] for r in results)
    admitted = sum(r["admitted"] for r in results)
    latencies = [x for r in results for x in r["latencies"]]
    return {"per_s": admitted / took, "p99_ms": pct(latencies, 99) * 1000, "over": admitted - tokens}


def renew_latencies(db, n: int) -> list[float]:
    from ingest.leases import Lease

    lease = Lease(db, "heartbeat-bench")
    assert lease.try_acquire()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        assert lease.renew()
        out.append(time.perf_counter() - t)
        time.sleep(0.005)
    lease.close()
    return out


def heartbeat_figures(db, workdir: Path, n: int, paced_per_s: float) -> dict:
    out = {"alone": renew_latencies(db, n)}
    for label, per_s in (("paced", paced_per_s), ("flat out", 0.0)):
        procs, _ = start_reservers(db, workdir, 2, tokens=10**9, seconds=LOAD_SECONDS, tag=f"load{per_s}",
                                   per_s=per_s)
        try:
            out[label] = renew_latencies(db, n)
        finally:
            for p in procs:
                p.kill()
            stop(procs)
    return {label: (pct(v, 50) * 1000, pct(v, 99) * 1000) for label, v in out.items()}


# ---------------------------------------------------------------- the run


def measure(name: str, db, workdir: Path, args) -> dict:
    workdir = workdir / name
    workdir.mkdir()
    figures = {"reserve": {}, "heartbeat": None}
    for n in args.procs:
        figures["reserve"][n] = reserve_figures(db, workdir, n, args.tokens)
        print(f"  {name}: {n} process(es) done", file=sys.stderr, flush=True)
    figures["heartbeat"] = heartbeat_figures(db, workdir, args.renewals, args.paced)
    return figures


def report(results: dict, args) -> None:
    names = list(results)
    print(f"ledger reservations ({args.tokens} tokens, 1 per reservation, until refused)")
    print(f"{'processes':>10} " + " ".join(f"{n + ' /s':>16} {n + ' p99':>14} {'over':>5}" for n in names))
    for n in args.procs:
        cells = []
        for name in names:
            r = results[name]["reserve"][n]
            cells.append(f"{r['per_s']:>16.0f} {r['p99_ms']:>11.2f} ms {r['over']:>5d}")
        print(f"{n:>10} " + " ".join(cells))
    print(f"\nlease heartbeat (Lease.renew, {args.renewals} renewals 5 ms apart), p50 / p99")
    print(f"{'':>36} " + " ".join(f"{n:>22}" for n in names))
    for key, label in (("alone", "alone"), ("paced", f"2 processes reserving {args.paced:g}/s each"),
                       ("flat out", "2 processes reserving flat out")):
        cells = [f"{results[n]['heartbeat'][key][0]:>8.2f} / {results[n]['heartbeat'][key][1]:>8.2f} ms" for n in names]
        print(f"{label:>36} " + " ".join(cells))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--reserver":
        db, go, out, worker, seconds, per_s = sys.argv[2:8]
        reserver(db, go, out, worker, float(seconds), float(per_s))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--tokens", type=int, default=4000)
    p.add_argument("--renewals", type=int, default=300)
    p.add_argument("--paced", type=float, default=20.0, help="reservations/s of each paced background process")
    args = p.parse_args()

    from tests.pg_server import PgServer, why_unavailable

    workdir = Path(tempfile.mkdtemp(prefix="ingest-bench-pg-"))
    results, server = {}, None
    try:
        results["sqlite"] = measure("sqlite", str(workdir / "bench.db"), workdir, args)
        reason = why_unavailable()
        if reason:
            print(f"PostgreSQL skipped: {reason}", file=sys.stderr)
        else:
            server = PgServer.start(durable=True)
            results["postgresql"] = measure("postgresql", server.create_database(), workdir, args)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
