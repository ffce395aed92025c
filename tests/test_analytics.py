"""Hand-built Keepa histories, one per reason and edge of the 1yr average and the deal decision."""

import random
from datetime import datetime, timedelta, timezone

import pytest

from ingest.analytics import AnalyticsParams, evaluate_deal, explain, infer_sales, one_year_average
from ingest.errors import ConfigError
from ingest.keepatime import datetime_to_keepa_minutes

NOW = datetime(2024, 6, 1, tzinfo=timezone.utc)
N = datetime_to_keepa_minutes(NOW)
HOUR, DAY = 60, 1440


def flat(points):
    return [x for point in points for x in point]


def build(used=None, rank=None, count=None, new=None, tracked_days=400, triplets=None, **extra):
    """A product; each history is a list of (days_ago, value) or (days_ago, price, shipping)."""
    csv = [None] * 36
    for slot, points in ((1, new), (2, used), (3, rank), (12, count), *(triplets or {}).items()):
        if points is not None:
            csv[slot] = flat((N - round(ago * DAY), *values) for ago, *values in points)
    product = {"asin": "0000000001", "title": "A book", "csv": csv, **extra}
    if tracked_days is not None:
        product["trackingSince"] = N - tracked_days * DAY
    return product


def one_sale(days_ago=100, price=1500, rank_lag_hours=1.0, **kw):
    """Steady state since day 300 (or earlier), one used copy sold `days_ago`, confirmed by a
    rank jump `rank_lag_hours` later (negative: before)."""
    start, lag = max(300, days_ago + 30), rank_lag_hours / 24
    return build(
        used=[(start, price), (days_ago, price + 500)],
        rank=[(start, 800_000), (days_ago - lag, 40_000), (days_ago - 2, 300_000)],
        count=[(start, 4), (days_ago, 3)],
        **kw,
    )


# --- reasons -------------------------------------------------------------------------------


@pytest.mark.parametrize("csv", ["missing", None, [], [None] * 36, "garbage", [[]] * 36])
def test_no_csv_is_no_history_and_incomplete_never_rejected(csv):
    product = {"asin": "X", "trackingSince": N - 400 * DAY}
    if csv != "missing":
        product["csv"] = csv
    avg = one_year_average(product, NOW)
    assert (avg.value_cents, avg.reason, avg.sales, avg.missing) == (None, "no_history", 0, ("csv",))
    deal = evaluate_deal(product, NOW)
    assert (deal.status, deal.reason) == ("incomplete", "no_history")


def test_missing_count_slot_is_incomplete_no_used_history():
    product = one_sale()
    product["csv"][12] = None
    assert one_year_average(product, NOW).missing == ("count_used",)
    assert (evaluate_deal(product, NOW).status, evaluate_deal(product, NOW).reason) == ("incomplete", "no_used_history")


def test_missing_rank_slot_is_incomplete_no_rank_history():
    product = one_sale()
    product["csv"][3] = [N - 300 * DAY, -1, N - 10 * DAY, -1]  # only "no data" points: no rank at all
    deal = evaluate_deal(product, NOW)
    assert (deal.status, deal.reason, deal.average.reason) == ("incomplete", "no_rank_history", "no_history")


def test_sales_without_any_used_price_are_incomplete():
    product = one_sale()
    product["csv"][2] = None
    avg = one_year_average(product, NOW)
    assert (avg.reason, avg.missing) == ("no_history", ("used",))
    assert evaluate_deal(product, NOW).reason == "no_used_history"


def test_too_new():
    avg = one_year_average(one_sale(days_ago=10, tracked_days=30), NOW)
    assert (avg.reason, avg.value_cents) == ("too_new", None)
    assert avg.tracked_days == 30
    deal = evaluate_deal(one_sale(days_ago=10, tracked_days=30), NOW)
    assert (deal.status, deal.reason) == ("rejected", "too_new")


