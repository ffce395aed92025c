"""/product: product objects (csv, stats, offers) and what a request costs.

Costs (../shared/keepa-api.md): 1 per product found; with offers=N, 6 per page of up to 10
offers found instead of the 1 (at least one page); buybox=1 +2 (ignored with offers);
rating=1 +1 when the product has rating data; update=0 +1 (update=N>0: +1 when our copy is
older than N hours, i.e. a refresh is triggered). Unknown ASINs are not returned and cost 0.
"""

import math
from dataclasses import dataclass

from .catalogue import BOOKS, CATEGORY_NAMES, MINUTES_PER_DAY, Catalogue
from .histories import (
    AMAZON, COUNT_NEW, COUNT_REVIEWS, COUNT_USED, CSV_SLOTS, NEW, RATING, SALES, USED,
    latest, product_csv, stride, trim_days,
)

STAT_WINDOWS = {"avg30": 30, "avg90": 90, "avg180": 180, "avg365": 365}
PRICE_TYPES = frozenset([0, 1, 2, 4, 5, 6, 7, 8, 9, 10, *range(18, 33)])


@dataclass
class ProductOptions:
    stats_days: int | None = None
    history: bool = True
    days: int | None = None
    offers: int | None = None
    buybox: bool = False
    rating: bool = False
    update: int | None = None


def product_cost(has_rating: bool, offers_found: int, opts: ProductOptions, age_minutes: int) -> int:
    if opts.offers:
        cost = 6 * max(1, math.ceil(offers_found / 10))
    else:
        cost = 1 + (2 if opts.buybox else 0)
    if opts.rating and has_rating:
        cost += 1
    if opts.update is not None and (opts.update == 0 or age_minutes > opts.update * 60):
        cost += 1
    return cost


def build_product(cat: Catalogue, index: int, now_km: int, opts: ProductOptions, domain: int,
                  without_history: bool = False) -> tuple[dict, int]:
    """(product object, tokens it costs) as of now_km."""
    p = cat.profile(index)
    csv, last_update = product_csv(cat, index, now_km)
    if not opts.rating:  # Keepa only sends RATING / COUNT_REVIEWS with rating=1
        csv[RATING] = csv[COUNT_REVIEWS] = None
    current_new, current_used = latest(csv[COUNT_NEW], COUNT_NEW), latest(csv[COUNT_USED], COUNT_USED)
    offer_total = max(0, current_new) + max(0, current_used)
    product = {
        "productType": 0,
        "asin": p.asin,
        "domainId": domain,
        "title": p.title,
        "trackingSince": p.tracking_since,
        "listedSince": p.listed_since,
        "lastUpdate": last_update,
        "lastRatingUpdate": last_update if p.rating >= 0 else 0,
        "lastPriceChange": _last_change(csv, (AMAZON, NEW, USED)),
        "imagesCSV": p.image,
        "rootCategory": p.root,
        "categories": list(p.categories),
        "categoryTree": [{"catId": c, "name": CATEGORY_NAMES.get(c, str(c))} for c in (p.root, *p.categories)],
        "productGroup": "Book" if p.root == BOOKS else CATEGORY_NAMES.get(p.root, ""),
        "binding": "Paperback" if p.root == BOOKS else "",
        "parentAsin": None,
        "salesRankReference": p.root,
        "csv": None,
        "stats": None,
    }
    if opts.stats_days and not without_history:
        product["stats"] = build_stats(csv, now_km, opts.stats_days, offer_total)
    if opts.history and not without_history:
        product["csv"] = trim_days(csv, now_km, opts.days) if opts.days else csv
    offers_found = 0
    if opts.offers:
        offers = _offers(p.index, current_new, current_used, csv, opts.offers, now_km)
        offers_found = len(offers)
        product["offers"] = offers
        product["liveOffersOrder"] = list(range(offers_found))
    elif opts.buybox:
        product["buyBoxSellerIdHistory"] = [str(last_update), f"A{p.index % 97:02d}SIMSELLER"]
    cost = product_cost(p.rating >= 0, offers_found, opts, now_km - last_update)
    return product, cost


def _last_change(csv: list, types: tuple) -> int:
    times = [csv[t][-stride(t)] for t in types if csv[t]]
    return max(times) if times else 0


def _offers(index: int, count_new: int, count_used: int, csv: list, limit: int, now_km: int) -> list:
    offers = []
    new_price, used_price = latest(csv[NEW], NEW), latest(csv[USED], USED)
    for i in range(min(limit, max(0, count_new) + max(0, count_used))):
        is_new = i < max(0, count_new)
        base = new_price if is_new else used_price
        price = max(1, base) + 37 * (i % 7)
        offers.append({
            "offerId": i,
            "lastSeen": now_km,
            "sellerId": f"A{(index * 31 + i) % 10**8:08d}SIM",
            "offerCSV": [now_km - 60 * (i + 1), price, 0 if i % 2 else 399],
            "condition": 1 if is_new else 2 + i % 4,
            "isPrime": i % 2 == 0,
            "isMAP": False,
            "isShippable": True,
            "isAddonItem": False,
            "isPreorder": False,
            "isWarehouseDeal": False,
            "isScam": False,
            "isAmazon": False,
            "isPrimeExcl": False,
            "isFBA": i % 2 == 0,
            "shipsFromChina": False,
        })
    return offers


