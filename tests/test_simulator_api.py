"""The simulator over real HTTP on loopback: envelope, token rules, costs, keys, gzip, deals,
products and bad input. Time is a FakeClock shared with the server (no sleeping)."""

import gzip
import json
import math
import urllib.request

import pytest
import requests

from ingest.simulator import keepa_minute
from ingest.simulator import deals as deals_module

ENVELOPE = {"timestamp", "tokensLeft", "refillIn", "refillRate", "tokenFlowReduction", "tokensConsumed",
            "processingTimeInMs"}


SIM_PRODUCTS = 600  # the make_sim fixture (conftest) reads it


@pytest.fixture
def sim(make_sim):
    return make_sim()


def deal(sim, key="k", **selection):
    selection.setdefault("priceTypes", [2])
    return requests.get(f"{sim.url}/deal", params={"key": key, "selection": json.dumps(selection)}, timeout=10)


def product(sim, asins, key="k", **params):
    return requests.get(f"{sim.url}/product", params={"key": key, "domain": 1, "asin": ",".join(asins), **params},
                        timeout=10)


def all_deals(sim, **selection):
    out, page = [], 0
    while True:
        body = deal(sim, page=page, **selection).json()
        out += body["deals"]["dr"]
        if len(body["deals"]["dr"]) < 150:
            return out, page
        page += 1


# -- envelope and token rules ----------------------------------------------------------------

def test_every_body_carries_the_token_envelope(sim, clock):
    answers = [
        requests.get(f"{sim.url}/token", params={"key": "k"}),
        deal(sim),
        product(sim, [sim.app.catalogue.asin_of(0)]),
        requests.get(f"{sim.url}/nowhere", params={"key": "k"}),
        deal(sim, priceTypes=[1, 2]),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 404, 400]
    for answer in answers:
        body = answer.json()
        assert ENVELOPE <= set(body)
        assert body["timestamp"] == int(clock.wall() * 1000)
        assert body["refillRate"] == 300
    assert answers[3].json()["error"]["type"] == "notFound"


def test_costs_deal_page_and_products_found(sim):
    cat = sim.app.catalogue
    assert deal(sim).json()["tokensConsumed"] == 5
    answer = product(sim, [cat.asin_of(1), cat.asin_of(2), "B0ZZZZZZZZ"]).json()
    assert answer["tokensConsumed"] == 2 and len(answer["products"]) == 2
    assert answer["tokensLeft"] == 18000 - 5 - 2


def test_costs_offers_buybox_rating_update(sim):
    cat = sim.app.catalogue
    asins = [cat.asin_of(i) for i in range(5)]
    with_offers = product(sim, asins, offers=20).json()
    expected = sum(6 * max(1, math.ceil(len(p["offers"]) / 10)) for p in with_offers["products"])
    assert with_offers["tokensConsumed"] == expected
    assert any(len(p["offers"]) > 10 for p in with_offers["products"])  # some cost 12
    assert product(sim, asins, buybox=1).json()["tokensConsumed"] == 5 * 3
    rated = sum(cat.profile(i).rating >= 0 for i in range(5))
    rating = product(sim, asins, rating=1).json()
    assert rating["tokensConsumed"] == 5 + rated
    assert product(sim, asins, update=0).json()["tokensConsumed"] == 10
    assert product(sim, asins, stats=90, history=1, days=30).json()["tokensConsumed"] == 5


def test_zero_balance_is_refused_with_429_costing_nothing(make_sim, clock):
    sim = make_sim(start_tokens=0, refill_rate=5)
    refused = deal(sim)
    body = refused.json()
    assert refused.status_code == 429
    assert body["tokensLeft"] == 0 and body["tokensConsumed"] == 0 and 0 < body["refillIn"] <= 60_000
    assert body["error"]["type"] == "notEnoughToken"
    assert requests.get(f"{sim.url}/token", params={"key": "k"}).status_code == 200  # free status
    clock.advance(60)
    assert deal(sim).json()["tokensLeft"] == 0  # 5 refilled, 5 spent
    assert deal(sim).status_code == 429
    assert sim.stats()["served_429"] == 2


def test_a_positive_balance_runs_a_call_into_deficit(make_sim):
    sim = make_sim(start_tokens=1, refill_rate=5)
    cat = sim.app.catalogue
    answer = product(sim, [cat.asin_of(i) for i in range(4)])
    assert answer.status_code == 200 and answer.json()["tokensLeft"] == -3
    refused = product(sim, [cat.asin_of(9)])
    assert refused.status_code == 429 and refused.json()["tokensLeft"] == -3