def test_too_new_without_tracking_since_uses_the_first_csv_point():
    product = build(used=[(20, 900)], rank=[(20, 5000)], count=[(20, 2)], tracked_days=None)
    assert one_year_average(product, NOW).reason == "too_new"
    assert one_year_average(product, NOW, AnalyticsParams(min_tracked_days=10)).reason == "no_sales"


def test_no_sales_when_the_count_never_drops():
    product = build(used=[(300, 1000)], rank=[(300, 5000), (200, 4000)], count=[(300, 2), (200, 3)])
    avg = one_year_average(product, NOW)
    assert (avg.reason, avg.value_cents, avg.sales) == ("no_sales", None, 0)
    deal = evaluate_deal(product, NOW)
    assert (deal.status, deal.reason) == ("rejected", "no_sales")


def test_sales_only_older_than_a_year_are_no_sales():
    product = one_sale(days_ago=500, tracked_days=900)
    assert one_year_average(product, NOW).reason == "no_sales"
    assert len(infer_sales(product, NOW)) == 1  # the sale exists, just outside the window
    assert [s["in_window"] for s in explain(product, NOW)["sales"]] == [False]


def test_a_single_sale():
    avg = one_year_average(one_sale(price=1234), NOW)
    assert (avg.value_cents, avg.reason, avg.sales, avg.prices) == (1234, "ok", 1, (1234,))
    assert avg.window_end == NOW and avg.window_start == NOW - timedelta(days=365)


# --- sale inference ------------------------------------------------------------------------


def test_count_drop_without_rank_improvement_is_not_a_sale():
    product = build(used=[(300, 1000)], rank=[(300, 5000), (100, 9000)], count=[(300, 3), (100, 2)])
    assert infer_sales(product, NOW) == []


def test_synchronous_offer_and_rank_change_is_a_sale():
    assert len(infer_sales(one_sale(rank_lag_hours=0), NOW)) == 1


def test_confirmation_window_is_inclusive_and_configurable():
    product = one_sale(rank_lag_hours=24)  # rank improves exactly 24 h after the drop
    assert len(infer_sales(product, NOW)) == 1
    assert infer_sales(one_sale(rank_lag_hours=25), NOW) == []
    assert len(infer_sales(one_sale(rank_lag_hours=25), NOW, AnalyticsParams(confirm_window_hours=30))) == 1


def test_rank_improvement_before_the_drop_does_not_confirm_it():
    assert infer_sales(one_sale(rank_lag_hours=-3), NOW) == []


def test_one_rank_improvement_confirms_one_drop():
    product = build(
        used=[(300, 1000)],
        rank=[(300, 500_000), (99.5, 20_000)],
        count=[(300, 5), (100, 4), (99.9, 3)],
    )
    assert len(infer_sales(product, NOW)) == 1


def test_sparse_history_far_apart_points_do_not_confirm():
    sparse = build(used=[(300, 1000)], rank=[(300, 500_000), (150, 20_000)], count=[(300, 4), (200, 3)])
    assert infer_sales(sparse, NOW) == []
    together = build(used=[(300, 1000)], rank=[(300, 500_000), (200, 20_000)], count=[(300, 4), (200, 3)])
    assert one_year_average(together, NOW).value_cents == 1000


def test_no_data_runs_are_no_change():
    product = build(
        used=[(300, 1000)],
        # rank -1 run between 500k and 20k: the step from -1 is not an improvement
        rank=[(300, 500_000), (101, -1), (100, 20_000)],
        # count 5 -> -1 -> 3 is not a drop either
        count=[(300, 5), (50, -1), (49.9, 3)],
    )
    assert infer_sales(product, NOW) == []
    product["csv"][3] += [N - 49 * DAY, 10_000]  # now a real improvement after the count gap
    assert infer_sales(product, NOW) == []  # ... but the count step came from -1


