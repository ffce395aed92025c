"""The Keepa client against a real HTTP server on loopback: envelopes, typed errors, retries,
and the key appearing nowhere (logs, exceptions, the database file)."""

import logging
import socket
import traceback

import pytest

from ingest.clock import FakeClock
from ingest.errors import ConfigError
from ingest.keepa import (
    KeepaClient,
    KeepaRequestError,
    MalformedResponse,
    RateLimited,
    RetryPolicy,
    TransientError,
)
from ingest.metered import open_keepa

from .keepa_stub import KeepaStub, Reply, envelope

KEY = "SECRETKEY0123456789abcdefRECOGNISABLE"
FAST = RetryPolicy(attempts=3, max_total_s=5, first_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture
def stub():
    with KeepaStub() as s:
        yield s


def client(url, **kw):
    kw.setdefault("retry", FAST)
    return KeepaClient(KEY, url, domain=1, **kw)


def test_token_status_reads_the_envelope(stub):
    stub.script("token", Reply(200, envelope(tokensLeft=-7, refillIn=12_500, refillRate=20, tokenFlowReduction=1.5)))
    env = client(stub.url).token_status()
    assert (env.status, env.tokens_left, env.refill_in_s, env.refill_rate, env.flow_reduction) == (200, -7, 12.5, 20, 1.5)
    assert env.complete
    endpoint, query = stub.requests[0]
    assert endpoint == "token" and query["key"] == [KEY]


def test_gzip_bodies_are_decoded_errors_included(stub):
    stub.script("product", Reply(200, envelope(products=[{"asin": "B00EXAMPLE"}], tokensConsumed=1), gzip=True))
    page = client(stub.url).products(["B00EXAMPLE"], stats=90, days=30)
    assert page.products == [{"asin": "B00EXAMPLE"}] and page.envelope.tokens_consumed == 1
    _, query = stub.requests[0]
    assert query["asin"] == ["B00EXAMPLE"] and query["stats"] == ["90"] and query["days"] == ["30"] and query["history"] == ["1"]
    stub.script("product", Reply(400, envelope(error={"type": "invalidParameter", "message": "bad"}), gzip=True))
    with pytest.raises(KeepaRequestError) as err:
        client(stub.url).products(["B00EXAMPLE"])
    assert err.value.error_type == "invalidParameter"


def test_deals_sends_selection_and_returns_the_dr_list(stub):
    stub.script("deal", Reply(200, envelope(tokensConsumed=5, deals={"dr": [{"asin": "B0000000A1"}], "categoryIds": [1]})))
    page = client(stub.url).deals({"priceTypes": [0]}, page=3)
    assert page.deals == [{"asin": "B0000000A1"}] and page.raw["categoryIds"] == [1]
    assert '"page":3' in stub.requests[0][1]["selection"][0]
    assert '"domainId":1' in stub.requests[0][1]["selection"][0]


def test_429_is_rate_limited_with_the_envelope_and_not_retried(stub):
    stub.script("deal", Reply(429, envelope(tokensLeft=-12, refillIn=4000, tokensConsumed=0,
                                            error={"type": "NOT_ENOUGH_TOKEN"})))
    with pytest.raises(RateLimited) as err:
        client(stub.url).deals({}, 0)
    assert err.value.envelope.tokens_left == -12 and err.value.envelope.refill_in_s == 4.0
    assert len(stub.requests) == 1


@pytest.mark.parametrize("status", [400, 402, 404, 405])
def test_request_errors_carry_keepas_error_type_and_are_not_retried(stub, status):
    stub.script("product", Reply(status, envelope(error={"type": f"TYPE{status}", "message": f"no {KEY}"})))
    with pytest.raises(KeepaRequestError) as err:
        client(stub.url).products(["B0"])
    assert err.value.error_type == f"TYPE{status}" and err.value.status == status
    assert KEY not in str(err.value)  # even when the server echoes the key
    assert len(stub.requests) == 1


def test_5xx_is_retried_then_succeeds(stub):
    stub.script("product", Reply(500, envelope()), Reply(503, "<html>busy</html>"))
    page = client(stub.url).products(["B0"])
    assert page.products == [] and len(stub.requests) == 3


def test_5xx_beyond_the_attempts_is_transient(stub):
    stub.script("product", *[Reply(502, "bad gateway")] * 3)
    with pytest.raises(TransientError, match="gave up after 3 attempt"):
        client(stub.url).products(["B0"])
    assert len(stub.requests) == 3


def test_retries_stop_at_the_total_time_bound(stub):
    stub.script("token", *[Reply(500, "x")] * 10)
    clock = FakeClock()
    retry = RetryPolicy(attempts=10, max_total_s=1.0, first_delay_s=0.4, max_delay_s=60)
    with pytest.raises(TransientError):
        KeepaClient(KEY, stub.url, retry=retry, clock=clock).token_status()
    assert len(stub.requests) < 10


def test_dropped_connection_and_timeout_are_transient(stub):
    stub.script("token", *[Reply(close=True)] * 3)
    with pytest.raises(TransientError, match="connection"):
        client(stub.url).token_status()
    stub.script("token", *[Reply(delay_s=0.5)] * 3)
    with pytest.raises(TransientError, match="timed out"):
        client(stub.url, read_timeout_s=0.1).token_status()


def test_refused_connection_is_transient_without_the_key():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransientError) as err:
        client(f"http://127.0.0.1:{port}").token_status()
    text = "".join(traceback.format_exception(err.value))
    assert KEY not in text and "key=" not in text.replace("key=<redacted>", "")


