"""Inferred used sales, the one-year average sale price, and the deal decision.

Pure functions of a Keepa /product object and `now` (no I/O, no clock): every outcome carries
a reason, so "the fetch lost the history" can never again pass for "nobody buys this book".
The rules, in the order they are applied, are in docs/analytics.md; the short version:

- A sale is a drop in the used offer count (csv slot 12) confirmed by a sales-rank (slot 3)
  improvement at the same minute or within `confirm_window_hours` after it. Each rank
  improvement confirms at most one drop. Steps to or from -1 are no change at all.
- Its price is the used price in force just BEFORE the drop: slot 2, or, when slot 2 has no
  data, the lowest of the used shipping triplets (price + shipping, slots 19-22). The price
  recorded at the drop's own minute is already the post-sale price (the cheapest copy is gone).
- The average is the median of the sale prices in (now - window_days, now], after dropping
  outliers: prices outside [median / outlier_factor, median * outlier_factor] when there are at
  least `outlier_min_sales` sales.
- Only what was recorded at or before `now` is used (replaying an old `now` sees no future).
"""

import math
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from datetime import datetime

from .errors import ConfigError
from .history import (
    COUNT_USED,
    EMPTY,
    MAX_MINUTE,
    NEW,
    SALES,
    USED,
    USED_TRIPLETS,
    Series,
    parse_slot,
    step_down_times,
    steps_down,
)
from .keepatime import MINUTES_PER_DAY, datetime_to_keepa_minutes, keepa_minutes_to_datetime
from .settings import parse, setting

REASONS = ("ok", "no_history", "too_new", "no_sales")


@dataclass(frozen=True)
class AnalyticsParams:
    """Tunables, all from the [analytics] config section (same names)."""

    confirm_window_hours: float = setting(24.0, "a rank improvement this long after a count drop still confirms it")
    window_days: int = setting(365, 'the "one year" of the average', max=3650)
    min_tracked_days: int = setting(90, "tracked for less: 'too_new' (a year's average needs some history)", max=3650)
    outlier_factor: float = setting(3.0, "keep sale prices within [median / f, median * f]; 0 = keep all")
    outlier_min_sales: int = setting(3, "with fewer sales, no outlier is removed")
    min_discount_pct: float = setting(20.0, "accept when the used price is at least this far below the average")
    max_sales_rank: int | None = setting(None, "reject slower sellers than this (None = no limit)", kind=int)

    def __post_init__(self):
        if not all(math.isfinite(getattr(self, name)) for name in _FLOAT_SETTINGS):
            raise ConfigError("[analytics] confirm_window_hours, outlier_factor, min_discount_pct must be finite")
        if self.confirm_window_hours < 0 or self.window_days <= 0 or self.min_tracked_days < 0:
            raise ConfigError("[analytics] confirm_window_hours, min_tracked_days must be >= 0, window_days > 0")
        if self.outlier_factor != 0 and self.outlier_factor < 1:
            raise ConfigError("[analytics] outlier_factor must be 0 (off) or >= 1")
        if self.outlier_min_sales < 1 or not 0 <= self.min_discount_pct < 100:
            raise ConfigError("[analytics] outlier_min_sales must be >= 1, min_discount_pct in [0, 100)")
        if self.max_sales_rank is not None and self.max_sales_rank < 1:
            raise ConfigError("[analytics] max_sales_rank must be >= 1 when set")

    @classmethod
    def from_config(cls, config: dict) -> "AnalyticsParams":
        """From the whole config (its [analytics] table). Unknown keys and wrong types: ConfigError."""
        return parse(cls, config.get("analytics"), "analytics")


_FLOAT_SETTINGS = frozenset({"confirm_window_hours", "outlier_factor", "min_discount_pct"})
DEFAULT_PARAMS = AnalyticsParams()


@dataclass(frozen=True, slots=True)
class Sale:
    minute: int  # Keepa minute of the count drop
    price_cents: int | None  # used price in force just before it (None: no used price then)
    confirmed_minute: int  # the rank improvement that confirmed it

    @property
    def time(self) -> datetime:
        return keepa_minutes_to_datetime(self.minute)