def test_count_drop_to_zero_is_a_sale():
    product = build(used=[(300, 700), (100, -1)], rank=[(300, 90_000), (100, 3_000)], count=[(300, 1), (100, 0)])
    assert one_year_average(product, NOW).value_cents == 700
    assert evaluate_deal(product, NOW).reason == "no_used_offer"


def test_price_is_the_one_in_force_before_the_drop_no_look_ahead():
    # The cheapest copy (800) sells: Keepa records count 3->2 and used 800->1400 in one update.
    product = build(
        used=[(300, 900), (150, 800), (100, 1400), (99, 300)],
        rank=[(300, 500_000), (100, 20_000)],
        count=[(300, 3), (100, 2)],
    )
    assert [s.price_cents for s in infer_sales(product, NOW)] == [800]


def test_used_shipping_triplets_when_slot_2_is_empty():
    product = build(
        rank=[(300, 500_000), (100, 20_000)],
        count=[(300, 3), (100, 2)],
        triplets={21: [(300, 1000, 399)], 22: [(300, 900, 0), (200, -1, 0)], 19: [(300, 2000, -1)]},
    )
    # at the sale: GOOD 1000+399, ACCEPTABLE gone (-1), LIKE NEW 2000 (shipping -1 = free)
    assert one_year_average(product, NOW).value_cents == 1399


def test_unsorted_and_duplicate_timestamps():
    base = build(
        used=[(300, 1000), (200, 1100), (100, 1200), (50, 1300)],
        rank=[(300, 500_000), (199.9, 30_000), (150, 400_000), (99.9, 25_000), (60, 300_000), (49.9, 10_000)],
        count=[(300, 5), (200, 4), (100, 3), (50, 2)],
    )
    expected = one_year_average(base, NOW)
    assert expected.prices == (1000, 1100, 1200)
    shuffled = {**base, "csv": list(base["csv"])}
    rng = random.Random(5)
    for slot in (2, 3, 12):
        points = [shuffled["csv"][slot][i : i + 2] for i in range(0, len(shuffled["csv"][slot]), 2)]
        rng.shuffle(points)
        shuffled["csv"][slot] = flat(points)
    assert one_year_average(shuffled, NOW) == expected
    # A duplicated timestamp: the later point in the list wins (here the count did not drop).
    dup = {**base, "csv": list(base["csv"])}
    dup["csv"][12] = base["csv"][12] + [N - 50 * DAY, 3]
    assert one_year_average(dup, NOW).prices == (1000, 1100)


def test_malformed_slot_contents_are_skipped_not_fatal():
    product = one_sale(price=1500)
    product["csv"][12] = product["csv"][12] + ["x", None, 7]  # junk point and a trailing partial point
    product["csv"][5] = "not a list"
    product["csv"][1] = [N - DAY, 12.5]
    assert one_year_average(product, NOW).value_cents == 1500
    assert evaluate_deal(product, NOW).current_new_cents is None


# --- window, median, outliers ------------------------------------------------------------


def test_window_is_now_minus_365_days_exclusive_to_now_inclusive():
    assert one_year_average(one_sale(days_ago=365, tracked_days=900), NOW).reason == "no_sales"
    assert one_year_average(one_sale(days_ago=365 - 1 / DAY, tracked_days=900), NOW).reason == "ok"


def test_history_after_now_is_ignored():
    product = one_sale(days_ago=100)
    earlier = NOW - timedelta(days=150)
    assert one_year_average(product, earlier).reason == "no_sales"
    assert one_year_average(product, NOW - timedelta(days=99)).reason == "ok"


def many_sales(prices):
    used, rank, count = [], [], []
    for k, price in enumerate(prices):
        day = 300 - 10 * k
        used.append((day + 1, price))
        count += [(day + 1, 10), (day, 9)]
        rank += [(day + 1, 600_000), (day, 30_000)]
    return build(used=used + [(5, 2000)], rank=rank, count=count)


