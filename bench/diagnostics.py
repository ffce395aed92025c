"""How long do `ingest status` / `diagnose stall` / `deals stats` / the views take on a big database?

    .venv/bin/python bench/diagnostics.py [--deals 100000] [--days 30]

Builds a database with --deals deals (compressed ~4 KB histories), 3 decisions per deal over
--days days, a Keepa call every 2 s for --days days (the call log's retention), and a lease event
per hour. Then times each in the same run; the baseline is a full scan (`count(*)` of decisions
and of keepa_calls), the cheapest thing that touches every row.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest import diagnostics  # noqa: E402
from ingest.funnel import deal_stats, rejections  # noqa: E402
from ingest.health import assess_health  # noqa: E402
from ingest.store import open_db, transaction  # noqa: E402

VIEWS = ["lease_health", "token_flow_hourly", "rejections_hourly", "funnel", "deal_freshness", "worker_activity",
         "checkpoint_progress"]


def build(conn, deals: int, days: int, now: float) -> None:
    rng = random.Random(7)
    span = days * 86400
    blob = zlib.compress(json.dumps({"csv": [list(range(0, 2000, 3))] * 4}).encode())
    reasons = [("accepted", "ok"), ("rejected", "not_below_average"), ("rejected", "no_sales"),
               ("rejected", "too_new"), ("incomplete", "no_history")]
    with transaction(conn):
        for i in range(deals):
            asin = f"{i:010d}"
            status, reason = rng.choice(reasons)
            seen = now - rng.random() * span
            conn.execute("INSERT INTO deals (asin, status, reason, first_seen, last_seen, last_fetched, source, fence,"
                         " writer) VALUES (?, ?, ?, ?, ?, ?, 'backfill', 1, 'backfill')",
                         (asin, status, reason, seen - 3600, seen, seen))
            conn.execute("INSERT INTO product_history VALUES (?, ?, ?)", (asin, seen, blob))
            for _ in range(3):
                outcome, why = rng.choice(reasons)
                conn.execute("INSERT INTO decisions (at, worker, asin, outcome, reason, fence) VALUES (?, 'backfill', ?, ?, ?, 1)",
                             (now - rng.random() * span, asin, outcome, why))
        t = now - span
        while t < now:
            conn.execute("INSERT INTO keepa_calls (at, worker, endpoint, asins, estimated, actual, status, tokens_left)"
                         " VALUES (?, ?, 'product', 100, 100, 100, 'ok', 500)", (t, rng.choice(["backfill", "upsert"])))
            t += 2
        for h in range(days * 24):
            conn.execute("INSERT INTO lease_events (name, at, event, fence) VALUES ('backfill', ?, 'acquired', ?)",
                         (now - h * 3600, h + 1))


def timed(label: str, fn, repeat: int = 3) -> None:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    print(f"  {label:<40} {best * 1000:9.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deals", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        conn = open_db(path)
        now = time.time()
        t0 = time.perf_counter()
        build(conn, args.deals, args.days, now)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        calls = conn.execute("SELECT count(*) FROM keepa_calls").fetchone()[0]
        size = os.path.getsize(path) / 2**20
        print(f"database: {args.deals} deals, {3 * args.deals} decisions, {calls} calls, {size:.0f} MiB"
              f" (built in {time.perf_counter() - t0:.1f} s); SQLite {diagnostics.sqlite3.sqlite_version}")
        print("baseline")
        timed("count(*) decisions (full scan)", lambda: conn.execute("SELECT count(*) FROM decisions").fetchone())
        timed("count(*) keepa_calls (full scan)", lambda: conn.execute("SELECT count(*) FROM keepa_calls").fetchone())
        print("commands")
        timed("health.assess_health (ingest status checks)", lambda: assess_health(conn, now=now, supervisor=None))
        env = diagnostics.Environment(path)
        timed("diagnose stall, all checks", lambda: diagnostics.diagnose_stall(conn, path, now=now, env=env), 1)
        timed("  of which integrity_check", lambda: conn.execute("PRAGMA integrity_check").fetchall(), 1)
        timed("  quick_check instead", lambda: conn.execute("PRAGMA quick_check").fetchall(), 1)
        timed("deals stats --since 24h", lambda: deal_stats(conn, now, 86400))
        timed("deals stats --since 30d", lambda: deal_stats(conn, now, 30 * 86400))
        timed("deals rejections --since 1h", lambda: rejections(conn, now, 3600))
        print("views (SELECT * ... all rows)")
        for view in VIEWS:
            timed(view, lambda v=view: conn.execute(f"SELECT * FROM {v}").fetchall())
        conn.close()


if __name__ == "__main__":
    main()
