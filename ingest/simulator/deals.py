"""/deal: parse a deal selection, list the matching deals, page them.

- A product is listed when it has had a deal update and its last one is at most 12 h old.
- Its deal object depends only on (product, number of updates so far), so it is cached.
- A query's full result is cached for deal_cache_s (Keepa: about 120 s), so paging through
  a query sees one consistent list; at most 10,000 results, 150 a page.
- sortType 1 (newest) is deliberately a little out of order, as Keepa's is.
- Sign convention (inferred): delta = current - avg, so a price drop is negative; the range
  filters deltaRange / deltaPercentRange / deltaLastRange compare absolute values.
- Range filters apply only with isRangeEnabled = true; minRating / hasReviews only with
  isFilterEnabled = true; include/excludeCategories and titleSearch always.
"""

import threading
import zlib
from dataclasses import dataclass
from functools import lru_cache

from .catalogue import CATEGORY_NAMES, Catalogue
from .histories import COUNT_NEW, COUNT_USED, CSV_SLOTS, NEW, SALES, USED, deal_update

PAGE_SIZE = 150
MAX_RESULTS = 10_000
LISTED_FOR_MINUTES = 12 * 60
DOMAINS = frozenset([1, 2, 3, 4, 5, 6, 8, 9, 10, 11])
DEAL_TYPES = (NEW, USED, SALES, COUNT_NEW, COUNT_USED)


class SelectionError(ValueError):
    """A deal selection Keepa would reject (HTTP 400)."""


@dataclass(frozen=True)
class DealQuery:
    page: int = 0
    domain: int = 1
    price_type: int = 0
    date_range: int = 0
    sort_type: int = 1
    range_enabled: bool = False
    current_range: tuple | None = None
    delta_range: tuple | None = None
    delta_percent_range: tuple | None = None
    delta_last_range: tuple | None = None
    sales_rank_range: tuple | None = None
    include_categories: frozenset | None = None
    exclude_categories: frozenset = frozenset()
    title_words: tuple = ()
    filter_enabled: bool = False
    min_rating: int = -1
    has_reviews: bool = False

    def cache_key(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__ if f != "page")


def _int(sel: dict, name: str, default: int, lo: int, hi: int) -> int:
    value = sel.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SelectionError(f"{name} must be an integer between {lo} and {hi}")
    return value


def _bool(sel: dict, name: str) -> bool:
    value = sel.get(name, False)
    if value in (None, False, 0):
        return False
    if value in (True, 1):
        return True
    raise SelectionError(f"{name} must be a boolean")


def _range(sel: dict, name: str) -> tuple | None:
    value = sel.get(name)
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise SelectionError(f"{name} must be [min, max]")
    lo, hi = value
    return (lo, float("inf") if hi == -1 else hi)


def _categories(sel: dict, name: str) -> frozenset | None:
    value = sel.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SelectionError(f"{name} must be a list of category ids")
    return frozenset(value)


def parse_selection(sel) -> DealQuery:
    if not isinstance(sel, dict):
        raise SelectionError("selection must be a JSON object")
    price_types = sel.get("priceTypes", 0)
    if isinstance(price_types, list):
        if len(price_types) != 1:
            raise SelectionError("priceTypes must contain exactly one price type")
        price_types = price_types[0]
    price_type = _int({"priceTypes": price_types}, "priceTypes", 0, 0, CSV_SLOTS - 1)
    domain = _int(sel, "domainId", 1, 1, 11)
    if domain not in DOMAINS:
        raise SelectionError(f"domainId {domain} is not a valid Amazon locale")
    sort_type = _int(sel, "sortType", 1, -4, 4)
    title = sel.get("titleSearch") or ""
    if not isinstance(title, str):
        raise SelectionError("titleSearch must be a string")
    return DealQuery(
        page=_int(sel, "page", 0, 0, 1_000_000),
        domain=domain,
        price_type=price_type,
        date_range=_int(sel, "dateRange", 0, 0, 3),
        sort_type=1 if sort_type in (0, -1) else sort_type,
        range_enabled=_bool(sel, "isRangeEnabled"),
        current_range=_range(sel, "currentRange"),
        delta_range=_range(sel, "deltaRange"),
        delta_percent_range=_range(sel, "deltaPercentRange"),
        delta_last_range=_range(sel, "deltaLastRange"),
        sales_rank_range=_range(sel, "salesRankRange"),
        include_categories=_categories(sel, "includeCategories"),
        exclude_categories=_categories(sel, "excludeCategories") or frozenset(),
        title_words=tuple(title.lower().split()),
        filter_enabled=_bool(sel, "isFilterEnabled"),
        min_rating=_int(sel, "minRating", -1, -1, 50),
        has_reviews=_bool(sel, "hasReviews"),
    )


# -- deal objects --------------------------------------------------------------------------