def test_median_of_odd_and_even_counts():
    assert one_year_average(many_sales([1000, 3000, 2000]), NOW).value_cents == 2000
    assert one_year_average(many_sales([1000, 2001, 2000, 1500]), NOW).value_cents == 1750  # (1500+2000)//2


def test_outliers_are_removed_by_the_documented_rule():
    avg = one_year_average(many_sales([1000, 1100, 1200, 9000, 1]), NOW)
    assert avg.outliers == (1, 9000)
    assert avg.prices == (1000, 1100, 1200)
    assert (avg.value_cents, avg.sales) == (1100, 3)


def test_too_few_sales_keep_their_outliers():
    avg = one_year_average(many_sales([1000, 9000]), NOW)
    assert (avg.outliers, avg.value_cents) == ((), 5000)
    assert one_year_average(many_sales([1000, 1100, 9000]), NOW, AnalyticsParams(outlier_factor=0)).outliers == ()


# --- deal evaluation -----------------------------------------------------------------------


def deal_at(used_now, **params):
    product = one_sale(price=2000)
    product["csv"][2] += [N - DAY, used_now]
    product["csv"][1] = [N - 300 * DAY, 3500]
    return evaluate_deal(product, NOW, AnalyticsParams(**params))


def test_accepted_when_the_used_price_is_far_enough_below_the_average():
    deal = deal_at(1600)  # exactly 20 % below 2000
    assert (deal.status, deal.reason) == ("accepted", "ok")
    assert (deal.current_used_cents, deal.current_new_cents, deal.sales_rank) == (1600, 3500, 300_000)
    assert deal.average.value_cents == 2000


def test_rejected_when_not_below_the_average():
    assert (deal_at(1601).status, deal_at(1601).reason) == ("rejected", "not_below_average")
    assert deal_at(1601, min_discount_pct=10).status == "accepted"


def test_rejected_without_a_current_used_offer():
    deal = deal_at(-1)
    assert (deal.status, deal.reason, deal.current_used_cents) == ("rejected", "no_used_offer", None)


def test_max_sales_rank():
    assert deal_at(1000, max_sales_rank=100_000).reason == "rank_too_high"
    assert deal_at(1000, max_sales_rank=300_000).status == "accepted"


def test_explain_lists_every_step():
    product = one_sale(price=1500)
    product["csv"][12] += [N - 50 * DAY, 2]  # an unconfirmed drop
    report = explain(product, NOW)
    assert [(s["price_cents"], s["in_window"]) for s in report["sales"]] == [(1500, True)]
    assert [(d["from"], d["to"]) for d in report["unconfirmed_drops"]] == [(3, 2)]
    assert report["result"] | {} == {**report["result"], "value_cents": 1500, "reason": "ok", "sales": 1}
    assert report["evaluation"]["reason"] == "not_below_average"
    assert report["history"]["slots"]["count_used"]["points"] == 3


# --- params --------------------------------------------------------------------------------


def test_params_from_config():
    assert AnalyticsParams.from_config({}) == AnalyticsParams()
    params = AnalyticsParams.from_config({"analytics": {"min_discount_pct": 30, "confirm_window_hours": 12.5, "max_sales_rank": 10**6}})
    assert (params.min_discount_pct, params.confirm_window_hours, params.max_sales_rank) == (30, 12.5, 10**6)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"min_discount": 3}, "unknown setting"),
        ({"window_days": 365.5}, "whole number"),
        ({"outlier_factor": "3"}, "must be a number"),
        ({"min_tracked_days": True}, "whole number"),
        ({"outlier_factor": 0.5}, "outlier_factor"),
        ({"min_discount_pct": 100}, "min_discount_pct"),
        ({"window_days": 0}, "window_days"),
        ({"confirm_window_hours": float("nan")}, "finite"),
        ({"outlier_factor": float("inf")}, "finite"),
    ],
)
def test_bad_config_is_one_clear_line(table, message):
    with pytest.raises(ConfigError, match=message):
        AnalyticsParams.from_config({"analytics": table})