@dataclass(frozen=True)
class OneYearAverage:
    value_cents: int | None
    reason: str  # 'ok' | 'no_history' | 'too_new' | 'no_sales'
    sales: int  # sale prices the value is the median of (after outliers)
    window_start: datetime
    window_end: datetime
    prices: tuple[int, ...] = ()  # those prices, ascending
    outliers: tuple[int, ...] = ()  # sale prices dropped by the outlier rule
    missing: tuple[str, ...] = ()  # with 'no_history': 'csv', 'count_used', 'sales_rank', 'used'
    tracked_days: float | None = None


@dataclass(frozen=True)
class DealEvaluation:
    status: str  # 'accepted' | 'rejected' | 'incomplete'
    reason: str  # accepted: 'ok'; rejected: 'too_new', 'no_sales', 'no_used_offer', 'not_below_average', 'rank_too_high'; incomplete: 'no_history', 'no_used_history', 'no_rank_history'
    average: OneYearAverage
    current_used_cents: int | None
    current_new_cents: int | None
    sales_rank: int | None

    def as_dict(self) -> dict:
        """JSON-able: the average (value, reason, sales) and the decision (status, status_reason)."""
        avg = self.average
        return {
            "value": avg.value_cents,
            "reason": avg.reason,
            "sales": avg.sales,
            "status": self.status,
            "status_reason": self.reason,
            "current_used": self.current_used_cents,
            "current_new": self.current_new_cents,
            "sales_rank": self.sales_rank,
            "outliers": list(avg.outliers),
            "missing": list(avg.missing),
            "window_start": avg.window_start.isoformat(),
            "window_end": avg.window_end.isoformat(),
        }


@dataclass
class _History:
    """The slots the analytics need, parsed and cut at `now`."""

    now: int
    csv_present: bool
    count_used: Series = EMPTY
    rank: Series = EMPTY
    used_prices: list[Series] = field(default_factory=list)  # slot 2, or the used triplets
    tracking_since: int | None = None  # trackingSince, else the oldest point read
    new: Series = EMPTY  # slot 1, only loaded for a deal evaluation

    def used_price_before(self, minute: int) -> int | None:
        if len(self.used_prices) == 1:  # the usual case (slot 2): one bisect
            v = self.used_prices[0].value_before(minute)
            return v if v > 0 else None
        prices = [v for s in self.used_prices if (v := s.value_before(minute)) > 0]
        return min(prices) if prices else None

    def used_price_now(self) -> int | None:
        prices = [v for s in self.used_prices if (v := s.value_at(self.now)) > 0]
        return min(prices) if prices else None


def _load(product: dict, now: datetime, with_new: bool = False) -> _History:
    now_minute = datetime_to_keepa_minutes(now)
    csv = product.get("csv") if isinstance(product, dict) else None
    if not isinstance(csv, list):
        return _History(now_minute, csv_present=False)

    def slot(i: int, triplet: bool = False) -> Series:
        return parse_slot(csv[i], triplet).until(now_minute) if i < len(csv) else EMPTY

    used, rank, count = slot(USED), slot(SALES), slot(COUNT_USED)
    if used.has_data():
        used_prices = [used]
    else:
        used_prices = [s for i in USED_TRIPLETS if (s := slot(i, triplet=True)).has_data()]
    # "No history" is judged on what was recorded by `now`: the slots read here, not the others.
    if not (used or rank or count or used_prices):
        return _History(now_minute, csv_present=False)
    tracking = product.get("trackingSince")
    if type(tracking) is not int or not 0 < tracking <= MAX_MINUTE:
        # Without trackingSince, the product is as old as its oldest recorded point.
        tracking = min(s.times[0] for s in (used, rank, count, *used_prices) if s.times)
    return _History(
        now=now_minute,
        csv_present=True,
        count_used=count,
        rank=rank,
        used_prices=used_prices,
        tracking_since=tracking,
        new=slot(NEW) if with_new else EMPTY,
    )


