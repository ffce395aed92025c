"""Property tests: whatever Keepa (or a broken fetch) puts in the csv slots, the analytics answer
with a reason, never crash, and never invent a price nobody asked."""

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.analytics import REASONS, AnalyticsParams, evaluate_deal, explain, infer_sales, one_year_average
from ingest.history import USED_TRIPLETS
from tests.test_analytics import DAY, N, NOW

# Times clustered around the last two years so that sales, windows and -1 runs actually occur.
times = st.integers(min_value=N - 730 * DAY, max_value=N + 10 * DAY)
small = st.integers(min_value=-3, max_value=6)  # counts, with -1 and other negatives
ranks = st.one_of(st.just(-1), st.integers(min_value=0, max_value=50))
prices = st.one_of(st.just(-1), st.integers(min_value=0, max_value=5000))
junk = st.one_of(st.none(), st.text(max_size=3), st.floats(allow_nan=True), st.booleans(), st.integers(), st.lists(st.integers(), max_size=2))


def pairs(values, max_size=40):
    return st.lists(st.tuples(times, values), max_size=max_size).map(lambda pts: [x for p in pts for x in p])


def triplets(max_size=10):
    return st.lists(st.tuples(times, prices, st.integers(-1, 500)), max_size=max_size).map(lambda pts: [x for p in pts for x in p])


def csv_of(slot_strategies):
    return st.fixed_dictionaries(slot_strategies).map(lambda d: [d.get(i) for i in range(36)])


well_formed_csv = csv_of(
    {
        1: st.none() | pairs(prices, 5),
        2: st.none() | pairs(prices),
        3: st.none() | pairs(ranks),
        12: st.none() | pairs(small),
        **{i: st.none() | triplets() for i in USED_TRIPLETS},
    }
)

# Dense histories on a 6-hour grid over 30 days: drops and rank improvements coincide often,
# so many examples reach the 'ok' path (the bounds property is vacuous otherwise).
grid = st.integers(min_value=0, max_value=120).map(lambda k: N - 30 * DAY + k * 360)


def mostly(values):
    """Values with an occasional -1 (a plain one_of would make half of them -1)."""
    return st.one_of(values, values, values, values, st.just(-1))


def dense(values, max_size=40):
    return st.lists(st.tuples(grid, values), min_size=4, max_size=max_size).map(lambda pts: [x for p in pts for x in p])


dense_csv = csv_of(
    {
        1: st.none() | dense(prices, 5),
        2: st.one_of(dense(mostly(st.integers(1, 5000))), dense(prices), st.none()),
        3: dense(mostly(st.integers(1, 30))),
        12: dense(mostly(st.integers(0, 5))),
        **{i: st.none() | st.lists(st.tuples(grid, prices, st.integers(-1, 500)), max_size=10).map(lambda pts: [x for p in pts for x in p]) for i in USED_TRIPLETS},
    }
)