@pytest.mark.parametrize("reply,endpoint,match", [
    (Reply(200, envelope()), "product", "without a 'products' list"),
    (Reply(200, envelope()), "deal", "without a 'deals' object"),
    (Reply(200, "<html>not json</html>"), "product", "not JSON"),
    (Reply(200, "[1, 2]"), "deal", "not an object"),
])
def test_200_without_results_is_malformed_never_empty(stub, reply, endpoint, match):
    stub.script(endpoint, reply)
    with pytest.raises(MalformedResponse, match=match):
        c = client(stub.url)
        c.products(["B0"]) if endpoint == "product" else c.deals({}, 0)


def test_missing_key_is_one_line_config_error(db_path):
    with pytest.raises(ConfigError, match="no Keepa API key") as err:
        open_keepa(db_path, {}, "upsert")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the key appears nowhere

ERROR_PATHS = {
    "429_then_ok": [Reply(429, envelope(tokensLeft=-3, refillIn=500, error={"type": "NOT_ENOUGH_TOKEN"}))],
    "400": [Reply(400, envelope(error={"type": "invalidKey", "message": f"key {KEY} is invalid"}))],
    "402": [Reply(402, envelope(error={"type": "paymentRequired"}))],
    "405": [Reply(405, envelope(error={"type": "outOfRange"}))],
    "500s": [Reply(500, f"trace with {KEY}")] * 3,
    "dropped": [Reply(close=True)] * 3,
    "timeout": [Reply(delay_s=0.5)] * 3,
    "malformed": [Reply(200, envelope())],
    "not_json": [Reply(200, f"<html>{KEY}</html>")],
}


@pytest.mark.parametrize("path", sorted(ERROR_PATHS))
def test_key_never_reaches_logs_exceptions_or_the_database(stub, db_path, caplog, monkeypatch, path):
    caplog.set_level(logging.DEBUG)  # urllib3 logs request lines at DEBUG
    monkeypatch.setenv("KEEPA_API_KEY", KEY)
    monkeypatch.setenv("KEEPA_BASE_URL", stub.url)
    keepa = open_keepa(db_path, {"keepa": {"read_timeout_s": 0.2}}, "upsert", clock=FakeClock())
    keepa.client.retry = FAST
    stub.script("product", *ERROR_PATHS[path])
    texts = []
    try:
        keepa.products(["B000000001"])
    except Exception as e:  # noqa: BLE001 - every error path is the point
        texts += [str(e), repr(e), "".join(traceback.format_exception(e))]
    keepa.close()
    assert len(stub.requests) >= 2  # the /token sync and the product call
    assert all(q["key"] == [KEY] for _, q in stub.requests)  # it was really sent...
    for text in texts + [caplog.text]:
        assert KEY not in text
    for suffix in ("", "-wal"):
        f = db_path.parent / (db_path.name + suffix)
        if f.exists():
            assert KEY.encode() not in f.read_bytes()
    from ingest.store import connect

    calls = connect(db_path).execute("SELECT status, error FROM keepa_calls WHERE endpoint='product'").fetchall()
    assert calls, "every call is logged"
    assert all(KEY not in (c["error"] or "") for c in calls)
