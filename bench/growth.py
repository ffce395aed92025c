"""How big does the database get? Bytes per deal, decision and call; size after 1, 7, 30 days.

Steady ingestion at --rate tokens/min (300) in simulated time, through the code the workers run:
each product batch is `deals.store_outcomes` of simulator products (real compressed histories)
in one transaction with its `fenced_commits` row and its `keepa_calls` row (`CallRecord.insert`);
one /deal page per minute (5 tokens, a call row); a few lease events a day; --churn of the listed
deals replaced each day and the janitor's removal (`deals.remove_deals`) 3 days after a deal
leaves the listing; `retention.prune` with the default [retention] every simulated hour (its
small batches, then incremental_vacuum), on a file created as ingest creates it
(auto_vacuum = INCREMENTAL). Every token buys one product (the worst case for decisions: one per
evaluation; at 300 tokens/min that is ~425,000 a day).

The simulation runs at --scale of the rate and of the listing (default 0.02: 6 products a minute
out of a listing of 201), so a 30-day run takes a minute, not hours; the full-rate sizes are
projected from the bytes per row measured in the same file (dbstat) times the full-rate row
counts. The baseline, from the same bytes per row: no retention at all (what ingest did before),
every row kept.

    .venv/bin/python bench/growth.py [--rate 300] [--scale 0.02] [--listing 10050] [--churn 0.1] [--days 30]
"""

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest import deals  # noqa: E402
from ingest.analytics import AnalyticsParams, evaluate_deal  # noqa: E402
from ingest.calllog import CallRecord  # noqa: E402
from ingest.dbstats import bytes_per_row, object_sizes  # noqa: E402
from ingest.retention import RetentionSettings, prune, unfenced  # noqa: E402
from ingest.store import open_db, size_text, transaction  # noqa: E402
from ingest.workers.base import WorkerSettings  # noqa: E402

DAY = 86400.0
BATCH = 100
DEAL_PAGE_TOKENS = 5
LEASE_EVENTS_PER_DAY = 6
JANITOR_GRACE_DAYS = 3
CHECKPOINT_DAYS = (1, 7, 30)


def sim_outcomes(count: int, seed: int, at: float) -> list[deals.Outcome]:
    """`count` simulator products evaluated and compressed once (the CPU work is not measured)."""
    from datetime import datetime, timezone

    from ingest.keepatime import unix_seconds_to_keepa_minutes
    from ingest.simulator.catalogue import Catalogue
    from ingest.simulator.products import ProductOptions, build_product

    minute = unix_seconds_to_keepa_minutes(at)
    catalogue = Catalogue(seed, count, minute)
    when, params = datetime.fromtimestamp(at, tz=timezone.utc), AnalyticsParams()
    out = []
    for i in range(count):
        product = build_product(catalogue, i, minute, ProductOptions(stats_days=365), 1)[0]
        out.append(deals.evaluated_outcome(product["asin"], None, product, evaluate_deal(product, when, params)))
    return out


def renamed(outcome: deals.Outcome, asin: str) -> deals.Outcome:
    from dataclasses import replace

    return replace(outcome, asin=asin)


