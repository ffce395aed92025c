from ingest.checkpoints import UpsertWatermark
from ingest.deals import Listing
from ingest.workers.upsert import new_listings


def deal(asin, minute):
    return {"asin": asin, "lastUpdate": minute, "current": [-1, 1000, 500, 20000]}


def test_new_listings_are_sorted_oldest_first_whatever_the_page_order():
    deals = [deal("C", 30), deal("A", 10), deal("B", 20), deal("A", 25)]
    out = new_listings(deals, None, set())
    assert [(l.asin, l.last_update) for l in out] == [("B", 20), ("A", 25), ("C", 30)]


def test_watermark_excludes_older_and_already_stored_at_the_same_minute():
    deals = [deal("A", 9), deal("B", 10), deal("C", 10), deal("D", 11)]
    out = new_listings(deals, 10, {"B"})
    assert [l.asin for l in out] == ["C", "D"]


def test_watermark_advances_only_past_stored_deals():
    checkpoint = UpsertWatermark(watermark=10, at_watermark=("B",))
    stored = [Listing("C", last_update=10), Listing("D", last_update=11), Listing("E", last_update=11)]
    checkpoint = checkpoint.advance(stored[:1])
    assert checkpoint == UpsertWatermark(watermark=10, at_watermark=("B", "C"))
    checkpoint = checkpoint.advance(stored[1:])
    assert checkpoint.watermark == 11 and checkpoint.at_watermark == ("D", "E")
    # a deal updated again later is new again
    assert [l.asin for l in new_listings([deal("D", 12)], 11, {"D", "E"})] == ["D"]


def test_listing_from_deal_treats_minus_one_as_missing():
    listing = Listing.from_deal({"asin": "X", "current": [-1, -1, 1234, -1], "rootCat": 283155, "lastUpdate": 5})
    assert listing.used_price_cents == 1234 and listing.new_price_cents is None and listing.sales_rank is None