def _from_events(events):
    """A plausible history driven by events (sale, late sale, new listing, withdrawal, gap,
    repricing): lists alone rarely line up a count drop with a rank improvement."""
    used, rank, count = [], [], []
    t, c, r = N - 300 * DAY, 3, 500_000
    used.append((t, 2000))
    rank.append((t, r))
    count.append((t, c))
    for kind, value in events:
        t += value % 7 * DAY + 60
        if kind in ("sale", "late_sale", "withdraw"):
            c = max(c - 1, 0)
            count.append((t, c))
            if kind != "withdraw":
                r = max(1, r // 4)
                rank.append((t + (value % 4) * 60 + (30 * 60 if kind == "late_sale" else 0), r))
        elif kind == "list":
            c += 1
            count.append((t, c))
            used.append((t, value))
        elif kind == "gap":
            for series in (count, rank, used):
                series.append((t, -1))
        else:
            used.append((t, value))
        r = r * 3
        rank.append((t + DAY // 2, r))
    return {2: [x for p in used for x in p], 3: [x for p in rank for x in p], 12: [x for p in count for x in p]}


def _as_triplets(slots, shipping):
    """The same history with the used price in a used shipping triplet slot instead of slot 2."""
    pairs = slots.pop(2)
    slots[21] = [x for i in range(0, len(pairs), 2) for x in (pairs[i], pairs[i + 1], shipping)]
    return slots


event_slots = st.lists(
    st.tuples(st.sampled_from(["sale", "sale", "late_sale", "list", "withdraw", "gap", "price"]), st.integers(1, 5000)),
    max_size=40,
).map(_from_events)
event_csv = st.one_of(
    event_slots,
    st.builds(_as_triplets, event_slots, st.integers(-1, 600)),
).map(lambda slots: [slots.get(i) for i in range(36)])

products = st.one_of(
    st.fixed_dictionaries({"asin": st.just("B0EVENTS"), "csv": event_csv, "trackingSince": st.just(N - 400 * DAY)}),
    st.fixed_dictionaries(
        {"asin": st.just("B0PROPERTY"), "csv": well_formed_csv},
        optional={"trackingSince": st.one_of(times, junk)},
    ),
    st.fixed_dictionaries({"asin": st.just("B0DENSE"), "csv": dense_csv, "trackingSince": st.just(N - 400 * DAY)}),
)

anything_csv = st.one_of(
    junk,
    st.lists(st.one_of(junk, st.lists(st.one_of(st.integers(-2, 10**7), junk), max_size=12)), max_size=40),
)
garbage_products = st.one_of(
    st.fixed_dictionaries({"csv": anything_csv}, optional={"trackingSince": junk, "stats": junk}),
    st.fixed_dictionaries({}),
)

params = st.builds(
    AnalyticsParams,
    confirm_window_hours=st.sampled_from([0, 1, 24, 72]),
    min_tracked_days=st.sampled_from([0, 90]),
    outlier_factor=st.sampled_from([0, 1, 1.5, 3.0]),
    outlier_min_sales=st.integers(1, 4),
)


def observed_used_prices(csv) -> set[int]:
    """Every used price the product shows, read straight from the raw slots."""
    def values(slot, stride):
        raw = csv[slot] or []
        return [sum(x for x in raw[i + 1 : i + stride] if x > 0) for i in range(0, len(raw), stride) if raw[i + 1] > 0]

    used = set(values(2, 2))
    return used or {p for slot in USED_TRIPLETS for p in values(slot, 3)}


@settings(max_examples=400, deadline=None)
@given(garbage_products, params)
def test_arbitrary_contents_never_crash(product, p):
    avg = one_year_average(product, NOW, p)
    assert avg.reason in REASONS
    deal = evaluate_deal(product, NOW, p)
    assert deal.status in ("accepted", "rejected", "incomplete")
    explain(product, NOW, p)
    infer_sales(product, NOW, p)


@settings(max_examples=600, deadline=None)
@given(products, params)
def test_value_is_always_within_the_observed_used_prices(product, p):
    avg = one_year_average(product, NOW, p)
    assert avg.reason in REASONS
    assert (avg.value_cents is not None) == (avg.reason == "ok") == (avg.sales > 0)
    if avg.value_cents is not None:
        observed = observed_used_prices(product["csv"])
        assert min(observed) <= avg.value_cents <= max(observed)
        assert set(avg.prices) | set(avg.outliers) <= observed
        assert min(avg.prices) <= avg.value_cents <= max(avg.prices)


@settings(max_examples=300, deadline=None)
@given(products, params)
def test_incomplete_exactly_when_history_is_missing(product, p):
    deal = evaluate_deal(product, NOW, p)
    assert (deal.status == "incomplete") == (deal.average.reason == "no_history")
    if deal.status == "accepted":
        assert deal.current_used_cents is not None and deal.current_used_cents <= deal.average.value_cents


@settings(max_examples=300, deadline=None)
@given(products, st.lists(st.tuples(st.integers(1, 5000), st.integers(-1, 5000)), max_size=5))
def test_points_after_now_change_nothing(product, future):
    """Replaying with an earlier `now` must not see the future (no look-ahead)."""
    then = NOW - timedelta(days=30)
    before = one_year_average(product, then)
    cut = N - 30 * DAY
    extended = {**product, "csv": list(product["csv"])}
    for slot in (2, 3, 12):
        extended["csv"][slot] = (extended["csv"][slot] or []) + [x for dt, v in future for x in (cut + dt, v)]
    assert one_year_average(extended, then) == before


@settings(max_examples=200, deadline=None)
@given(products, st.randoms(use_true_random=False))
def test_order_of_points_does_not_matter_when_timestamps_are_unique(product, rng):
    csv = list(product["csv"])
    for slot in (2, 3, 12):
        raw = csv[slot] or []
        points = list({raw[i]: raw[i : i + 2] for i in range(0, len(raw), 2)}.values())  # unique times
        rng.shuffle(points)
        csv[slot] = [x for p in points for x in p]
    ordered = {**product, "csv": [sorted_pairs(s) if i in (2, 3, 12) else s for i, s in enumerate(csv)]}
    assert one_year_average({**product, "csv": csv}, NOW) == one_year_average(ordered, NOW)


def sorted_pairs(raw):
    if not raw:
        return raw
    points = sorted(raw[i : i + 2] for i in range(0, len(raw), 2))
    return [x for p in points for x in p]


def test_zero_price_triplet_with_shipping_is_not_a_price():
    """Found by hypothesis in CI: [t, 0, 1] in a used triplet slot was read as a 1-cent price."""
    csv = [None] * 36
    csv[3] = [7012800, -1, 7012800, -1, 7012800, 2, 7013160, 1]
    csv[12] = [7012800, -1, 7012800, -1, 7012800, 1, 7013160, 0]
    csv[22] = [7012800, 0, 1]
    product = {"asin": "B0DENSE", "csv": csv, "trackingSince": 6480000}
    p = AnalyticsParams(confirm_window_hours=0, min_tracked_days=0, outlier_factor=0, outlier_min_sales=1)
    avg = one_year_average(product, NOW, p)
    assert avg.value_cents is None
