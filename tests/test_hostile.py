"""Hostile input and operator mistakes, against a misbehaving Keepa look-alike of the tests' own
(tests/hostile_server.py) on loopback: the key stays home, every response is bounded, absurd
envelopes never reach the ledger, the database cannot vanish under a worker."""

import threading
import time

import pytest

from ingest.clock import FakeClock
from ingest.keepa import Bounds, KeepaClient, MalformedResponse, RetryPolicy, TransientError
from ingest.metered import open_keepa

from .hostile_server import (REDIRECTS, Answer, Drip, Endless, GzipBomb, HostileServer, KeyTrap, Redirect,
                             Stall, deep_json, sane_envelope)

KEY = "HOSTILEKEY0123456789abcdefRECOGNISABLE"
ONCE = RetryPolicy(attempts=1, max_total_s=5, first_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture
def server():
    with HostileServer() as s:
        yield s


@pytest.fixture
def trap():
    with KeyTrap() as t:
        yield t


def client(url, **kw):
    kw.setdefault("retry", ONCE)
    return KeepaClient(KEY, url, **kw)


# ------------------------------------------------------------------ 1. the key never leaves the host


@pytest.mark.parametrize("status", REDIRECTS)
def test_no_redirect_is_followed_and_the_error_names_only_status_and_host(server, trap, status):
    server.script("product", Redirect(status, f"{trap.url}/product?key={KEY}&asin=B000000001"))
    with pytest.raises(TransientError) as caught:
        client(server.url).products(["B000000001"])
    message = str(caught.value)
    assert f"HTTP {status}" in message and "127.0.0.2:" in message
    assert KEY not in message and "asin" not in message and "/trap" not in message
    assert trap.queries == []  # nothing reached the other host, key or not


def test_the_trap_would_catch_a_followed_redirect(server, trap):
    """The check above can fail: a client that follows redirects hands the trap the key."""
    import requests

    server.script("token", Redirect(302, f"{trap.url}/token?key={KEY}"))
    requests.get(f"{server.url}/token", params={"key": KEY}, timeout=5)
    assert trap.got(KEY)


# ------------------------------------------------------------------ 2. every attempt bounded


def test_a_drip_fed_body_is_abandoned_within_the_deadline(server):
    server.script("token", Drip(interval_s=0.1))
    started = time.monotonic()
    with pytest.raises(TransientError, match="deadline_s = 1 s"):
        client(server.url, bounds=Bounds(deadline_s=1.0)).token_status()
    assert time.monotonic() - started < 1.0 + 1.0


def test_silence_after_the_headers_is_abandoned_within_the_deadline(server):
    server.script("token", Stall(seconds=10))
    started = time.monotonic()
    with pytest.raises(TransientError):
        client(server.url, bounds=Bounds(deadline_s=1.0), read_timeout_s=60).token_status()
    assert time.monotonic() - started < 1.0 + 1.0


@pytest.mark.parametrize("behaviour", [Endless(), GzipBomb(decoded_mb=64)], ids=["endless", "gzip-bomb"])
def test_a_body_past_max_body_is_abandoned(server, behaviour):
    server.script("token", behaviour)
    started = time.monotonic()
    with pytest.raises(TransientError, match="larger than max_body_mb = 1"):
        client(server.url, bounds=Bounds(deadline_s=20, max_body_bytes=2**20)).token_status()
    assert time.monotonic() - started < 5


def test_stop_abandons_an_attempt_in_flight_at_once(server):
    server.script("token", Stall(seconds=30))
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(TransientError, match="stopping"):
        client(server.url, bounds=Bounds(deadline_s=25), stop=stop,
               retry=RetryPolicy(attempts=5, first_delay_s=0.01)).token_status()
    assert time.monotonic() - started < 1.5


def test_the_bounds_come_from_the_keepa_settings(db_path, monkeypatch, server):
    monkeypatch.setenv("KEEPA_API_KEY", KEY)
    monkeypatch.setenv("KEEPA_BASE_URL", server.url)
    keepa = open_keepa(db_path, {"keepa": {"deadline_s": 2.5, "max_body_mb": 3}}, "upsert")
    assert keepa.client.bounds == Bounds(2.5, 3 * 2**20)
    keepa.close()


# ------------------------------------------------------------------ 3. absurd envelopes


ABSURD = {
    "refillIn 10^12": '{"tokensLeft": 50, "refillIn": 1000000000000, "refillRate": 5, "products": []}',
    "refillRate -5": '{"tokensLeft": 50, "refillIn": 1000, "refillRate": -5, "products": []}',
    "refillRate 1e308": '{"tokensLeft": 50, "refillIn": 1000, "refillRate": 1e308, "products": []}',
    "tokensLeft 400 digits": '{"tokensLeft": ' + "9" * 400 + ', "refillIn": 1000, "refillRate": 5, "products": []}',
    "Infinity": '{"tokensLeft": Infinity, "refillIn": 1000, "refillRate": 5, "products": []}',
    "NaN": '{"tokensLeft": 50, "refillIn": NaN, "refillRate": 5, "products": []}',
    "1e999": '{"tokensLeft": 50, "refillIn": 1000, "refillRate": 1e999, "products": []}',
    "deep 100000": deep_json(100_000),
    "deep 500": deep_json(500),
    "tokensConsumed -3": '{"tokensLeft": 50, "refillIn": 1000, "refillRate": 5, "tokensConsumed": -3, "products": []}',
    "timestamp year 2058": '{"tokensLeft": 50, "refillIn": 1000, "refillRate": 5, "timestamp": 2800000000000,'
                           ' "products": []}',
}


@pytest.mark.parametrize("name", sorted(ABSURD))
def test_an_absurd_envelope_never_reaches_the_ledger_and_spending_goes_on(db_path, monkeypatch, server, name):
    monkeypatch.setenv("KEEPA_API_KEY", KEY)
    monkeypatch.setenv("KEEPA_BASE_URL", server.url)
    clock = FakeClock(wall=time.time())
    keepa = open_keepa(db_path, {}, "upsert", clock=clock)
    keepa.client.retry = ONCE
    keepa.token_status()  # a sane sync: 100 tokens, refill 5/min
    before = keepa.ledger.load()
    server.script("product", Answer(ABSURD[name]))
    try:
        keepa.products(["B000000001"])
    except MalformedResponse:
        pass  # unparseable bodies are malformed (the worker retries the batch); never a traceback
    after = keepa.ledger.load()
    assert 0 < after.refill_rate <= 100_000
    assert after.next_tick - clock.wall() <= 60
    assert after.balance <= before.balance and after.balance > -1e6
    # the server answers sanely again: its numbers are taken, the next call is paid and made
    server.script("product", Answer({**sane_envelope(tokensLeft=77, tokensConsumed=1, refillIn=20_000),
                                     "products": [{"asin": "B000000001"}]}))
    page = keepa.products(["B000000001"])
    assert page.products == [{"asin": "B000000001"}]
    synced = keepa.ledger.load()
    assert synced.balance == pytest.approx(77, abs=1) and synced.refill_rate == 5
    keepa.close()
