"""The ledger end to end against the simulator (real HTTP on loopback, Keepa's token model):
waiting for ticks instead of 429s, a 429 held and retried (never read as "no data"),
concurrent workers without a 429, and SIGTERM interrupting a wait."""

import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from ingest.clock import FakeClock
from ingest.metered import open_keepa
from ingest.simulator import SimConfig, Simulator
from ingest.store import connect

from .conftest import ROOT

KEY = "SIMKEY-recognisable-0123456789"
SELECTION = {"priceTypes": [0], "dateRange": 1, "page": 0}


@pytest.fixture
def clock():
    return FakeClock()


def start_sim(clock, **kw):
    kw.setdefault("refill_rate", 60)
    kw.setdefault("products", 500)
    return Simulator(SimConfig(port=0, seed=1, clock=clock, **kw)).start()


def keepa_for(db_path, sim, clock, worker="upsert", stop=None):
    config = {"keepa": {"api_key": KEY, "base_url": sim.url}}
    return open_keepa(db_path, config, worker, stop=stop, clock=clock)


def test_a_worker_waits_for_ticks_and_never_meets_a_429(db_path, clock):
    sim = start_sim(clock, start_tokens=12)
    try:
        keepa = keepa_for(db_path, sim, clock)
        t0 = clock.wall()
        for page in range(20):  # 100 tokens with 12 in the bucket and 60/min
            keepa.deals(SELECTION, page)
        stats = sim.stats()
    finally:
        sim.stop()
    assert stats["served_429"] == 0
    assert stats["tokens"]["consumed"] == 100
    assert 60 <= clock.wall() - t0 <= 130  # two ticks were needed, and no more than that was waited
    calls = connect(db_path).execute("SELECT status, count(*) FROM keepa_calls GROUP BY status").fetchall()
    assert dict((r[0], r[1]) for r in calls) == {"ok": 21}  # 20 deal pages and the first /token sync


def test_a_429_holds_and_retries_the_same_request(db_path, clock):
    sim = start_sim(clock, start_tokens=100)
    try:
        keepa = keepa_for(db_path, sim, clock)
        keepa.token_status()  # the ledger believes 100 tokens
        requests.post(f"{sim.url}/_sim/tokens", json={"tokens": -20}, timeout=5)  # spent behind its back
        t0 = clock.wall()
        page = keepa.deals(SELECTION, 0)
        stats = sim.stats()
    finally:
        sim.stop()
    assert page.deals is not None and page.envelope.status == 200  # the data came, not "empty"
    assert stats["served_429"] == 1
    assert clock.wall() - t0 >= 1  # held until the tick that makes the balance positive
    conn = connect(db_path)
    statuses = [r[0] for r in conn.execute("SELECT status FROM keepa_calls WHERE endpoint = 'deal' ORDER BY id")]
    assert statuses == ["rate_limited", "ok"]
    assert conn.execute("SELECT rate_limited FROM token_accounts").fetchone()[0] == 1


def test_two_workers_in_threads_never_meet_a_429(db_path, clock):
    sim = start_sim(clock, start_tokens=30, refill_rate=60)
    errors, pages = [], {"upsert": 0, "backfill": 0}

    def work(worker):
        try:
            keepa = keepa_for(db_path, sim, clock, worker)
            for page in range(15):
                keepa.deals(SELECTION, page)
                pages[worker] += 1
            keepa.close()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=work, args=(w,)) for w in pages]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=100)
        stats = sim.stats()
    finally:
        sim.stop()
    assert not errors and pages == {"upsert": 15, "backfill": 15}
    assert stats["served_429"] == 0
    assert stats["tokens"]["consumed"] == 150


WAITER = """
import signal, sys, threading
from ingest.metered import open_keepa, Stopped
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
keepa = open_keepa(sys.argv[1], {{"keepa": {{"api_key": "{key}", "base_url": sys.argv[2]}}}}, "backfill", stop=stop)
keepa.token_status()
print("waiting", flush=True)
try:
    keepa.deals({{"priceTypes": [0]}}, 0)
except Stopped as e:
    print("stopped:", e, flush=True)
    sys.exit(0)
sys.exit(1)
"""


def test_sigterm_interrupts_a_wait_for_tokens(db_path):
    sim = Simulator(SimConfig(port=0, seed=1, refill_rate=5, start_tokens=0, products=200)).start()
    proc = subprocess.Popen([sys.executable, "-c", WAITER.format(key=KEY), str(db_path), sim.url],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(1.5)  # now in the ledger's wait (the next tick is up to a minute away)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert out.startswith("stopped:") and time.monotonic() - t0 < 3
        assert KEY not in out + err
        assert sim.stats()["served_429"] == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sim.stop()


def test_batch_size_follows_the_balance_and_the_learned_cost(db_path, clock):
    sim = start_sim(clock, start_tokens=37, refill_rate=60)
    try:
        keepa = keepa_for(db_path, sim, clock, "backfill")
        assert keepa.product_batch_size(100) == 37  # 1 token per ASIN until learned otherwise
        assert keepa.product_batch_size(10) == 10
        asins = [sim.app.catalogue.asin_of(i) for i in range(37)]
        page = keepa.products(asins)
        assert len(page.products) == 37
        # the bucket is spent: the next batch is what the next tick pays for, never 0
        assert keepa.product_batch_size(100) == 60
        stats = sim.stats()
    finally:
        sim.stop()
    assert stats["served_429"] == 0