@lru_cache(maxsize=10_000)  # ~11 KB a deal: bounded memory
def deal_object(cat: Catalogue, index: int, updates: int) -> dict:
    """The deal as Keepa shows it after the product's `updates`-th deal update."""
    p = cat.profile(index)
    schedule = p.deal
    last = schedule.update_time(updates - 1)
    cur = deal_update(cat, p, updates - 1)
    if updates >= 2:
        prev, prev_time = deal_update(cat, p, updates - 2), schedule.update_time(updates - 2)
    else:
        prev = {NEW: p.base_new, USED: p.base_used, SALES: p.base_rank,
                COUNT_NEW: p.base_count_new, COUNT_USED: p.base_count_used}
        prev_time = schedule.start
    r = cat.rng(index, "a")
    base = {NEW: p.base_new, USED: p.base_used, SALES: p.base_rank,
            COUNT_NEW: p.base_count_new, COUNT_USED: p.base_count_used}
    current, since, delta_last = [-1] * CSV_SLOTS, [-1] * CSV_SLOTS, [0] * CSV_SLOTS
    avg = [[-1] * CSV_SLOTS for _ in range(4)]
    delta = [[0] * CSV_SLOTS for _ in range(4)]
    delta_pct = [[0] * CSV_SLOTS for _ in range(4)]
    for t in DEAL_TYPES:
        current[t] = cur[t]
        since[t] = last if cur[t] != prev[t] else prev_time
        delta_last[t] = cur[t] - prev[t]
        for dr in range(4):
            a = max(1, int(base[t] * r.uniform(0.95, 1.12)))
            avg[dr][t] = a
            delta[dr][t] = cur[t] - a
            delta_pct[dr][t] = max(-32768, min(32767, round(100 * (cur[t] - a) / a)))
    return {
        "asin": p.asin,
        "parentAsin": None,
        "title": p.title,
        "rootCat": p.root,
        "categories": list(p.categories),
        "image": [ord(c) for c in p.image],
        "creationDate": schedule.start,
        "lastUpdate": last,
        "lightningEnd": 0,
        "warehouseCondition": 0,
        "current": current,
        "currentSince": since,
        "deltaLast": delta_last,
        "delta": delta,
        "deltaPercent": delta_pct,
        "avg": avg,
    }


def listed_deals(cat: Catalogue, now_km: int) -> list[dict]:
    """Every deal listed at now_km: updated at most 12 h ago."""
    out = []
    for index in cat.deal_indices():
        schedule = cat.profile(index).deal
        updates = schedule.updates_until(now_km)
        if updates and now_km - schedule.update_time(updates - 1) <= LISTED_FOR_MINUTES:
            out.append((index, deal_object(cat, index, updates)))
    return out


def _in(value, rng) -> bool:
    return rng is None or rng[0] <= value <= rng[1]


def _matches(cat: Catalogue, index: int, deal: dict, q: DealQuery) -> bool:
    pt, dr = q.price_type, q.date_range
    if deal["current"][pt] < 0 or deal["delta"][dr][pt] >= 0:
        return False  # Keepa lists drops of the chosen price type
    cats = {deal["rootCat"], *deal["categories"]}
    if q.include_categories is not None and not cats & q.include_categories:
        return False
    if cats & q.exclude_categories:
        return False
    if q.title_words and not all(w in deal["title"].lower() for w in q.title_words):
        return False
    if q.range_enabled:
        rank = deal["current"][SALES]
        if q.sales_rank_range is not None and (rank < 0 or not _in(rank, q.sales_rank_range)):
            return False
        if not (_in(deal["current"][pt], q.current_range)
                and _in(abs(deal["delta"][dr][pt]), q.delta_range)
                and _in(abs(deal["deltaPercent"][dr][pt]), q.delta_percent_range)
                and _in(abs(deal["deltaLast"][pt]), q.delta_last_range)):
            return False
    if q.filter_enabled:
        p = cat.profile(index)
        if q.min_rating >= 0 and p.rating < q.min_rating:
            return False
        if q.has_reviews and p.reviews <= 0:
            return False
    return True


def _sort(results: list, q: DealQuery) -> list:
    pt, dr = q.price_type, q.date_range
    kind, invert = abs(q.sort_type), q.sort_type < 0
    if kind == 1:  # newest first, with a few minutes of deterministic disorder
        return sorted(results, key=lambda d: (-(d["lastUpdate"] + zlib.crc32(d["asin"].encode()) % 5), d["asin"]))
    if kind == 2:
        key = lambda d: abs(d["delta"][dr][pt])  # noqa: E731
    elif kind == 4:
        key = lambda d: abs(d["deltaPercent"][dr][pt])  # noqa: E731
    else:  # 3: sales rank, lowest first; no rank last
        rank = lambda d: d["current"][SALES] if d["current"][SALES] >= 0 else float("inf")  # noqa: E731
        return sorted(results, key=lambda d: (rank(d), d["asin"]), reverse=invert)
    return sorted(results, key=lambda d: (-key(d), d["asin"]), reverse=invert)


class DealBook:
    """Runs deal queries over a catalogue, with Keepa's result cache."""

    def __init__(self, cat: Catalogue, cache_s: float = 120.0):
        self.cat = cat
        self.cache_s = cache_s
        self._cache: dict[tuple, tuple[float, list]] = {}
        self._lock = threading.Lock()

    def results(self, q: DealQuery, now_km: int, now_mono: float) -> list[dict]:
        key = q.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit and now_mono - hit[0] < self.cache_s:
                return hit[1]
        matched = [d for i, d in listed_deals(self.cat, now_km) if _matches(self.cat, i, d, q)]
        results = _sort(matched, q)[:MAX_RESULTS]
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if now_mono - v[0] < self.cache_s}
            self._cache[key] = (now_mono, results)
        return results

    def page(self, q: DealQuery, now_km: int, now_mono: float) -> dict:
        results = self.results(q, now_km, now_mono)
        dr = results[q.page * PAGE_SIZE:(q.page + 1) * PAGE_SIZE]
        counts: dict[int, int] = {}
        for d in results:
            counts[d["rootCat"]] = counts.get(d["rootCat"], 0) + 1
        roots = sorted(counts, key=lambda c: (-counts[c], c))
        return {
            "dr": dr,
            "categoryIds": roots,
            "categoryNames": [CATEGORY_NAMES.get(c, str(c)) for c in roots],
            "categoryCount": [counts[c] for c in roots],
        }
