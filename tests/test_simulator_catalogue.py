"""The simulator's catalogue: deterministic from the seed, with the history shapes the
analytics must handle (sales, too-new products, no sales, gaps and -1 runs, triplets)."""

import pytest

from ingest.simulator.catalogue import BOOKS, Catalogue
from ingest.simulator.config import keepa_minute
from ingest.simulator.histories import (
    COUNT_USED, CSV_SLOTS, SALES, TRIPLET_TYPES, USED, product_csv, stride, trim_days,
)
from ingest.simulator.products import ProductOptions, build_product

ANCHOR = keepa_minute(1_700_000_000)


@pytest.fixture(scope="module")
def cat():
    return Catalogue(seed=7, products=800, anchor_km=ANCHOR)


def test_same_seed_same_products_different_seed_different_products(cat):
    twin = Catalogue(seed=7, products=800, anchor_km=ANCHOR)
    other = Catalogue(seed=8, products=800, anchor_km=ANCHOR)
    for i in (0, 1, 99, 799):
        assert twin.profile(i) == cat.profile(i)
        assert product_csv(twin, i, ANCHOR + 600) == product_csv(cat, i, ANCHOR + 600)
    assert [other.asin_of(i) for i in range(20)] != [cat.asin_of(i) for i in range(20)]


def test_asins_are_unique_and_map_back_to_their_index(cat):
    asins = [cat.asin_of(i) for i in range(cat.size)]
    assert len(set(asins)) == cat.size
    assert all(len(a) == 10 and a.isalnum() for a in asins)
    assert all(cat.index_of(a) == i for i, a in enumerate(asins))
    assert any(a.startswith("0") for a in asins)  # ISBN-like ASINs keep their leading zero
    assert cat.index_of("B000000000") is None and cat.index_of("xyz") is None


def test_mostly_books_with_titles(cat):
    roots = [cat.profile(i).root for i in range(cat.size)]
    assert 0.75 < roots.count(BOOKS) / len(roots) < 0.95
    assert all(cat.profile(i).title for i in range(50))


def test_histories_have_36_slots_span_about_three_years_and_increasing_times(cat):
    for i in range(0, 200, 7):
        csv, last_update = product_csv(cat, i, ANCHOR)
        assert len(csv) == CSV_SLOTS
        for csv_type, series in enumerate(csv):
            if series is None:
                continue
            n = stride(csv_type)
            assert len(series) % n == 0
            times = series[0::n]
            assert times == sorted(times) and len(set(times)) == len(times)
            assert times[-1] <= ANCHOR
        if cat.profile(i).kind != "new":
            assert (ANCHOR - csv[SALES][0]) / 1440 > 2.5 * 365


def test_sales_show_as_used_count_drop_with_rank_improvement(cat):
    same_time = later = 0
    for i in range(300):
        csv, _ = product_csv(cat, i, ANCHOR)
        counts, ranks = csv[COUNT_USED], csv[SALES]
        rank_points = list(zip(ranks[0::2], ranks[1::2]))
        for j in range(2, len(counts), 2):
            if counts[j + 1] < counts[j - 1]:  # a drop: a sale
                t = counts[j]
                after = [(rt, rv) for rt, rv in rank_points if t <= rt <= t + 240]
                before = [rv for rt, rv in rank_points if rt < t]
                if after and before and before[-1] > 0 and after[0][1] < before[-1]:
                    same_time += after[0][0] == t
                    later += after[0][0] > t
    assert same_time > 50 and later > 5


def test_history_kinds_are_all_present(cat):
    kinds = {}
    for i in range(cat.size):
        kinds.setdefault(cat.profile(i).kind, []).append(i)
    assert set(kinds) == {"normal", "new", "no_sales", "gappy"}
    new = cat.profile(kinds["new"][0])
    assert 7 * 1440 <= ANCHOR - new.tracking_since <= 60 * 1440
    for i in kinds["no_sales"][:10]:
        counts = product_csv(cat, i, ANCHOR)[0][COUNT_USED]
        assert all(b >= a for a, b in zip(counts[1::2], counts[3::2]))  # never drops
    minus_runs = 0
    for i in kinds["gappy"]:
        csv, _ = product_csv(cat, i, ANCHOR)
        minus_runs += -1 in csv[SALES][1::2]
    assert minus_runs > 0


def test_some_products_have_shipping_triplets(cat):
    with_triplets = 0
    for i in range(100):
        csv, _ = product_csv(cat, i, ANCHOR)
        for csv_type in TRIPLET_TYPES:
            if csv[csv_type]:
                with_triplets += 1
                assert len(csv[csv_type]) % 3 == 0
                break
    assert 5 < with_triplets < 60


def test_deal_updates_move_last_update_and_extend_the_used_history(cat):
    listed = [i for i in cat.deal_indices() if cat.profile(i).deal.start <= ANCHOR][:5]
    for i in listed:
        csv1, last1 = product_csv(cat, i, ANCHOR)
        csv2, last2 = product_csv(cat, i, ANCHOR + 3 * 24 * 60)
        if cat.profile(i).deal.end is None:
            assert last2 > last1
            assert len(csv2[USED]) >= len(csv1[USED])
            assert csv2[USED][:len(csv1[USED]) - 2] == csv1[USED][:-2]


def test_days_keeps_the_window_plus_the_point_active_at_its_start(cat):
    index = next(i for i in range(cat.size) if cat.profile(i).kind == "normal" and not cat.profile(i).deal)
    csv, _ = product_csv(cat, index, ANCHOR)
    trimmed = trim_days(csv, ANCHOR, 30)
    ranks = trimmed[SALES]
    assert ranks[0] < ANCHOR - 30 * 1440 <= ranks[2]
    assert ranks[-2:] == csv[SALES][-2:]


def test_stats_are_per_csv_type(cat):
    product, cost = build_product(cat, 5, ANCHOR, ProductOptions(stats_days=90), 1)
    stats = product["stats"]
    assert cost == 1
    for name in ("current", "avg", "avg30", "avg90", "avg180", "avg365", "min", "max"):
        assert len(stats[name]) == CSV_SLOTS
    assert stats["current"][SALES] == product["csv"][SALES][-1]
    assert stats["min"][SALES] is None or len(stats["min"][SALES]) == 2


def test_keepa_time_epoch_is_2011_01_01_utc():
    from datetime import datetime, timezone

    from ingest.simulator import unix_seconds

    assert unix_seconds(0) == datetime(2011, 1, 1, tzinfo=timezone.utc).timestamp()
    assert keepa_minute(datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp()) == 6_837_120
    assert keepa_minute(unix_seconds(7_000_000)) == 7_000_000