def test_refill_in_counts_down_and_the_balance_caps(make_sim, clock):
    sim = make_sim(refill_rate=5, start_tokens=295)
    first = requests.get(f"{sim.url}/token", params={"key": "k"}).json()
    clock.advance(20)
    second = requests.get(f"{sim.url}/token", params={"key": "k"}).json()
    assert first["refillIn"] - second["refillIn"] == 20_000
    clock.advance(60 * 5)
    assert requests.get(f"{sim.url}/token", params={"key": "k"}).json()["tokensLeft"] == 300
    assert sim.stats()["tokens"]["refilled"] == 5


def test_keys_wrong_is_400_expired_is_402(make_sim):
    sim = make_sim(api_keys=("good",), expired_keys=("old",))
    assert requests.get(f"{sim.url}/token").status_code == 400
    wrong = requests.get(f"{sim.url}/token", params={"key": "bad"})
    assert wrong.status_code == 400 and wrong.json()["error"]["type"] == "invalidAccessKey"
    assert ENVELOPE <= set(wrong.json())
    assert requests.get(f"{sim.url}/deal", params={"key": "old", "selection": "{}"}).status_code == 402
    assert requests.get(f"{sim.url}/token", params={"key": "good"}).status_code == 200
    assert "bad" not in wrong.text