def _infer(history: _History, since: int, params: AnalyticsParams) -> list[tuple[int, int | None, int]]:
    """(drop minute, price or None, confirming minute) for confirmed drops in [since, now]."""
    window = int(params.confirm_window_hours * 60)
    drops = step_down_times(history.count_used, since, history.now, floor=0)
    if not drops:
        return []
    improvements = step_down_times(history.rank, drops[0], history.now, floor=1)
    price_before = history.used_price_before
    if len(history.used_prices) == 1:  # the usual case (slot 2): inline the lookup
        price_times, price_values = history.used_prices[0].times, history.used_prices[0].values

        def price_before(minute: int) -> int | None:
            i = bisect_left(price_times, minute)
            return price_values[i - 1] if i and price_values[i - 1] > 0 else None

    sales = []
    j, n = 0, len(improvements)
    for minute in drops:
        # Greedy in time order: the earliest unused improvement at or after the drop.
        j = bisect_left(improvements, minute, j)
        if j == n:
            break
        if improvements[j] <= minute + window:
            sales.append((minute, price_before(minute), improvements[j]))
            j += 1
    return sales


def infer_sales(product: dict, now: datetime, params: AnalyticsParams = DEFAULT_PARAMS, since: datetime | None = None) -> list[Sale]:
    """Every inferred sale recorded up to `now` (from `since` when given), oldest first."""
    history = _load(product, now)
    start = datetime_to_keepa_minutes(since) if since is not None else -(2**62)
    return [Sale(*sale) for sale in _infer(history, start, params)]


def _median(sorted_prices: list[int]) -> int:
    n = len(sorted_prices)
    mid = n // 2
    if n % 2:
        return sorted_prices[mid]
    return (sorted_prices[mid - 1] + sorted_prices[mid]) // 2  # rounded down to whole cents


def _drop_outliers(sorted_prices: list[int], params: AnalyticsParams) -> tuple[list[int], list[int]]:
    if not params.outlier_factor or len(sorted_prices) < params.outlier_min_sales:
        return sorted_prices, []
    m = _median(sorted_prices)
    lo, hi = m / params.outlier_factor, m * params.outlier_factor
    kept = [p for p in sorted_prices if lo <= p <= hi]
    if not kept:  # only possible for factors near 1 with a wide even split: keep everything
        return sorted_prices, []
    return kept, [p for p in sorted_prices if not lo <= p <= hi]


def _missing(history: _History) -> tuple[str, ...]:
    missing = []
    if not history.count_used.has_data():
        missing.append("count_used")
    if not history.rank.has_data():
        missing.append("sales_rank")
    return tuple(missing)


def _average(history: _History, params: AnalyticsParams) -> OneYearAverage:
    end = keepa_minutes_to_datetime(history.now)
    start_minute = history.now - params.window_days * MINUTES_PER_DAY
    base = dict(window_start=keepa_minutes_to_datetime(start_minute), window_end=end)
    if not history.csv_present:
        return OneYearAverage(None, "no_history", 0, missing=("csv",), **base)
    tracked_days = (history.now - history.tracking_since) / MINUTES_PER_DAY
    base["tracked_days"] = tracked_days
    if tracked_days < params.min_tracked_days:
        return OneYearAverage(None, "too_new", 0, **base)
    if missing := _missing(history):
        return OneYearAverage(None, "no_history", 0, missing=missing, **base)
    # A drop exactly window_days ago is outside: the window is (now - window_days, now].
    sales = _infer(history, start_minute + 1, params)
    priced = sorted(price for _, price, _ in sales if price is not None)
    if sales and not priced:
        # Sales happened but no used price was ever recorded before them: a hole in the data.
        return OneYearAverage(None, "no_history", 0, missing=("used",), **base)
    if not priced:
        return OneYearAverage(None, "no_sales", 0, **base)
    kept, outliers = _drop_outliers(priced, params)
    return OneYearAverage(_median(kept), "ok", len(kept), prices=tuple(kept), outliers=tuple(outliers), **base)


def one_year_average(product: dict, now: datetime, params: AnalyticsParams = DEFAULT_PARAMS) -> OneYearAverage:
    """The median inferred used sale price of the last `window_days`, and why it is what it is."""
    return _average(_load(product, now), params)


_INCOMPLETE_CAUSE = {"csv": "no_history", "count_used": "no_used_history", "used": "no_used_history", "sales_rank": "no_rank_history"}


