"""Product histories in Keepa's csv layout: 36 slots, each a flat list of change points
[t0, v0, t1, v1, ...] (triplets [t, price, shipping] for the shipping types) or None.

A product's history has two parts:
- the base history, from trackingSince to `Profile.history_end`, generated once per product
  (a cached pure function of the catalogue seed);
- its deal updates after that: update k is a pure function of (seed, index, k), appended up
  to the current simulated time, so `lastUpdate` and the latest values move as time passes.
"""

import math
from functools import lru_cache

from .catalogue import MINUTES_PER_DAY, Catalogue, Profile

AMAZON, NEW, USED, SALES, LISTPRICE = 0, 1, 2, 3, 4
COUNT_NEW, COUNT_USED, RATING, COUNT_REVIEWS = 11, 12, 16, 17
USED_SHIPPING_TYPES = (19, 20, 21, 22)
BUY_BOX_USED_SHIPPING = 32
CSV_SLOTS = 36
TRIPLET_TYPES = frozenset([7, *range(18, 30), 32])
MAX_UPDATES_IN_HISTORY = 2000
MAX_RANK = 4_000_000


def stride(csv_type: int) -> int:
    return 3 if csv_type in TRIPLET_TYPES else 2


class _Builder:
    """Collects change points; a value equal to the previous one is not a change."""

    def __init__(self, profile: Profile):
        self.slots: list[list[int] | None] = [None] * CSV_SLOTS
        self.shipping_type = USED_SHIPPING_TYPES[profile.index % 4] if profile.shipping else None
        self.ship_cost = 0 if profile.index % 3 == 0 else 399

    def emit(self, csv_type: int, t: int, value: int) -> None:
        series = self.slots[csv_type]
        if series is None:
            self.slots[csv_type] = [t, value]
            return
        if series[-1] == value:
            return
        t = max(t, series[-2] + 1)  # Keepa times are strictly increasing within a series
        series += (t, value)

    def emit_used(self, t: int, price: int) -> None:
        self.emit(USED, t, price)
        if self.shipping_type is not None:
            ship = 0 if price < 0 else self.ship_cost
            self._emit3(self.shipping_type, t, price, ship)
            self._emit3(BUY_BOX_USED_SHIPPING, t, price, ship)

    def _emit3(self, csv_type: int, t: int, price: int, ship: int) -> None:
        series = self.slots[csv_type]
        if series is None:
            self.slots[csv_type] = [t, price, ship]
            return
        if series[-2] == price and series[-1] == ship:
            return
        series += (max(t, series[-3] + 1), price, ship)


@lru_cache(maxsize=512)  # ~50 KB a product: bounded memory
def _base_history(cat: Catalogue, index: int) -> tuple:
    p = cat.profile(index)
    b = _Builder(p)
    _generate(cat, p, b)
    return tuple(None if s is None else tuple(s) for s in b.slots)


