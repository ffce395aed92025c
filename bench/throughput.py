"""Both workers against the simulator for a few minutes: what do the tokens buy?

    .venv/bin/python bench/throughput.py [--duration 180] [--rate 300] [--products 5000]

Runs `ingest run backfill` and `ingest run upsert` as real processes on one database against
the simulator (refill --rate tokens/min, starting with one minute of tokens), stops them with
SIGTERM, and prints: deals stored per 1,000 tokens (against the ideal of a product token per
deal plus a 5-token page per 150 deals, computed for the same run), the share of the tokens
made available (start + refilled) that was used, 429s, and the split of tokens between workers.
"""

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INGEST = str(Path(sys.executable).parent / "ingest")

CONFIG = """
[leases]
ttl_s = 10.0
renew_s = 3.0
retry_s = 1.0

[upsert]
poll_s = 60
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--rate", type=int, default=300)
    parser.add_argument("--products", type=int, default=5000)
    args = parser.parse_args()

    from ingest.simulator import SimConfig, Simulator

    folder = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    db = folder / "ingest.db"
    (folder / "ingest.toml").write_text(CONFIG)
    sim = Simulator(SimConfig(port=0, seed=5, refill_rate=args.rate, start_tokens=args.rate,
                              products=args.products)).start()
    env = dict(os.environ, KEEPA_BASE_URL=sim.url, KEEPA_API_KEY="bench-key-0000", INGEST_DB=str(db),
               INGEST_CONFIG=str(folder / "ingest.toml"))
    procs = {}
    for kind in ("backfill", "upsert"):
        procs[kind] = subprocess.Popen([INGEST, "run", kind], env=env, stdout=subprocess.DEVNULL,
                                       stderr=open(folder / f"{kind}.log", "wb"))
    started = time.monotonic()
    # Stop just before a refill tick (ticks come every 60 s from the simulator's start), so the
    # tokens counted as available are ones the workers had time to spend.
    run_for = max(58.0, (args.duration // 60) * 60 - 2)
    try:
        while time.monotonic() - started < run_for:
            time.sleep(max(0.0, min(15.0, run_for - (time.monotonic() - started))))
            print(f"  {time.monotonic() - started:5.0f} s: {stored(db)} deals stored, "
                  f"{sim.stats()['tokens']['consumed']} tokens consumed", flush=True)
    finally:
        codes = {}
        for kind, proc in procs.items():
            proc.send_signal(signal.SIGTERM)
        for kind, proc in procs.items():
            try:
                codes[kind] = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[kind] = "killed"
        stats = sim.stats()
        sim.stop()
    elapsed = time.monotonic() - started

    conn = sqlite3.connect(db)
    deals = conn.execute("SELECT count(*) FROM deals").fetchone()[0]
    by_status = dict(conn.execute("SELECT status, count(*) FROM deals GROUP BY status").fetchall())
    split = dict(conn.execute("SELECT worker, sum(coalesce(actual, 0)) FROM keepa_calls GROUP BY worker"))
    pages = stats["requests"].get("/deal", 0)
    tokens = stats["tokens"]
    available = args.rate + tokens["refilled"]
    consumed = tokens["consumed"]
    ideal = 1000 / (1 + 5 / 150)
    per_1000 = 1000 * deals / consumed if consumed else 0.0
    print()
    print(f"duration                    {elapsed:8.0f} s   (refill {args.rate}/min, {args.products} products)")
    print(f"deals stored                {deals:8d}     {json.dumps(by_status)}")
    print(f"tokens consumed             {consumed:8d}     of {available} made available (start + refilled)")
    print(f"deals per 1,000 tokens      {per_1000:8.1f}     ideal {ideal:.1f} (1 per product + 5 per 150-deal page): "
          f"{per_1000 / ideal:.2f}x")
    print(f"share of tokens used        {consumed / available:8.1%}")
    print(f"429s                        {stats['served_429']:8d}")
    print(f"deal pages fetched          {pages:8d}")
    total = sum(split.values()) or 1
    for worker, spent in sorted(split.items()):
        print(f"tokens spent by {worker:<11} {spent:8d}     {spent / total:.1%}")
    print(f"worker exit codes           {codes}")
    return 0


def stored(db: Path) -> int:
    try:
        conn = sqlite3.connect(db, timeout=5)
        return conn.execute("SELECT count(*) FROM deals").fetchone()[0]
    except sqlite3.Error:
        return 0


if __name__ == "__main__":
    sys.exit(main())
