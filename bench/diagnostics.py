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
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from ingest import diagnostics
from ingest.funnel import deal_stats, rejections
from ingest.health import assess_health
from ingest.store import open_db, transaction

VIEWS = ["lease_health", "token_flow_hourly", "rejections_hourly", "funnel", "deal_freshness", "worker_activity",
         "checkpoint_progress"]


REASONS = [("accepted", "ok"), ("rejected", "not_below_average"), ("rejected", "no_sales"), ("rejected", "too_new"),
           ("incomplete", "no_history")]


def deal_rows(deals: int, span: float, now: float) -> Iterator[dict]:
    rng = random.Random(7)
    for i in range(deals):
        status, reason = rng.choice(REASONS)
        seen = now - rng.random() * span
        yield {"asin": f"{i:010d}", "status": status, "reason": reason, "first_seen": seen - 3600, "last_seen": seen,
               "last_fetched": seen, "source": "backfill", "fence": 1, "writer": "backfill"}


def decision_rows(deals: int, span: float, now: float) -> Iterator[dict]:
    rng = random.Random(8)
    for i in range(deals):
        for _ in range(3):
            outcome, reason = rng.choice(REASONS)
            yield {"at": now - rng.random() * span, "worker": "backfill", "asin": f"{i:010d}", "outcome": outcome,
                   "reason": reason, "fence": 1}


def call_rows(span: float, now: float) -> Iterator[dict]:
    """A Keepa call every 2 s over the span."""
    rng = random.Random(9)
    for k in range(int(span // 2)):
        yield {"at": now - span + 2 * k, "worker": rng.choice(["backfill", "upsert"]), "endpoint": "product",
               "asins": 100, "estimated": 100, "actual": 100, "status": "ok", "tokens_left": 500}


def lease_event_rows(days: int, now: float) -> Iterator[dict]:
    for h in range(days * 24):
        yield {"name": "backfill", "at": now - h * 3600, "event": "acquired", "fence": h + 1}


def build(path: Path, deals: int, days: int, now: float) -> None:
    """Seed the (migrated, idle) bench database through its own sqlite-utils connection:
    insert_all for the rows, inside the project's BEGIN IMMEDIATE transaction (sqlite-utils'
    atomic() would be a deferred BEGIN; its inserts nest as savepoints inside ours)."""
    span = days * 86400
    blob = zlib.compress(json.dumps({"csv": [list(range(0, 2000, 3))] * 4}).encode())
    seed = sqlite_utils.Database(path, recursive_triggers=False, execute_plugins=False)
    try:
        with transaction(seed.conn):
            seed["deals"].insert_all(deal_rows(deals, span, now), batch_size=500)
            seed.conn.execute("INSERT INTO product_history SELECT asin, last_seen, ? FROM deals", (blob,))
            seed["decisions"].insert_all(decision_rows(deals, span, now), batch_size=500)
            seed["keepa_calls"].insert_all(call_rows(span, now), batch_size=500)
            seed["lease_events"].insert_all(lease_event_rows(days, now))
    finally:
        seed.close()


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
        build(path, args.deals, args.days, now)
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