# -- stats ---------------------------------------------------------------------------------

def build_stats(csv: list, now_km: int, days: int, offer_total: int) -> dict:
    """Keepa's statistics object (the subset clients read), from the csv as served."""
    windows = {"avg": days, **STAT_WINDOWS}
    stats = {name: [-1] * CSV_SLOTS for name in windows}
    stats.update({
        "current": [-1] * CSV_SLOTS,
        "atIntervalStart": [-1] * CSV_SLOTS,
        "min": [None] * CSV_SLOTS,
        "max": [None] * CSV_SLOTS,
        "minInInterval": [None] * CSV_SLOTS,
        "maxInInterval": [None] * CSV_SLOTS,
        "outOfStockPercentageInInterval": [-1] * CSV_SLOTS,
        "outOfStockPercentage30": [-1] * CSV_SLOTS,
        "outOfStockPercentage90": [-1] * CSV_SLOTS,
    })
    for csv_type, series in enumerate(csv):
        if not series:
            continue
        points = _points(series, csv_type)
        stats["current"][csv_type] = points[-1][1]
        averages, out_of_stock = _window_figures(points, now_km, windows)
        for name, value in averages.items():
            stats[name][csv_type] = value
        cutoff = now_km - days * MINUTES_PER_DAY
        stats["atIntervalStart"][csv_type] = _value_at(points, cutoff)
        stats["min"][csv_type], stats["max"][csv_type] = _extremes(points, None)
        stats["minInInterval"][csv_type], stats["maxInInterval"][csv_type] = _extremes(points, cutoff)
        if csv_type in PRICE_TYPES:
            stats["outOfStockPercentageInInterval"][csv_type] = out_of_stock["avg"]
            stats["outOfStockPercentage30"][csv_type] = out_of_stock["avg30"]
            stats["outOfStockPercentage90"][csv_type] = out_of_stock["avg90"]
    ranks = _points(csv[SALES], SALES) if csv[SALES] else []
    for window in (30, 90, 180, 365):
        stats[f"salesRankDrops{window}"] = _rank_drops(ranks, now_km - window * MINUTES_PER_DAY)
    stats["totalOfferCount"] = offer_total
    stats["lastOffersUpdate"] = now_km
    return stats


def _points(series: list, csv_type: int) -> list[tuple[int, int]]:
    n = stride(csv_type)
    if n == 2:
        return list(zip(series[0::2], series[1::2]))
    return [(t, -1 if v < 0 else v + s) for t, v, s in zip(series[0::3], series[1::3], series[2::3])]


def _window_figures(points, now_km, windows) -> tuple[dict, dict]:
    """Time-weighted averages of the known (>= 0) values and out-of-stock percentages."""
    starts = {name: now_km - d * MINUTES_PER_DAY for name, d in windows.items()}
    earliest = min(starts.values())
    weighted = dict.fromkeys(windows, 0.0)
    known = dict.fromkeys(windows, 0)
    unknown = dict.fromkeys(windows, 0)
    for i, (t, v) in enumerate(points):
        t_next = points[i + 1][0] if i + 1 < len(points) else now_km
        if t_next <= earliest:
            continue
        for name, start in starts.items():
            span = min(t_next, now_km) - max(t, start)
            if span <= 0:
                continue
            if v >= 0:
                weighted[name] += v * span
                known[name] += span
            else:
                unknown[name] += span
    averages = {n: int(round(weighted[n] / known[n])) if known[n] else -1 for n in windows}
    out_of_stock = {n: int(round(100 * unknown[n] / (known[n] + unknown[n]))) if known[n] + unknown[n] else -1
                    for n in windows}
    return averages, out_of_stock


def _value_at(points, t_at) -> int:
    value = -1
    for t, v in points:
        if t > t_at:
            break
        value = v
    return value


def _extremes(points, since):
    lo = hi = None
    for t, v in points:
        if v < 0 or (since is not None and t < since):
            continue
        if lo is None or v < lo[1]:
            lo = [t, v]
        if hi is None or v > hi[1]:
            hi = [t, v]
    return lo, hi


def _rank_drops(ranks, since) -> int:
    drops = 0
    for (_t0, r0), (t1, r1) in zip(ranks, ranks[1:]):
        if t1 >= since and 0 <= r1 < r0:
            drops += 1
    return drops