def _decide(history: _History, average: OneYearAverage, params: AnalyticsParams) -> DealEvaluation:
    used_now = history.used_price_now()
    rank_now = history.rank.value_at(history.now)
    new_now = history.new.value_at(history.now)
    facts = dict(
        average=average,
        current_used_cents=used_now,
        current_new_cents=new_now if new_now > 0 else None,
        sales_rank=rank_now if rank_now > 0 else None,
    )
    if average.reason == "no_history":
        return DealEvaluation("incomplete", _INCOMPLETE_CAUSE[average.missing[0]], **facts)
    if average.reason != "ok":
        return DealEvaluation("rejected", average.reason, **facts)
    if used_now is None:
        return DealEvaluation("rejected", "no_used_offer", **facts)
    if params.max_sales_rank is not None and (facts["sales_rank"] is None or facts["sales_rank"] > params.max_sales_rank):
        return DealEvaluation("rejected", "rank_too_high", **facts)
    if used_now * 100 > average.value_cents * (100 - params.min_discount_pct):
        return DealEvaluation("rejected", "not_below_average", **facts)
    return DealEvaluation("accepted", "ok", **facts)


def evaluate_deal(product: dict, now: datetime, params: AnalyticsParams = DEFAULT_PARAMS) -> DealEvaluation:
    """accepted / rejected (a business reason) / incomplete (refetch: never a rejection)."""
    history = _load(product, now, with_new=True)
    return _decide(history, _average(history, params), params)


def explain(product: dict, now: datetime, params: AnalyticsParams = DEFAULT_PARAMS) -> dict:
    """Every step behind an evaluation, as plain JSON-able data (for `ingest diagnose asin`):
    the history span per slot, each inferred sale (time, price, what confirmed it, whether it is
    in the window), unconfirmed count drops in the window, outliers, result and reason."""
    history = _load(product, now, with_new=True)
    average = _average(history, params)
    evaluation = _decide(history, average, params)
    window_start = history.now - params.window_days * MINUTES_PER_DAY
    sales = [Sale(*sale) for sale in _infer(history, -(2**62), params)] if history.csv_present else []
    confirmed = {s.minute for s in sales}
    drops = steps_down(history.count_used, window_start + 1, history.now, floor=0)
    return {
        "asin": product.get("asin") if isinstance(product, dict) else None,
        "now": _iso(history.now),
        "params": asdict(params),
        "history": {
            "csv_present": history.csv_present,
            "tracking_since": _iso(history.tracking_since),
            "tracked_days": None if average.tracked_days is None else round(average.tracked_days, 2),
            "slots": {
                "count_used": _describe(history.count_used),
                "sales_rank": _describe(history.rank),
                "used_price": [_describe(s) for s in history.used_prices],
            },
        },
        "sales": [
            {"time": _iso(s.minute), "price_cents": s.price_cents, "confirmed_at": _iso(s.confirmed_minute), "in_window": s.minute > window_start}
            for s in sales
        ],
        "unconfirmed_drops": [{"time": _iso(t), "from": a, "to": b} for t, a, b in drops if t not in confirmed],
        "prices_used": list(average.prices),
        "outliers_removed": list(average.outliers),
        "result": {
            "value_cents": average.value_cents,
            "reason": average.reason,
            "sales": average.sales,
            "missing": list(average.missing),
            "window_start": average.window_start.isoformat(),
            "window_end": average.window_end.isoformat(),
        },
        "evaluation": {
            "status": evaluation.status,
            "reason": evaluation.reason,
            "current_used_cents": evaluation.current_used_cents,
            "current_new_cents": evaluation.current_new_cents,
            "sales_rank": evaluation.sales_rank,
            "min_discount_pct": params.min_discount_pct,
        },
    }


def _iso(minute: int | None) -> str | None:
    return None if minute is None else keepa_minutes_to_datetime(minute).isoformat()


def _describe(series: Series) -> dict:
    span = series.span()
    return {
        "points": len(series),
        "no_data_points": sum(1 for v in series.values if v < 0),
        "first": _iso(span[0]) if span else None,
        "last": _iso(span[1]) if span else None,
        "last_value": series.last() if span else None,
    }
