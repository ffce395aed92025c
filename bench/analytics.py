"""How fast are the analytics on realistic products? Target: well above 1,000 products/s on one core.

Builds its own simulator-style products (no dependency on ingest.simulator): three years of a
used-book market crawled every 4-12 hours: an offer book (listings, withdrawals, repricing),
used and new sales that lift the sales rank (recorded in the same crawl or a later one), a rank
that decays between sales, and occasional -1 gaps. Points are recorded only on change, as Keepa
does. Prints products/s and p50/p99 per product for evaluate_deal and one_year_average, next to
a baseline measured in the same run: json.loads of the same product (a cost ingestion pays
anyway). Also prints how many true used sales of the last year the inference recovered.

    .venv/bin/python bench/analytics.py [--products 1000] [--years 3] [--seed 1]
"""

import argparse
import json
import os
import random
import statistics
import time
from datetime import datetime, timezone

from ingest.analytics import evaluate_deal, one_year_average
from ingest.keepatime import datetime_to_keepa_minutes

NOW = datetime(2024, 6, 1, tzinfo=timezone.utc)
NOW_MINUTE = datetime_to_keepa_minutes(NOW)


class Recorder:
    """One csv slot: appends a point only when the value changes."""

    def __init__(self):
        self.flat: list[int] = []
        self.last = None

    def record(self, minute: int, value: int) -> None:
        if value != self.last:
            self.flat += (minute, value)
            self.last = value


def synthetic_product(rng: random.Random, years: float, index: int) -> tuple[dict, int]:
    """A product and the number of true used sales in its last 365 days."""
    crawl = rng.randint(4, 12) * 60  # minutes between Keepa crawls of this product
    used_rate = rng.choice([0.02, 0.1, 0.3, 1.0, 3.0]) / 1440  # used sales per minute
    new_rate = used_rate * rng.uniform(0.2, 1.5)
    base = rng.randint(400, 4000)
    offers = [int(base * rng.uniform(0.8, 2.0)) for _ in range(rng.randint(2, 12))]
    new_price = int(base * rng.uniform(1.5, 3.0))
    rank, shown_rank = rng.uniform(5e3, 2e6), None
    slots = {i: Recorder() for i in (1, 2, 3, 11, 12)}
    start = NOW_MINUTE - int(years * 365 * 1440)
    true_sales_last_year, gap = 0, 0
    for minute in range(start, NOW_MINUTE, crawl):
        # what happened since the last crawl (Poisson counts, approximated per crawl)
        for _ in range(_poisson(rng, used_rate * crawl)):
            if offers:
                offers.remove(min(offers))
                rank = rank * rng.uniform(0.05, 0.4) + rng.uniform(500, 3000)
                true_sales_last_year += minute > NOW_MINUTE - 365 * 1440
        for _ in range(_poisson(rng, new_rate * crawl)):
            rank = rank * rng.uniform(0.1, 0.5) + rng.uniform(500, 3000)
        for _ in range(_poisson(rng, used_rate * crawl * 1.1 + 0.002)):
            offers.append(int(base * rng.uniform(0.6, 2.5)))
        if offers and rng.random() < 0.01:
            offers.pop(rng.randrange(len(offers)))  # withdrawn, not sold
        if offers and rng.random() < 0.05:
            offers[rng.randrange(len(offers))] = int(base * rng.uniform(0.6, 2.5))
        if rng.random() < 0.02:
            new_price = int(base * rng.uniform(1.5, 3.0))
        rank = min(rank * (1 + 0.01 * crawl / 60), 5e6)  # the rank decays between sales
        if rng.random() < 0.7:  # the rank page is not refreshed on every crawl: lagging ranks
            shown_rank = int(rank)
        gap = rng.randint(1, 20) if rng.random() < 0.001 else max(gap - 1, 0)
        if gap:
            for slot in (2, 3, 12):
                slots[slot].record(minute, -1)
            continue
        slots[1].record(minute, new_price)
        slots[2].record(minute, min(offers) if offers else -1)
        slots[3].record(minute, shown_rank if shown_rank is not None else -1)
        slots[11].record(minute, rng.randint(3, 6))
        slots[12].record(minute, len(offers))
    csv = [None] * 36
    for slot, recorder in slots.items():
        csv[slot] = recorder.flat
    product = {"asin": f"B{index:09d}", "title": f"Book {index}", "trackingSince": start, "csv": csv}
    return product, true_sales_last_year


def _poisson(rng: random.Random, mean: float) -> int:
    count, threshold = 0, rng.random()
    p = cumulative = pow(2.718281828459045, -mean)
    while threshold > cumulative and count < 50:
        count += 1
        p *= mean / count
        cumulative += p
    return count


def timed(fn, items) -> list[float]:
    """Seconds per item, one call each."""
    out = []
    clock = time.perf_counter
    for item in items:
        t0 = clock()
        fn(item)
        out.append(clock() - t0)
    return out


def report(label: str, seconds: list[float]) -> None:
    total = sum(seconds)
    q = statistics.quantiles(seconds, n=100)
    print(f"  {label:<34} {len(seconds) / total:>9,.0f} products/s   p50 {q[49] * 1e6:7.0f} us   p99 {q[98] * 1e6:7.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--years", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says

    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    made = [synthetic_product(rng, args.years, i) for i in range(args.products)]
    products = [p for p, _ in made]
    points = sorted(sum(len(s) // 2 for s in p["csv"] if s) for p in products)
    encoded = [json.dumps(p) for p in products]
    print(f"{args.products} products, {args.years:g} years of history, built in {time.perf_counter() - t0:.1f} s")
    print(f"  csv points per product: median {points[len(points) // 2]:,}, max {points[-1]:,}")

    for round_ in (1, 2):  # the first round warms caches; both are printed so noise is visible
        print(f"round {round_}:")
        report("baseline: json.loads(product)", timed(json.loads, encoded))
        report("one_year_average", timed(lambda p: one_year_average(p, NOW), products))
        report("evaluate_deal", timed(lambda p: evaluate_deal(p, NOW), products))

    recovered = []
    reasons: dict[str, int] = {}
    for product, true_sales in made:
        avg = one_year_average(product, NOW)
        reasons[avg.reason] = reasons.get(avg.reason, 0) + 1
        if true_sales:
            recovered.append((avg.sales + len(avg.outliers)) / true_sales)
    print(f"reasons: {reasons}")
    if recovered:
        print(f"inferred / true used sales in the last year: median {statistics.median(recovered):.2f}")


if __name__ == "__main__":
    main()
