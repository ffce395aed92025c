"""Clients that are not ours work unchanged: the wire format the `keepa` PyPI package and
Keepa's Java client use, reproduced with plain requests / urllib (neither is installed)."""

import gzip
import json
import urllib.error
import urllib.request
from urllib.parse import urlencode

import pytest
import requests

from ingest.simulator import SimConfig, Simulator

KEY = "k" * 64
SHIPPING_SLOTS = {7, *range(18, 30), 32}  # the package parses every "*_SHIPPING" slot as triplets


@pytest.fixture
def sim():
    with Simulator(SimConfig(products=500, api_keys=(KEY,))) as s:
        yield s


def pypi_request(sim, endpoint, payload):
    """As the keepa package does: GET <base>/<endpoint>/? with a params dict, then .json()."""
    raw = requests.get(f"{sim.url}/{endpoint}/?", payload, timeout=10)
    return raw.status_code, raw.json()


def test_keepa_package_style_status_deals_and_products(sim):
    code, status = pypi_request(sim, "token", {"key": KEY})
    assert code == 200 and {"tokensLeft", "refillIn", "refillRate", "timestamp"} <= set(status)
    deal_parms = {"page": 0, "domainId": 1, "excludeCategories": [1064954], "includeCategories": [283155]}
    deal_parms.setdefault("priceTypes", 0)  # the package's default: a scalar
    code, body = pypi_request(sim, "deal", {"key": KEY, "domain": 1, "selection": json.dumps(deal_parms)})
    assert code == 200 and set(body["deals"]) >= {"dr", "categoryIds", "categoryNames", "categoryCount"}
    asins = [sim.app.catalogue.asin_of(i) for i in range(20)]
    payload = {"asin": ",".join(asins), "key": KEY, "domain": 1, "stats": 90, "history": 1, "rating": 0,
               "buybox": 0, "stock": 0, "videos": 0, "aplus": 0}
    code, body = pypi_request(sim, "product", payload)
    assert code == 200 and len(body["products"]) == 20
    for product in body["products"]:
        csv = product["csv"]
        for index, series in enumerate(csv):
            if series:  # what the package's csv parser slices
                n = 3 if index in SHIPPING_SLOTS else 2
                assert len(series[0::n]) == len(series[1::n])
        for value in product["stats"]["min"]:
            assert value is None or (isinstance(value, list) and len(value) == 2)


def test_keepa_package_reads_429_then_waits_per_refill_in(sim):
    requests.post(f"{sim.url}/_sim/tokens", json={"tokens": 0})
    code, body = pypi_request(sim, "product", {"key": KEY, "domain": 1, "asin": sim.app.catalogue.asin_of(0)})
    assert code == 429
    assert body["tokensLeft"] == 0 and body["timestamp"] > 0 and 0 < body["refillIn"] <= 60_000


def java_request(sim, path, params=None, post=None):
    """As Keepa's Java client does: key first, always gzip, POST JSON for deals, gunzip every body."""
    url = f"{sim.url}/{path}?key={KEY}&{urlencode(params or {})}"
    headers = {"User-Agent": "KEEPA-JAVA Framework-", "Connection": "keep-alive", "Accept-Encoding": "gzip"}
    data = None
    if post is not None:
        headers["Content-Type"] = "application/json; charset=UTF-8"
        data = post.encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if post else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(gzip.GzipFile(fileobj=resp).read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(gzip.decompress(e.read()))


def test_java_client_style(sim):
    deal_request = {"page": 0, "domainId": 1, "priceTypes": [2], "dateRange": 0, "sortType": 0,
                    "isLowest": False, "isRangeEnabled": False, "isFilterEnabled": False, "hasReviews": False,
                    "filterErotic": False, "isLowestOffer": False, "isBackInStock": False, "isOutOfStock": False,
                    "isPrimeExclusive": False, "mustHaveAmazonOffer": False, "mustNotHaveAmazonOffer": False}
    code, body = java_request(sim, "deal", post=json.dumps(deal_request))
    assert code == 200 and len(body["deals"]["dr"]) == 150 and body["tokensConsumed"] == 5
    asins = ",".join(d["asin"] for d in body["deals"]["dr"][:100])
    code, body = java_request(sim, "product", {"domain": 1, "asin": asins, "stats": 180})
    assert code == 200 and len(body["products"]) == 100
    code, body = java_request(sim, "nonexistent")
    assert code == 404 and body["error"]["type"] == "notFound" and "refillIn" in body