def _generate(cat: Catalogue, p: Profile, b: _Builder) -> None:
    r = cat.rng(p.index, "h")
    end = p.history_end
    t = p.tracking_since
    used, new, rank = p.base_used, p.base_new, p.base_rank
    cu, cn = p.base_count_used, p.base_count_new
    reviews = p.reviews // 3
    b.emit_used(t, used)
    b.emit(NEW, t, new)
    b.emit(SALES, t, rank)
    b.emit(COUNT_USED, t, cu)
    b.emit(COUNT_NEW, t, cn)
    b.emit(LISTPRICE, t, int(p.base_new * 1.3))
    if p.amazon:
        b.emit(AMAZON, t, int(new * 0.95))
    if p.rating >= 0:
        b.emit(RATING, t, p.rating)
        b.emit(COUNT_REVIEWS, t, reviews)
    mean_step = 240 if p.kind == "new" else 2 * MINUTES_PER_DAY
    sale_rate = p.sales_per_30d / (30 * MINUTES_PER_DAY)  # sales per minute
    pending_rank = None  # a rank improvement that shows up some minutes after the sale
    blackout_until = None  # a -1 run: no used offer, no rank
    while True:
        dt = max(15, int(r.expovariate(1.0 / mean_step)))
        t += dt
        if p.kind == "gappy" and r.random() < 0.006:
            t += int(r.uniform(20, 120) * MINUTES_PER_DAY)  # Keepa saw nothing for weeks
        if t >= end:
            break
        if pending_rank and pending_rank[0] <= t:
            b.emit(SALES, *pending_rank)
            pending_rank = None
        if blackout_until is not None:
            if t < blackout_until:
                continue
            blackout_until = None
            b.emit_used(t, used if cu > 0 else -1)
            b.emit(SALES, t, rank)
            continue
        if p.kind == "gappy" and r.random() < 0.02:
            blackout_until = t + int(r.uniform(2, 20) * MINUTES_PER_DAY)
            b.emit_used(t, -1)
            b.emit(SALES, t, -1)
            continue
        if cu > 0 and r.random() < 1 - math.exp(-sale_rate * dt):
            # A sale: one used offer fewer, the rank improves (now, or a little later).
            cu -= 1
            b.emit(COUNT_USED, t, cu)
            rank = max(1, int(rank * r.uniform(0.05, 0.5)))
            if r.random() < 0.7 or pending_rank is not None:
                b.emit(SALES, t, rank)
            else:
                pending_rank = (min(t + r.randint(5, 240), end - 1), rank)
            used = int(used * r.uniform(1.0, 1.3)) if cu > 0 else -1
            b.emit_used(t, used)
        else:
            rank = min(MAX_RANK, int(rank * r.uniform(1.0, 1.08)) + 1)
            if pending_rank is None:
                b.emit(SALES, t, rank)
        if p.kind != "no_sales" and r.random() < 1 - math.exp(-dt / (10 * MINUTES_PER_DAY)):
            cu += 1  # a seller lists a used copy
            b.emit(COUNT_USED, t, cu)
            offer = int(p.base_used * r.uniform(0.6, 1.3))
            used = offer if used < 0 else min(used, offer)
            b.emit_used(t, used)
        elif cu > 0 and r.random() < 0.05:
            used = int(p.base_used * r.uniform(0.7, 1.4))
            b.emit_used(t, used)
        if r.random() < 0.1:
            cn = max(0, cn + r.choice((-1, 1)))
            b.emit(COUNT_NEW, t, cn)
            new = -1 if cn == 0 else int(p.base_new * r.uniform(0.85, 1.15))
            b.emit(NEW, t, new)
        if p.amazon and r.random() < 0.03:
            b.emit(AMAZON, t, -1 if r.random() < 0.3 else int(p.base_new * r.uniform(0.85, 1.0)))
        if p.rating >= 0 and r.random() < 0.2:
            reviews += r.randint(1, 5)
            b.emit(COUNT_REVIEWS, t, reviews)
    if pending_rank is not None:
        b.emit(SALES, *pending_rank)


def deal_update(cat: Catalogue, p: Profile, k: int) -> dict[int, int]:
    """Values Keepa saw at a listed product's k-th deal update (a used-price drop, often a sale)."""
    r = cat.rng(p.index, f"u{k}")
    sale = p.kind != "no_sales" and r.random() < 0.35
    cu = p.base_count_used if p.kind == "no_sales" else max(1, p.base_count_used + r.randint(-3, 2))
    rank_factor = r.uniform(0.05, 0.4) if sale else r.uniform(0.8, 1.6)
    if p.deal and p.deal.new_drops:
        new = int(p.base_new * r.uniform(0.45, 0.85))
    else:
        new = int(p.base_new * r.uniform(0.95, 1.2))
    return {
        USED: int(p.base_used * r.uniform(0.4, 0.85)),
        NEW: new,
        SALES: max(1, min(MAX_RANK, int(p.base_rank * rank_factor))),
        COUNT_USED: cu - 1 if sale else cu,
        COUNT_NEW: max(1, p.base_count_new + r.randint(-2, 2)),
    }


def product_csv(cat: Catalogue, index: int, now_km: int) -> tuple[list, int]:
    """(csv with 36 slots, lastUpdate in Keepa minutes) as of now_km."""
    p = cat.profile(index)
    slots = [None if s is None else list(s) for s in _base_history(cat, index)]
    last_update = min(p.history_end, now_km)
    if p.deal:
        updates = p.deal.updates_until(now_km)
        if updates:
            b = _Builder(p)
            b.slots = slots
            for k in range(max(0, updates - MAX_UPDATES_IN_HISTORY), updates):
                t = p.deal.update_time(k)
                values = deal_update(cat, p, k)
                b.emit_used(t, values[USED])
                for csv_type in (NEW, SALES, COUNT_USED, COUNT_NEW):
                    b.emit(csv_type, t, values[csv_type])
            last_update = p.deal.update_time(updates - 1)
    return slots, last_update


def trim_days(csv: list, now_km: int, days: int) -> list:
    """Keep the last `days` days of each series, plus the point active at the cutoff."""
    cutoff = now_km - days * MINUTES_PER_DAY
    out = []
    for csv_type, series in enumerate(csv):
        if not series:
            out.append(series)
            continue
        n = stride(csv_type)
        first = 0
        for i in range(0, len(series), n):
            if series[i] < cutoff:
                first = i
            else:
                break
        out.append(series[first:])
    return out


def latest(series: list | None, csv_type: int) -> int:
    """The current value of a series (price + shipping for triplets), -1 when none."""
    if not series:
        return -1
    if stride(csv_type) == 3:
        price, ship = series[-2], series[-1]
        return -1 if price < 0 else price + ship
    return series[-1]
