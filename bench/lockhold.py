"""How long does a fenced batch commit hold SQLite's write lock? Target: p99 <= 5 ms for 100 products.

While one worker holds the write lock (BEGIN IMMEDIATE .. COMMIT), the other worker's lease
heartbeat and every token reservation of the ledger wait. The hold is measured from the moment
BEGIN IMMEDIATE is sent to SQLite to the return of COMMIT, for 100-product
batches, each batch new ASINs (as backfill stores them), on a real lease and database file.
Two kinds of products (--histories): `sim`, what the simulator serves (~13 KB of JSON, 5 KB
compressed) and `long`, bench/analytics.py's 3-year used-book histories (~72 KB, 26 KB
compressed: 2.6 MB per batch to write):

  after:    Worker.commit_batch: products evaluated and compressed before the transaction,
            one query for the batch's retry counts inside it (the code the workers run)
  baseline: the previous way, kept here only: evaluate_deal and zlib inside the transaction,
            one SELECT per ASIN

Both run in one process, interleaved (ABAB...), so load from other work hits both alike.
The WAL auto-checkpoint SQLite runs inside COMMIT's call, after the write lock is released
(sqlite3_wal_hook), is not lock hold: the bench connection checkpoints (PASSIVE) after each
commit instead, outside the timing, as often as the auto-checkpoint would.

    .venv/bin/python bench/lockhold.py [--histories sim|long|both] [--commits 40] [--batch 100] [--seed 1]
"""

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.analytics import NOW, synthetic_product  # noqa: E402

from ingest import deals  # noqa: E402
from ingest.analytics import evaluate_deal  # noqa: E402
from ingest.clock import FakeClock  # noqa: E402
from ingest import leases  # noqa: E402
from ingest.leases import Lease  # noqa: E402
from ingest.store import open_db  # noqa: E402
from ingest.workers.backfill import BackfillWorker  # noqa: E402


class LockTimer:
    """Wraps the store.transaction the lease's fenced commits use: the time from just before
    BEGIN IMMEDIATE until COMMIT returned, of the last transaction. (A sqlite3 trace callback
    would be exact but expands every bound blob into SQL text, which itself costs milliseconds.)"""

    def __init__(self):
        self.seconds = None
        original = leases.transaction
        timer = self

        @contextmanager
        def timed(conn, **kwargs):
            began = time.perf_counter()
            try:
                with original(conn, **kwargs):
                    yield
            finally:
                timer.seconds = time.perf_counter() - began

        leases.transaction = timed

    def held(self) -> float:
        return self.seconds


def old_commit_batch(worker: BackfillWorker, asins, products) -> None:
    """The baseline: the CPU work inside the write transaction, as commit_batch did before."""
    at = datetime.fromtimestamp(worker.clock.wall(), tz=timezone.utc)
    with worker.commit("bench baseline", "backfill") as (conn, ctx):
        counts = {s: 0 for s in deals.STATUSES}
        for asin in asins:
            evaluation = evaluate_deal(products[asin], at, worker.params)
            counts[deals.record_evaluation(conn, ctx, asin, None, products[asin], evaluation,
                                           worker.settings.retry_backoff)] += 1
        deals.update_progress(conn, worker.name, ctx.now, state="working", last_commit_at=ctx.now,
                              last_success_at=ctx.now, counters=counts)


def batch(products: list[dict], label: str) -> tuple[list[str], dict[str, dict]]:
    """The same histories under new ASINs: every commit inserts, as a backfill page does."""
    renamed = {f"{label}{i:05d}": {**p, "asin": f"{label}{i:05d}"} for i, p in enumerate(products)}
    return list(renamed), renamed


def percentile(seconds: list[float], p: float) -> float:
    """Nearest rank: a value that was measured (never above the max)."""
    ordered = sorted(seconds)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered)) - 1))]


def figures(seconds: list[float]) -> str:
    return "   ".join(f"{label} {percentile(seconds, p) * 1000:7.2f} ms"
                       for label, p in (("p50", 50), ("p99", 99), ("max", 100)))


def sim_products(count: int, seed: int) -> tuple[list[dict], float]:
    """The simulator's products as of now (and now, to evaluate them at)."""
    from ingest.keepatime import unix_seconds_to_keepa_minutes
    from ingest.simulator.catalogue import Catalogue
    from ingest.simulator.products import ProductOptions, build_product

    now = time.time()
    minute = unix_seconds_to_keepa_minutes(now)
    catalogue = Catalogue(seed, count, minute)
    return [build_product(catalogue, i, minute, ProductOptions(stats_days=365), 1)[0] for i in range(count)], now


def long_products(count: int, seed: int) -> tuple[list[dict], float]:
    rng = random.Random(seed)
    return [synthetic_product(rng, 3.0, i)[0] for i in range(count)], NOW.timestamp()


def measure(kind: str, products: list[dict], at: float, commits: int) -> None:
    folder = tempfile.mkdtemp(prefix="lockhold-")
    db = Path(folder) / "ingest.db"
    clock = FakeClock(wall=at)  # evaluated as of the end of their histories
    worker = BackfillWorker(db, {}, clock=clock)
    worker.conn = open_db(db)
    worker.conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpointed below, outside the timing
    worker.lease = Lease(db, worker.name, worker.lease_timing, clock=clock)
    assert worker.lease.acquire(timeout=5), "could not take the bench lease"
    timer = LockTimer()
    size = sum(len(deals.compress_product(p)) for p in products) / 1e6
    print(f"{kind}: {commits} fenced commits of each kind, {len(products)} products each ({size:.1f} MB compressed)")
    after, before = [], []
    for seq in range(commits):  # interleaved, so other load on the machine hits both alike
        asins, by_asin = batch(products, f"N{seq:04d}")
        worker.commit_batch("bench", "backfill", asins, {}, by_asin)
        after.append(timer.held())
        worker.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        asins, by_asin = batch(products, f"O{seq:04d}")
        old_commit_batch(worker, asins, by_asin)
        before.append(timer.held())
        worker.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    worker.lease.release()
    p99_after = percentile(after, 99)
    print(f"  baseline (evaluate + compress inside)  {figures(before)}")
    print(f"  commit_batch (prepared before)         {figures(after)}")
    print(f"  p99 {percentile(before, 99) / p99_after:.1f}x shorter; target p99 <= 5 ms"
          f" {'met' if p99_after * 1000 <= 5 else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--histories", choices=("sim", "long", "both"), default="both")
    parser.add_argument("--commits", type=int, default=40, help="fenced commits of each kind")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"SQLite {sqlite3.sqlite_version}, write-lock hold per fenced commit (BEGIN IMMEDIATE .. COMMIT)")
    for kind, make in (("sim", sim_products), ("long", long_products)):
        if args.histories in (kind, "both"):
            products, at = make(args.batch, args.seed)
            measure(kind, products, at, args.commits)


if __name__ == "__main__":
    main()
