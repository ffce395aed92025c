"""Each injected fault, from config and from the runtime admin endpoint."""

import json
import time

import pytest
import requests





def get_product(sim, n=3, timeout=10):
    asins = ",".join(sim.app.catalogue.asin_of(i) for i in range(n))
    return requests.get(f"{sim.url}/product", params={"key": "k", "domain": 1, "asin": asins, "stats": 30},
                        timeout=timeout)


def test_500_share_costs_nothing_and_carries_the_envelope(make_sim):
    sim = make_sim(fault_500=1.0)
    answer = get_product(sim)
    assert answer.status_code == 500
    assert answer.json()["tokensConsumed"] == 0 and answer.json()["error"]["type"] == "internalServerError"
    assert sim.stats()["tokens"]["consumed"] == 0 and sim.stats()["faults"]["500"] == 1


def test_a_share_is_a_share(make_sim):
    sim = make_sim(fault_500=0.3)
    codes = [requests.get(f"{sim.url}/token", params={"key": "k"}).status_code for _ in range(200)]
    assert 30 < codes.count(500) < 90 and codes.count(200) == 200 - codes.count(500)


def test_slow_answers_arrive_late_and_are_charged(make_sim):
    sim = make_sim(fault_slow=1.0, slow_s=0.4)
    started = time.monotonic()
    answer = get_product(sim)
    assert time.monotonic() - started >= 0.4
    assert answer.status_code == 200 and answer.json()["tokensConsumed"] == 3
    assert sim.stats()["faults"]["slow"] == 1


def test_timeouts_are_charged_but_never_answered_in_time(make_sim):
    sim = make_sim(fault_timeout=1.0, timeout_s=30)
    with pytest.raises(requests.exceptions.Timeout):
        get_product(sim, timeout=0.5)
    stats = sim.stats()
    assert stats["faults"]["timeout"] == 1 and stats["tokens"]["consumed"] == 3  # paid, never heard
    started = time.monotonic()
    sim.stop()  # does not wait for the held answer
    assert time.monotonic() - started < 5


def test_malformed_json_is_a_200_that_does_not_parse(make_sim):
    sim = make_sim(fault_malformed=1.0)
    answer = get_product(sim)
    assert answer.status_code == 200
    with pytest.raises(ValueError):
        json.loads(answer.content)
    assert sim.stats()["tokens"]["consumed"] == 3 and sim.stats()["faults"]["malformed"] == 1


def test_products_without_history(make_sim):
    sim = make_sim(fault_no_history=1.0)
    body = get_product(sim).json()
    assert all(p["csv"] is None and p["stats"] is None for p in body["products"])
    assert all(p["asin"] and p["title"] for p in body["products"])
    assert body["tokensConsumed"] == 3 and sim.stats()["faults"]["no_history"] == 3


def test_forced_429_window(make_sim, clock):
    sim = make_sim(force_429_window=(10, 30))
    assert get_product(sim).status_code == 200
    clock.advance(15)
    refused = get_product(sim)
    assert refused.status_code == 429 and refused.json()["tokensLeft"] > 0
    assert refused.json()["tokensConsumed"] == 0
    clock.advance(30)
    assert get_product(sim).status_code == 200
    assert sim.stats()["faults"]["forced_429"] == 1 and sim.stats()["served_429"] == 1


def test_forced_402_window_answers_every_call_and_token_too(make_sim, clock):
    sim = make_sim(force_402_window=(10, 30))
    assert get_product(sim).status_code == 200
    clock.advance(15)
    refused = get_product(sim)
    assert refused.status_code == 402 and refused.json()["error"]["type"] == "paymentRequired"
    assert requests.get(f"{sim.url}/token", params={"key": "k"}).status_code == 402
    clock.advance(30)
    assert get_product(sim).status_code == 200
    assert requests.get(f"{sim.url}/token", params={"key": "k"}).status_code == 200
    assert sim.stats()["faults"]["forced_402"] == 2
    requests.post(f"{sim.url}/_sim/faults", json={"force_402": [0, 60]})
    assert get_product(sim).status_code == 402
    assert requests.get(f"{sim.url}/_sim/faults").json()["force_402"] == [0, 60]
    requests.post(f"{sim.url}/_sim/faults", json={"force_402": None})
    assert get_product(sim).status_code == 200
    assert requests.post(f"{sim.url}/_sim/faults", json={"force_402": [1]}).status_code == 400


def test_refill_rate_change_mid_run(make_sim, clock):
    sim = make_sim(refill_rate=5, start_tokens=0, rate_change=(90, 20))
    clock.advance(200)
    body = requests.get(f"{sim.url}/token", params={"key": "k"}).json()
    assert body["refillRate"] == 20 and body["tokensLeft"] == 5 + 20 + 20


def test_faults_change_at_runtime(make_sim, clock):
    sim = make_sim()
    assert get_product(sim).status_code == 200
    changed = requests.post(f"{sim.url}/_sim/faults", json={"fault_500": 1.0})
    assert changed.status_code == 200 and changed.json()["fault_500"] == 1.0
    assert get_product(sim).status_code == 500
    requests.post(f"{sim.url}/_sim/faults", json={"fault_500": 0, "force_429": [0, 60]})
    assert get_product(sim).status_code == 429
    requests.post(f"{sim.url}/_sim/faults", json={"force_429": None})
    assert get_product(sim).status_code == 200
    for bad in ({"fault_500": 2}, {"nope": 1}, {"force_429": [1]}):
        assert requests.post(f"{sim.url}/_sim/faults", json=bad).status_code == 400
    assert requests.get(f"{sim.url}/_sim/faults").json()["fault_500"] == 0


def test_tokens_change_at_runtime(make_sim):
    sim = make_sim()
    answer = requests.post(f"{sim.url}/_sim/tokens", json={"tokens": -40, "refill_rate": 5})
    assert answer.json()["tokensLeft"] == -40 and answer.json()["refillRate"] == 5
    assert get_product(sim).status_code == 429
    assert requests.post(f"{sim.url}/_sim/tokens", json={"tokens": "many"}).status_code == 400
