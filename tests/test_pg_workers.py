"""The workers on PostgreSQL, end to end: the real `ingest run backfill` / `ingest run upsert`
processes against the simulator on loopback, with INGEST_DB a URL of the suite's real server
(tests/pg_server.py). The same contract as on SQLite (tests/test_workers.py): every listed ASIN
stored and decided exactly once, through kill -9 at random points; both workers share the
ledger without a 429; SIGTERM releases the lease and exits 0. Skipped, saying why, without
PostgreSQL."""

import random
import signal
import time

import pytest

from ingest.simulator import SimConfig, Simulator

from .workers_support import (TEST_KEY, kill_left, query, run_worker, scalar, share_for_a_while, spent_by_worker,
                              start_worker, stop, wait_for, worker_env, write_config)

pytestmark = pytest.mark.slow


@pytest.fixture
def sim():
    simulator = Simulator(SimConfig(port=0, refill_rate=6000, seed=7, products=1200))
    simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture
def env(sim, tmp_path, pg_url):
    return worker_env(sim.url, pg_url, write_config(tmp_path))


def listed_asins(sim) -> set[str]:
    return set(sim.stats()["listed_asins"])


def assert_each_listed_asin_once(sim, url) -> None:
    listed = listed_asins(sim)
    stored = [a for (a,) in query(url, "SELECT asin FROM deals")]
    assert len(stored) == len(set(stored)) and set(stored) == listed
    assert query(url, "SELECT asin, count(*) FROM decisions GROUP BY asin HAVING count(*) > 1") == []
    assert scalar(url, "SELECT count(*) FROM decisions") == len(listed)


def test_a_backfill_pass_on_postgresql_stores_every_listed_deal_once(sim, env, pg_url):
    result = run_worker("backfill", env, "--once")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(listed_asins(sim)) > 150, "the query should span several pages"
    assert_each_listed_asin_once(sim, pg_url)
    assert scalar(pg_url, "SELECT count(*) FROM deals WHERE reason IS NULL OR reason = ''") == 0
    assert scalar(pg_url, "SELECT holder_pid FROM leases WHERE name = 'backfill'") is None  # released
    assert scalar(pg_url, "SELECT count(*) FROM product_history") >= scalar(
        pg_url, "SELECT count(*) FROM deals WHERE status != 'incomplete'")
    # the key never reaches the database (calls are logged by account id, never by key)
    for (text,) in query(pg_url, "SELECT coalesce(error, '') FROM keepa_calls"):
        assert TEST_KEY not in text


def test_kill_9_at_random_points_on_postgresql_loses_and_repeats_nothing(sim, env, pg_url):
    rng = random.Random(3)
    for _ in range(4):
        proc = start_worker("backfill", env, "--once")
        time.sleep(rng.uniform(0.8, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    result = run_worker("backfill", env, "--once", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert_each_listed_asin_once(sim, pg_url)
    fences = [f for (f,) in query(pg_url, "SELECT fence FROM fenced_commits WHERE lease = 'backfill' ORDER BY id")]
    assert fences == sorted(fences) and fences[-1] > 1  # the killed holders' epochs came before
    kinds = {k for (k,) in query(pg_url, "SELECT event FROM lease_events WHERE name = 'backfill'")}
    assert "taken_over_dead" in kinds, kinds  # a killed holder on this host is seen dead at once


def test_both_workers_on_postgresql_share_the_ledger_without_429(tmp_path, pg_url):
    simulator = Simulator(SimConfig(port=0, refill_rate=600, start_tokens=100, seed=11, products=800))
    simulator.start()
    backfill = upsert = None
    try:
        env = worker_env(simulator.url, pg_url, write_config(tmp_path))
        backfill = start_worker("backfill", env, log=tmp_path / "backfill.log")
        upsert = start_worker("upsert", env, log=tmp_path / "upsert.log")
        share_for_a_while(pg_url)
        codes = stop(backfill), stop(upsert)
        stats = simulator.stats()
    finally:
        kill_left(backfill, upsert)
        simulator.stop()
    assert codes == (0, 0), (tmp_path / "backfill.log").read_text()[-2000:] + (tmp_path / "upsert.log").read_text()[-2000:]
    spent = spent_by_worker(pg_url)
    assert stats["responses_429"] == 0, (stats, spent)
    assert spent.get("backfill", 0) > 0 and spent.get("upsert", 0) > 0, spent
    assert sum(spent.values()) <= 100 + stats["tokens"]["refilled"]  # never beyond what Keepa gave
    from ingest.backends import open_store
    from ingest.deals import progress_rows
    shown = {p["worker"]: p["tokens_spent"] for p in progress_rows(open_store(pg_url).connect())}
    assert shown == spent  # `ingest status` reads the same spend
    assert scalar(pg_url, "SELECT count(*) FROM leases WHERE holder_pid IS NOT NULL") == 0


def test_sigterm_on_postgresql_releases_the_lease_and_exits_zero(sim, env, pg_url):
    proc = start_worker("upsert", env)
    wait_for(lambda: scalar(pg_url, "SELECT holder_pid FROM leases WHERE name = 'upsert'") == proc.pid, 30,
             what="the upsert lease")
    started = time.monotonic()
    assert stop(proc) == 0
    assert time.monotonic() - started < 10
    assert scalar(pg_url, "SELECT holder_pid FROM leases WHERE name = 'upsert'") is None
    kinds = [k for (k,) in query(pg_url, "SELECT event FROM lease_events WHERE name = 'upsert' ORDER BY id")]
    assert kinds[-1] == "released", kinds