def test_gzip_when_asked_and_plain_otherwise(sim):
    req = urllib.request.Request(f"{sim.url}/token?key=k", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert json.loads(gzip.decompress(resp.read()))["refillRate"] == 300
    with urllib.request.urlopen(f"{sim.url}/token?key=k") as resp:
        assert resp.headers.get("Content-Encoding") is None
        assert json.loads(resp.read())["refillRate"] == 300
    req = urllib.request.Request(f"{sim.url}/nowhere?key=k", headers={"Accept-Encoding": "gzip, deflate"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert json.loads(gzip.decompress(err.value.read()))["error"]["type"] == "notFound"  # errors too


# -- deals -----------------------------------------------------------------------------------

def test_paging_ends_with_a_short_page(sim):
    deals, last_page = all_deals(sim)
    assert last_page >= 1 and len(deals) % 150 != 0
    assert len({d["asin"] for d in deals}) == len(deals)
    assert deal(sim, page=last_page + 1).json()["deals"]["dr"] == []
    assert sim.stats()["deal_asins_count"] == len(deals)
    assert set(sim.stats()["deal_asins"]) == {d["asin"] for d in deals}


def test_at_most_10000_results_per_query(sim, monkeypatch):
    monkeypatch.setattr(deals_module, "MAX_RESULTS", 200)
    deals, last_page = all_deals(sim)
    assert len(deals) == 200 and last_page == 1


def test_deal_objects_have_keepa_fields_and_only_recent_updates(sim, clock):
    body = deal(sim).json()["deals"]
    assert set(body) == {"dr", "categoryIds", "categoryNames", "categoryCount"}
    assert body["categoryIds"][0] == 283155 and body["categoryNames"][0] == "Books"
    now_km = keepa_minute(clock.wall())
    for d in body["dr"]:
        assert {"asin", "title", "rootCat", "categories", "image", "creationDate", "lastUpdate", "current",
                "currentSince", "deltaLast", "delta", "deltaPercent", "avg"} <= set(d)
        assert now_km - 12 * 60 <= d["lastUpdate"] <= now_km
        assert len(d["delta"]) == 4 and d["delta"][0][2] < 0  # a used-price drop
        assert "".join(map(chr, d["image"])).endswith(".jpg")


def test_price_types_scalar_or_list_and_post_body(sim):
    listed = deal(sim, priceTypes=[2]).json()["deals"]["dr"]
    assert deal(sim, priceTypes=2).json()["deals"]["dr"] == listed
    java_style = requests.post(f"{sim.url}/deal?key=k&", data=json.dumps({"priceTypes": [2], "page": 0}),
                               headers={"Content-Type": "application/json; charset=UTF-8"})
    assert java_style.json()["deals"]["dr"] == listed
    assert java_style.json()["tokensConsumed"] == 5


def test_filters_and_sorts(sim):
    books, _ = all_deals(sim, includeCategories=[283155])
    assert books and all(d["rootCat"] == 283155 for d in books)
    others, _ = all_deals(sim, excludeCategories=[283155])
    assert others and all(d["rootCat"] != 283155 for d in others)
    ranked, _ = all_deals(sim, isRangeEnabled=True, salesRankRange=[1000, 100000], sortType=3)
    ranks = [d["current"][3] for d in ranked]
    assert ranks and all(1000 <= r <= 100000 for r in ranks) and ranks == sorted(ranks)
    pct, _ = all_deals(sim, isRangeEnabled=True, deltaPercentRange=[40, 100], dateRange=1, sortType=4)
    drops = [abs(d["deltaPercent"][1][2]) for d in pct]
    assert drops and all(40 <= p <= 100 for p in drops) and drops == sorted(drops, reverse=True)
    ignored, _ = all_deals(sim, salesRankRange=[1000, 1001])  # ranges need isRangeEnabled
    assert len(ignored) > len(ranked)
    by_delta, _ = all_deals(sim, sortType=-2)
    deltas = [abs(d["delta"][0][2]) for d in by_delta]
    assert deltas == sorted(deltas)
    newest = deal(sim, sortType=1).json()["deals"]["dr"]
    times = [d["lastUpdate"] for d in newest]
    assert max(times) - min(times[:10]) <= 5  # newest first, give or take Keepa's disorder


def test_deals_move_forward_with_time(make_sim, clock):
    sim = make_sim(deal_update_per_min=60, deal_cache_s=120)
    before = {d["asin"]: d["lastUpdate"] for d in all_deals(sim)[0]}
    clock.advance(90)
    assert {d["asin"]: d["lastUpdate"] for d in all_deals(sim)[0]} == before  # cached 120 s
    clock.advance(30 * 60)
    after = {d["asin"]: d["lastUpdate"] for d in all_deals(sim)[0]}
    moved = [a for a in after if a in before and after[a] > before[a]]
    assert len(moved) > len(before) // 3
    assert set(after) - set(before)  # new deals appeared
    clock.advance(48 * 3600)
    assert all(d["lastUpdate"] >= keepa_minute(clock.wall()) - 720 for d in all_deals(sim)[0])


def test_bad_selections_are_400(sim):
    for raw in ("{not json", "[1,2]", json.dumps({"page": -1}), json.dumps({"priceTypes": [1, 2]}),
                json.dumps({"salesRankRange": [1]}), json.dumps({"dateRange": 9})):
        answer = requests.get(f"{sim.url}/deal", params={"key": "k", "selection": raw})
        assert answer.status_code == 400, raw
        assert answer.json()["tokensConsumed"] == 0 and answer.json()["error"]["type"] == "invalidParameter"
    assert requests.get(f"{sim.url}/deal", params={"key": "k"}).status_code == 400
    assert sim.stats()["tokens"]["consumed"] == 0


# -- products --------------------------------------------------------------------------------

def test_product_objects(sim, clock):
    cat = sim.app.catalogue
    body = product(sim, [cat.asin_of(i) for i in range(10)], stats=180).json()
    for p in body["products"]:
        assert len(p["csv"]) == 36 and None in p["csv"]
        assert p["rootCategory"] == cat.profile(cat.index_of(p["asin"])).root
        assert p["trackingSince"] < p["lastUpdate"] <= keepa_minute(clock.wall())
        assert len(p["stats"]["current"]) == 36
    assert product(sim, [cat.asin_of(0)], history=0).json()["products"][0]["csv"] is None
    full = product(sim, [cat.asin_of(0)]).json()["products"][0]["csv"][3]
    recent = product(sim, [cat.asin_of(0)], days=30).json()["products"][0]["csv"][3]
    assert len(recent) < len(full) and recent[-2:] == full[-2:]


def test_asin_list_limits(sim):
    cat = sim.app.catalogue
    too_many = product(sim, [cat.asin_of(i) for i in range(101)])
    assert too_many.status_code == 400 and too_many.json()["tokensConsumed"] == 0
    assert product(sim, [cat.asin_of(i) for i in range(100)]).status_code == 200
    malformed = product(sim, ["short", cat.asin_of(0)])
    assert malformed.status_code == 200 and "products" not in malformed.json()
    assert product(sim, [cat.asin_of(0)], offers=5).status_code == 405
    no_domain = requests.get(f"{sim.url}/product", params={"key": "k", "asin": cat.asin_of(0)})
    assert no_domain.status_code == 400


def test_stats_endpoint_counts(sim):
    deal(sim)
    product(sim, [sim.app.catalogue.asin_of(0)])
    requests.get(f"{sim.url}/token", params={"key": "k"})
    requests.get(f"{sim.url}/missing", params={"key": "k"})
    stats = requests.get(f"{sim.url}/_sim/stats").json()
    assert stats == sim.stats()  # admin calls are not counted
    assert stats["requests"]["/deal"] == 1 and stats["requests"]["/product"] == 1
    assert stats["requests"]["/token"] == 1 and stats["requests"]["other"] == 1
    assert stats["tokens"]["consumed"] == 6 and stats["products_returned"] == 1
    assert stats["statuses"]["404"] == 1 and stats["deal_asins_count"] == 150
    assert set(stats["faults"]) == {"500", "redirect", "timeout", "malformed", "drip", "slow", "no_history", "forced_429", "forced_402"}
