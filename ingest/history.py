"""Parsing of Keepa csv slots into clean time series.

A slot is a flat list `[t0, v0, t1, v1, ...]` (Keepa minutes, value), or `[t, price, shipping, ...]`
for the shipping types. Parsing makes these promises the analytics rely on:
- times are strictly increasing: unsorted input is sorted (stable), and for a duplicated
  timestamp the point that came last in the input wins (Keepa appends; the later write is the
  newer reading);
- a triplet becomes one value, price + shipping (a negative shipping counts as free; a missing
  price stays "no data");
- "no data" points (-1, or any negative value) are KEPT: they break the chain, so a step to or
  from them is never read as a change (see `steps_down`), and a price in force is only a price
  when it is positive;
- times outside Keepa's range (negative, or past MAX_MINUTE) are dropped.
Malformed contents (not a list, non-integer entries, a trailing partial point) never raise: the
bad points are skipped. Only whole integers count; Keepa sends nothing else.
"""

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from itertools import compress, repeat
from operator import and_, le, lt

# csv slot indices (../shared/keepa-api.md)
AMAZON, NEW, USED, SALES, COUNT_USED = 0, 1, 2, 3, 12
USED_TRIPLETS = (19, 20, 21, 22)  # USED_{NEW,VERY_GOOD,GOOD,ACCEPTABLE}_SHIPPING
TRIPLET_SLOTS = frozenset({7, *range(18, 30), 32})
NO_DATA = -1
MAX_MINUTE = 2**31  # Keepa minutes are >= 0; past this (year 6094) a "time" is garbage


@dataclass(frozen=True, slots=True)
class Series:
    """One slot's change points: `times` strictly increasing, `values[i]` in force from
    `times[i]` until the next point. A negative value means "no data / no offer"."""

    times: list[int]
    values: list[int]  # negative = no data

    def __len__(self) -> int:
        return len(self.times)

    def has_data(self) -> bool:
        """At least one real value (not only -1 points)."""
        values = self.values
        return bool(values) and (values[-1] >= 0 or values[0] >= 0 or max(values) >= 0)

    def until(self, minute: int) -> "Series":
        """The points recorded at or before `minute` (what was known then: no look-ahead)."""
        end = bisect_right(self.times, minute)
        if end == len(self.times):
            return self
        return Series(self.times[:end], self.values[:end])

    def value_before(self, minute: int) -> int:
        """The value in force just before `minute` (points at `minute` itself excluded); -1 if none."""
        i = bisect_left(self.times, minute)
        return self.values[i - 1] if i else NO_DATA

    def value_at(self, minute: int) -> int:
        """The value in force at `minute` (a point at `minute` included); -1 if none."""
        i = bisect_right(self.times, minute)
        return self.values[i - 1] if i else NO_DATA

    def last(self) -> int:
        return self.values[-1] if self.values else NO_DATA

    def span(self) -> tuple[int, int] | None:
        return (self.times[0], self.times[-1]) if self.times else None


EMPTY = Series([], [])


def parse_slot(raw, triplet: bool = False) -> Series:
    """A csv slot as a Series (see the module doc). Never raises."""
    if not isinstance(raw, list) or not raw:
        return EMPTY
    stride = 3 if triplet else 2
    if len(raw) % stride or not _all_ints(raw):
        raw = _clean_points(raw, stride)
    times = raw[0::stride]
    values = raw[1::stride]
    if triplet:
        values = [_landed(p, s) for p, s in zip(values, raw[2::3])]
    # Keepa sends sorted, distinct times: check that cheaply (C-level compare), fix it if not.
    if not all(map(lt, times, times[1:])):
        times, values = _sorted_unique(times, values)
    if times and (times[0] < 0 or times[-1] > MAX_MINUTE):
        times, values = _in_range(times, values)
    return Series(times, values)


def steps_down(series: Series, start: int, end: int, floor: int) -> list[tuple[int, int, int]]:
    """(time, before, after) for each step where the value fell, with the step's time in
    [start, end]. Both ends of a step must be >= floor: a step to or from -1 is no change."""
    lo = max(bisect_left(series.times, start), 1)
    hi = bisect_right(series.times, end)
    t, v = series.times, series.values
    # `floor <= after < before` also proves before >= floor: no separate check for -1.
    return [(t[i], v[i - 1], v[i]) for i in range(lo, hi) if floor <= v[i] < v[i - 1]]


def step_down_times(series: Series, start: int, end: int, floor: int) -> list[int]:
    """Just the times of `steps_down` (the hot path: C-level when the range has no -1)."""
    t, v = series.times, series.values
    lo = max(bisect_left(t, start), 1)
    hi = bisect_right(t, end)
    if lo >= hi:
        return []
    after = v[lo:hi]
    fell = map(lt, after, v[lo - 1 : hi - 1])
    if min(after) >= floor:  # no "no data" point in range: every fall is a real step
        return list(compress(t[lo:hi], fell))
    # A fall onto a no-data point is no step (a step from one is a rise, never a fall).
    return list(compress(t[lo:hi], map(and_, fell, map(le, repeat(floor), after))))


def _all_ints(raw: list) -> bool:
    # sum() runs in C and is the cheapest full scan: None, str, lists raise TypeError, and any
    # float turns the total into a float. (bool is an int; JSON has no other int subclass.)
    try:
        return type(sum(raw)) is int
    except TypeError:
        return False


def _clean_points(raw: list, stride: int) -> list:
    """The whole points of `raw` whose entries are all plain integers, flattened again."""
    out: list = []
    for i in range(0, len(raw) - stride + 1, stride):
        point = raw[i : i + stride]
        if all(type(x) is int and -(2**62) < x < 2**62 for x in point):
            out.extend(point)
    return out


def _in_range(times: list[int], values: list[int]) -> tuple[list[int], list[int]]:
    kept = [(t, v) for t, v in zip(times, values) if 0 <= t <= MAX_MINUTE]
    return [t for t, _ in kept], [v for _, v in kept]


def _landed(price: int, shipping: int) -> int:
    # A price of 0 is no offer, as in a pair slot (where prices must be > 0): shipping alone
    # is not a price (hypothesis found [t, 0, 1] read as a 1-cent sale).
    if price <= 0:
        return NO_DATA
    return price + shipping if shipping > 0 else price


def _sorted_unique(times: list[int], values: list[int]) -> tuple[list[int], list[int]]:
    # dict keeps the LAST value for a repeated key: the later write of a duplicated timestamp.
    latest = dict(zip(times, values))
    keys = sorted(latest)
    return keys, [latest[k] for k in keys]