class Simulation:
    def __init__(self, db: Path, rate: float, scale: float, listing: int, churn: float, seed: int, start: float):
        self.conn = open_db(db)
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpointed by hand: file sizes are then exact
        self.per_minute = rate * scale
        self.scale = scale
        self.listing = max(10, round(listing * scale))
        self.churn = churn
        self.now = start
        self.templates = sim_outcomes(min(self.listing, 300), seed, start)
        self.listed = [f"G{i:09d}" for i in range(self.listing)]
        self.next_asin = self.listing
        self.leaving: list[tuple[float, list[str]]] = []  # (left the listing at, asins)
        self.cursor = 0
        self.backoff = WorkerSettings().retry_backoff
        self.retention = RetentionSettings()
        self.evaluations = 0
        self.prune_holds: list[float] = []  # seconds each retention delete transaction took

    def timed_commit(self):
        """retention's Commit, timing each of its write transactions."""
        from contextlib import contextmanager

        base = unfenced(self.conn)

        @contextmanager
        def commit(what, source):
            began = time.perf_counter()
            with base(what, source) as pair:
                yield pair
            self.prune_holds.append(time.perf_counter() - began)

        return commit

    def outcome(self, asin: str) -> deals.Outcome:
        return renamed(self.templates[int(asin[1:]) % len(self.templates)], asin)

    def batch(self, size: int) -> None:
        asins = [self.listed[(self.cursor + i) % len(self.listed)] for i in range(size)]
        self.cursor = (self.cursor + size) % len(self.listed)
        outcomes = [self.outcome(a) for a in asins]
        ctx = deals.WriteContext("upsert", 1, self.now, "refresh")
        with transaction(self.conn):
            deals.store_outcomes(self.conn, ctx, outcomes, self.backoff)
            deals.note_fenced_commit(self.conn, ctx, "upsert", 1, "upsert refresh")
            CallRecord(self.now, "upsert", "product", asins=size, estimated=size, actual=size, status="ok",
                       http_status=200, latency_ms=800.0, tokens_left=1000).insert(self.conn, "k0123456789ab")
        self.evaluations += size

    def deal_page(self) -> None:
        ctx = deals.WriteContext("upsert", 1, self.now, "upsert")
        with transaction(self.conn):
            deals.note_fenced_commit(self.conn, ctx, "upsert", 1, "upsert poll")
            CallRecord(self.now, "upsert", "deal", asins=0, estimated=5, actual=DEAL_PAGE_TOKENS, status="ok",
                       http_status=200, latency_ms=400.0, tokens_left=1000).insert(self.conn, "k0123456789ab")

    def day_turns(self) -> None:
        """Churn: some listed deals leave, new ones come; the janitor removes those gone for 3 days;
        a few lease events (restarts, deploys)."""
        n = round(self.listing * self.churn)
        gone, self.listed = self.listed[:n], self.listed[n:]
        self.listed += [f"G{self.next_asin + i:09d}" for i in range(n)]
        self.next_asin += n
        self.leaving.append((self.now, gone))
        due = [a for at, names in self.leaving if self.now - at >= JANITOR_GRACE_DAYS * DAY for a in names]
        self.leaving = [(at, names) for at, names in self.leaving if self.now - at < JANITOR_GRACE_DAYS * DAY]
        ctx = deals.WriteContext("upsert", 1, self.now, "janitor")
        with transaction(self.conn):
            deals.remove_deals(self.conn, ctx, due, "unseen_72h")
            for i in range(LEASE_EVENTS_PER_DAY):
                self.conn.execute("INSERT INTO lease_events (name, at, event, fence, holder) VALUES (?, ?, ?, 1, 'h')",
                                  ("upsert", self.now + i, "acquired"))

    def run_until(self, end: float) -> None:
        """Minute by minute: one /deal page, products for the rest of the minute's tokens."""
        owed, next_prune, next_day = 0.0, self.now + 3600, self.now + DAY
        products_per_minute = self.per_minute * (1 - DEAL_PAGE_TOKENS / 300)
        page_every = max(1, round(1 / self.scale))  # pages scale with the rate too
        minute = 0
        while self.now < end:
            self.now += 60
            minute += 1
            if minute % page_every == 0:
                self.deal_page()
            owed += products_per_minute
            while owed >= BATCH:
                self.batch(BATCH)
                owed -= BATCH
            if self.now >= next_day:
                next_day += DAY
                self.day_turns()
            if self.now >= next_prune:
                next_prune += 3600
                prune(self.conn, self.timed_commit(), self.now, self.retention, call_log_days=30.0)
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def measure(self, db: Path) -> dict:
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        objects = object_sizes(self.conn)
        rows = {o.name: o.rows for o in objects if o.kind == "table"}
        return {"bytes": db.stat().st_size, "rows": rows, "per_row": bytes_per_row(objects)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=300.0, help="tokens per minute (one product each)")
    parser.add_argument("--scale", type=float, default=0.02, help="share of the rate and the listing simulated")
    parser.add_argument("--listing", type=int, default=10_050, help="deals listed at a time (Keepa: 67 pages of 150)")
    parser.add_argument("--churn", type=float, default=0.10, help="share of the listing replaced each day")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    r = RetentionSettings()
    print(f"SQLite {sqlite3.sqlite_version}; {args.rate:g} tokens/min, simulated at {args.scale:g} of the rate and"
          f" of a {args.listing}-deal listing ({args.churn:.0%} churn a day); default retention: decisions"
          f" {r.decisions_days:g} d (each ASIN's latest kept), calls 30 d, fenced commits {r.fenced_commits_days:g} d,"
          f" lease events {r.lease_events_days:g} d")
    folder = Path(tempfile.mkdtemp(prefix="growth-"))
    db = folder / "ingest.db"
    start = time.time() - args.days * DAY  # so the simulated end is now (lease_events' trigger reads the real clock)
    try:
        run(args, db, start)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args, db: Path, start: float) -> None:
    sim = Simulation(db, args.rate, args.scale, args.listing, args.churn, args.seed, start)
    began = time.monotonic()
    results = {}
    for day in [d for d in CHECKPOINT_DAYS if d <= args.days]:
        sim.run_until(start + day * DAY)
        results[day] = sim.measure(db)
    elapsed = time.monotonic() - began
    last = results[max(results)]
    per = last["per_row"]
    deal_bytes = per.get("deals", 0)
    print(f"simulated {max(results)} days in {elapsed:.0f} s: {sim.evaluations:,} evaluations at this scale")
    print(f"bytes per row (table + its indexes; a deal includes its stored history): deal {deal_bytes:,.0f},"
          f" decision {per.get('decisions', 0):.0f}, call {per.get('keepa_calls', 0):.0f},"
          f" fenced commit {per.get('fenced_commits', 0):.0f}")
    scale = args.scale
    print(f"{'day':>4} {'measured (scaled)':>18} {'decisions':>10} {'deals':>7} | {'projected at full rate':>22}"
          f" {'baseline: no retention':>23}")
    full_sizes = {}
    for day, res in results.items():
        rows = res["rows"]
        timed = {t: rows.get(t, 0) / scale for t in ("decisions", "keepa_calls", "fenced_commits")}
        full = (rows.get("deals", 0) / scale * deal_bytes + sum(timed[t] * per.get(t, 0) for t in timed)
                + rows.get("lease_events", 0) * per.get("lease_events", 0))
        minutes = day * 1440
        kept_all = (rows.get("deals", 0) / scale * deal_bytes
                    + minutes * args.rate * per.get("decisions", 0)
                    + minutes * (args.rate / BATCH + 1) * (per.get("keepa_calls", 0) + per.get("fenced_commits", 0)))
        full_sizes[day] = full
        print(f"{day:>4} {size_text(res['bytes']):>18} {rows.get('decisions', 0):>10,} {rows.get('deals', 0):>7,} |"
              f" {size_text(int(full)):>22} {size_text(int(kept_all)):>23}")
    holds = sorted(sim.prune_holds)
    if holds:
        pick = lambda p: holds[min(len(holds) - 1, round(p / 100 * len(holds)))] * 1000  # noqa: E731
        oldest = sim.conn.execute("SELECT min(at) FROM decisions WHERE at >= ?", (sim.now - 7 * DAY,)).fetchone()[0]
        day_rows = sim.conn.execute("SELECT count(*) FROM decisions WHERE at < ?", (oldest + DAY,)).fetchone()[0]
        began = time.perf_counter()
        with transaction(sim.conn):
            sim.conn.execute("DELETE FROM decisions WHERE at < ?", (oldest + DAY,))
        one = (time.perf_counter() - began) * 1000
        print(f"retention write transactions ({sim.retention.batch_rows} rows at most): {len(holds)}, p50 {pick(50):.1f} ms,"
              f" p99 {pick(99):.1f} ms, max {holds[-1] * 1000:.1f} ms; baseline: one DELETE of a day's decisions"
              f" ({day_rows:,} rows at this scale, {day_rows / scale:,.0f} at full rate) holds the lock {one:.0f} ms")
    if 7 in results and 30 in results:
        measured = results[30]["bytes"] / results[7]["bytes"]
        projected = full_sizes[30] / full_sizes[7]
        ok = projected <= 1.2 and measured <= 1.2
        print(f"30-day / 7-day size: measured {measured:.2f}x, projected at full rate {projected:.2f}x"
              f" (target <= 1.2x: {'met' if ok else 'MISSED'}); baseline without retention grows linearly"
              f" (~{30 / 7:.1f}x)")


if __name__ == "__main__":
    main()
