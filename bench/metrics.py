"""How long does a Prometheus scrape take on the 100k-deal benchmark database? (target: < 50 ms)

    .venv/bin/python bench/metrics.py [--deals 100000] [--days 30] [--scrapes 50]

Seeds the database bench/diagnostics.py builds (100k deals, 300k decisions, 1.3M Keepa calls over
30 days), then times, over --scrapes runs each: the collector's reads alone (one read
transaction), one whole scrape as `ingest metrics print` makes it (open read-only, read, build
the text), and an HTTP GET of /metrics from `ingest metrics serve` in its own process. The
baseline, in the same run: the count(*) scans the running totals (v008) replace, and the
`ingest status` checks alone (part of every scrape). Last, what the triggers keeping those totals
add to a worker's write transaction (with and without them, alternating). Last, what the triggers keeping those totals add to
a worker's write transaction (with and without them, alternating).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from diagnostics import build

from ingest.health import assess_health
from ingest.backends import open_store
from ingest.metrics import IngestCollector, exposition, read_snapshot
from ingest.store import open_db

NO_SUPERVISOR = "/nonexistent/supervisord.conf"   # probe fails at once: time the database, not the RPC


def timed(label: str, fn, repeat: int) -> list[float]:
    fn()  # warm: the first run reads the pages from disk
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1000)
    runs.sort()
    p99 = runs[min(len(runs) - 1, int(len(runs) * 0.99))]
    print(f"  {label:<52} p50 {statistics.median(runs):8.2f} ms   p99 {p99:8.2f} ms   max {runs[-1]:8.2f} ms")
    return runs


def serve(path: Path) -> tuple[subprocess.Popen, str]:
    ingest = str(Path(sys.executable).parent / "ingest")
    proc = subprocess.Popen([ingest, "--db", str(path), "metrics", "serve", "--listen", "127.0.0.1:0",
                             "--supervisor-conf", NO_SUPERVISOR], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if "serving " not in line:
        proc.kill()
        raise SystemExit(f"ingest metrics serve did not start: {line}")
    return proc, line.split("serving ")[1].split()[0]


V008_ROW_TRIGGERS = ("decisions_count", "keepa_calls_count")


def write_cost(folder: Path, batches: int) -> None:
    """What the v008 triggers add to a worker's write transaction: 100 new deals, their 100
    decisions and one call-log row per BEGIN IMMEDIATE .. COMMIT, with the triggers and then,
    on a second file, without them (the baseline), alternating."""
    dbs = {}
    for label in ("with the v008 triggers", "without (baseline)"):
        conn = open_db(folder / f"write-{len(dbs)}.db")
        if label.startswith("without"):
            for name in V008_ROW_TRIGGERS:
                conn.execute(f"DROP TRIGGER {name}")
        dbs[label] = (conn, [])
    for k in range(batches):
        for label, (conn, runs) in dbs.items():
            rows = [(f"{k:05d}{i:05d}",) for i in range(100)]
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO deals (asin, status, reason, first_seen, last_seen, source, fence, writer)"
                             " VALUES (?, 'rejected', 'too_new', 1, 1, 'backfill', 1, 'backfill')", rows)
            conn.executemany("INSERT INTO decisions (at, worker, asin, outcome, reason, fence)"
                             " VALUES (1, 'backfill', ?, 'rejected', 'too_new', 1)", rows)
            conn.execute("INSERT INTO keepa_calls (at, worker, endpoint, asins, actual, status, http_status)"
                         " VALUES (1, 'backfill', 'product', 100, 100, 'ok', 200)")
            conn.execute("COMMIT")
            runs.append((time.perf_counter() - t0) * 1000)
    for label, (conn, runs) in dbs.items():
        runs.sort()
        print(f"  {label:<52} p50 {statistics.median(runs):8.2f} ms   p99 {runs[int(len(runs) * 0.99)]:8.2f} ms")
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deals", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--batches", type=int, default=300, help="write transactions for the trigger cost")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        conn = open_db(path)
        now = time.time()
        t0 = time.perf_counter()
        build(path, args.deals, args.days, now)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        calls = conn.execute("SELECT count(*) FROM keepa_calls").fetchone()[0]
        print(f"database: {args.deals} deals, {3 * args.deals} decisions, {calls} calls,"
              f" {os.path.getsize(path) / 2**20:.0f} MiB (built in {time.perf_counter() - t0:.1f} s); "
              f"load average {os.getloadavg()[0]:.1f}")
        n = args.scrapes
        print("baseline")
        timed("count(*) keepa_calls (what keepa_call_totals replaces)",
              lambda: conn.execute("SELECT count(*), sum(actual) FROM keepa_calls").fetchone(), max(5, n // 10))
        timed("count(*) decisions GROUP BY outcome, reason",
              lambda: conn.execute("SELECT outcome, reason, count(*) FROM decisions GROUP BY 1, 2").fetchall(),
              max(5, n // 10))
        timed("health.assess_health (ingest status checks)", lambda: assess_health(conn, now=now, supervisor=None), n)
        conn.close()
        print("scrape")
        ro = open_store(path).read_only()
        timed("read_snapshot (every figure, one read transaction)",
              lambda: read_snapshot(ro, path, time.time(), supervisor=None), n)
        timed("  of which deals GROUP BY status (deals_status index)",
              lambda: ro.execute("SELECT status, count(*) FROM deals GROUP BY 1").fetchall(), n)
        ro.close()
        collector = IngestCollector(path, supervisor_conf=NO_SUPERVISOR)
        runs = timed("whole scrape: open, read, text (ingest metrics print)", lambda: exposition(collector), n)
        proc, url = serve(path)
        try:
            http = timed("HTTP GET /metrics from ingest metrics serve",
                         lambda: urllib.request.urlopen(url, timeout=10).read(), n)
        finally:
            proc.terminate()
            proc.wait(10)
        size = len(exposition(collector))
        worst = max(statistics.median(runs), statistics.median(http))
        print(f"text: {size} bytes; target p50 < 50 ms: {'met' if worst < 50 else 'MISSED'} ({worst:.1f} ms)")
        print("write cost: one transaction of 100 new deals + 100 decisions + 1 call")
        write_cost(Path(tmp), args.batches)


if __name__ == "__main__":
    main()
