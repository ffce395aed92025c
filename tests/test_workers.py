"""Workers end to end against the simulator on loopback: real processes, real SQLite."""

import random
import signal
import time

import pytest

from ingest.errors import ConfigError, StoreError
from ingest.keepa import KeepaRequestError
from ingest.leases import LeaseLost
from ingest.simulator import SimConfig, Simulator

from .workers_support import (TEST_KEY, checkpoint, kill_left, query, run_worker, scalar, share_for_a_while,
                              spent_by_worker, start_worker, stop, wait_for, worker_env, write_config)

pytestmark = pytest.mark.slow


@pytest.fixture
def sim():
    simulator = Simulator(SimConfig(port=0, refill_rate=6000, seed=7, products=1200))
    simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture
def env(sim, tmp_path, db_path):
    return worker_env(sim.url, db_path, write_config(tmp_path))


def listed_asins(sim) -> set[str]:
    return set(sim.stats()["listed_asins"])


def test_full_backfill_pass_stores_every_listed_deal_once(sim, env, db_path):
    result = run_worker("backfill", env, "--once")
    assert result.returncode == 0, result.stderr[-2000:]
    listed = listed_asins(sim)
    assert len(listed) > 150, "the query should span several pages"
    stored = {a for (a,) in query(db_path, "SELECT asin FROM deals")}
    assert stored == listed
    # every deal has an outcome with a reason, decided exactly once in this pass
    assert scalar(db_path, "SELECT count(*) FROM deals WHERE reason IS NULL OR reason = ''") == 0
    assert scalar(db_path, "SELECT count(*) FROM decisions") == len(listed)
    assert scalar(db_path, "SELECT count(DISTINCT status) FROM deals") >= 2
    cursor = checkpoint(db_path, "backfill")
    assert cursor["last_complete_pass_started_at"] is not None and cursor["pending"] is None
    # the lease was released on exit
    assert scalar(db_path, "SELECT holder_pid FROM leases WHERE name = 'backfill'") is None
    # histories are stored, so recompute costs nothing
    assert scalar(db_path, "SELECT count(*) FROM product_history") >= scalar(
        db_path, "SELECT count(*) FROM deals WHERE status != 'incomplete'")


def test_kill_9_at_random_points_loses_and_repeats_nothing(sim, env, db_path):
    rng = random.Random(3)
    for _ in range(5):
        proc = start_worker("backfill", env, "--once")
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    result = run_worker("backfill", env, "--once")
    assert result.returncode == 0, result.stderr[-2000:]
    listed = listed_asins(sim)
    stored = [a for (a,) in query(db_path, "SELECT asin FROM deals")]
    assert set(stored) == listed
    # nothing decided twice: a killed batch committed nothing, a resumed one did not redo work
    dupes = query(db_path, "SELECT asin, count(*) FROM decisions GROUP BY asin HAVING count(*) > 1")
    assert dupes == []
    # fences of the backfill lease never go down along the commit order: no overlapping epochs
    fences = [f for (f,) in query(db_path, "SELECT fence FROM fenced_commits WHERE lease = 'backfill' ORDER BY id")]
    assert fences == sorted(fences)


def test_sigterm_releases_the_lease_and_exits_zero(sim, env, db_path):
    proc = start_worker("backfill", env)
    wait_for(lambda: scalar(db_path, "SELECT count(*) FROM deals"), 30,
             what="first deals")
    started = time.monotonic()
    assert stop(proc) == 0
    assert time.monotonic() - started < 10
    assert scalar(db_path, "SELECT holder_pid FROM leases WHERE name = 'backfill'") is None
    events = [e for (e,) in query(db_path, "SELECT event FROM lease_events WHERE name = 'backfill' ORDER BY id")]
    assert events[-1] == "released"


def test_both_workers_share_tokens_without_429(tmp_path, db_path):
    simulator = Simulator(SimConfig(port=0, refill_rate=600, start_tokens=100, seed=11, products=800))
    simulator.start()
    backfill = upsert = None
    try:
        env = worker_env(simulator.url, db_path, write_config(tmp_path))
        backfill = start_worker("backfill", env)
        upsert = start_worker("upsert", env)
        share_for_a_while(db_path)
        assert stop(backfill) == 0 and stop(upsert) == 0
        stats = simulator.stats()
    finally:
        kill_left(backfill, upsert)
        simulator.stop()
    spent = spent_by_worker(db_path)
    assert stats["responses_429"] == 0, (stats, spent)
    assert spent.get("backfill", 0) > 0 and spent.get("upsert", 0) > 0, spent
    # progress (what `ingest status` shows) reads the same call log: one count of the tokens
    from ingest.deals import progress_rows
    from ingest.store import open_db
    shown = {p["worker"]: p["tokens_spent"] for p in progress_rows(open_db(db_path))}
    assert shown == spent


def test_incomplete_product_is_retried_and_then_accepted_or_rejected(sim, env, db_path):
    sim.set_faults(fault_no_history=1.0)
    assert run_worker("backfill", env, "--once").returncode == 0
    incomplete = scalar(db_path, "SELECT count(*) FROM deals WHERE status = 'incomplete'")
    total = scalar(db_path, "SELECT count(*) FROM deals")
    assert incomplete == total > 0
    assert scalar(db_path, "SELECT count(*) FROM decisions WHERE outcome = 'rejected'") == 0
    sim.set_faults(fault_no_history=0.0)
    upsert = start_worker("upsert", env)
    try:
        wait_for(lambda: scalar(db_path, "SELECT count(*) FROM deals WHERE status = 'incomplete'") == 0, 60,
                 interval=0.5, what="incomplete deals to be refetched")
    finally:
        stop(upsert)
    # each deal was decided incomplete first, then got a real outcome from a refetch
    assert scalar(db_path, "SELECT count(DISTINCT asin) FROM decisions WHERE outcome = 'incomplete'") == total
    assert scalar(db_path, "SELECT count(*) FROM deals WHERE fetch_attempts != 0") == 0


def test_429_storm_pauses_and_resumes_without_losing_deals(tmp_path, db_path):
    simulator = Simulator(SimConfig(port=0, refill_rate=6000, seed=7, products=1200, force_429=(0.0, 4.0)))
    simulator.start()
    try:
        env = worker_env(simulator.url, db_path, write_config(tmp_path))
        result = run_worker("backfill", env, "--once", timeout=90)
        stats = simulator.stats()
    finally:
        simulator.stop()
    assert result.returncode == 0, result.stderr[-2000:]
    assert stats["responses_429"] >= 1
    stored = {a for (a,) in query(db_path, "SELECT asin FROM deals")}
    assert stored == set(stats["listed_asins"])


def test_lost_lease_stops_the_worker_with_exit_5(sim, env, db_path):
    from ingest.cli import main  # noqa: F401  (imports the lease admin commands)
    import subprocess

    from .workers_support import INGEST

    proc = start_worker("backfill", env)
    wait_for(lambda: scalar(db_path, "SELECT holder_pid FROM leases WHERE name = 'backfill'"), 30, what="backfill to hold its lease")
    subprocess.run([INGEST, "leases", "release", "backfill", "--force"], env=env, check=True, capture_output=True)
    # a contender takes it at once (the row is free)
    contender = start_worker("backfill", env)
    try:
        assert proc.wait(20) == 5
    finally:
        stop(contender)
        stop(proc)


def test_bad_query_is_a_config_error_before_any_token(sim, env, tmp_path, db_path):
    bad = tmp_path / "q.json"
    bad.write_text('{"priceTypes": [1, 2]}')
    result = run_worker("backfill", env, "--query", str(bad))
    assert result.returncode == 3
    assert "priceTypes" in result.stderr
    # one line, no traceback: what an operator reads in `supervisorctl tail`
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert sim.stats()["tokens_consumed"] == 0


def test_key_never_reaches_the_database(sim, env, db_path):
    sim.set_faults(fault_500=0.3, fault_malformed=0.2)
    run_worker("backfill", env, "--once", timeout=90)
    data = db_path.read_bytes() + (db_path.with_name(db_path.name + "-wal").read_bytes()
                                   if db_path.with_name(db_path.name + "-wal").exists() else b"")
    assert TEST_KEY.encode() not in data


def test_missing_key_is_a_config_error_before_the_lease(sim, env, db_path):
    del env["KEEPA_API_KEY"]
    result = run_worker("backfill", env)
    assert result.returncode == 3
    assert "no Keepa API key" in result.stderr
    assert scalar(db_path, "SELECT count(*) FROM lease_events") in (None, 0)


def test_lease_lost_while_waiting_for_tokens_exits_5_not_0(tmp_path, db_path):
    """supervisord restarts exit 5 but not exit 0: a worker whose lease is taken while it waits
    for tokens must not look like a clean stop."""
    import subprocess

    from .workers_support import INGEST

    simulator = Simulator(SimConfig(port=0, refill_rate=5, start_tokens=0, seed=7, products=300))
    simulator.start()
    try:
        env = worker_env(simulator.url, db_path, write_config(tmp_path))
        proc = start_worker("backfill", env)
        wait_for(lambda: scalar(db_path, "SELECT holder_pid FROM leases WHERE name = 'backfill'"), 30,
                 what="backfill to hold its lease")
        time.sleep(1.0)  # now waiting for the first tick, with nothing to spend
        subprocess.run([INGEST, "leases", "release", "backfill", "--force"], env=env, check=True,
                       capture_output=True)
        assert proc.wait(20) == 5
    finally:
        stop(proc)
        simulator.stop()
    assert scalar(db_path, "SELECT state FROM worker_progress WHERE worker = 'backfill'") == "lost"


def test_upsert_starts_at_the_newest_deal_and_stores_what_comes_after(tmp_path, db_path):
    """The first poll only sets the watermark (the listed deals are backfill's: buying them in
    both workers would pay twice); deals updated after it are stored, oldest first."""
    sim = Simulator(SimConfig(port=0, refill_rate=6000, seed=7, products=1200, deal_cache_s=0.5,
                              deal_update_per_min=600))
    sim.start()
    env = worker_env(sim.url, db_path, write_config(tmp_path))
    upsert = start_worker("upsert", env)
    try:
        first = wait_for(lambda: checkpoint(db_path, "upsert") if scalar(db_path, "SELECT 1 FROM checkpoints WHERE name='upsert'") else None,
                         30, what="the first poll")
        assert first["watermark"] is not None and first["pending"] == []
        assert scalar(db_path, "SELECT count(*) FROM deals") == 0
        # the simulator moves lastUpdate in whole Keepa minutes: allow a couple of them
        wait_for(lambda: scalar(db_path, "SELECT count(*) FROM deals"), 150, interval=0.5, what="an updated deal")
    finally:
        code = stop(upsert)
        sim.stop()
    assert code == 0
    assert scalar(db_path, "SELECT min(deal_last_update) FROM deals") >= first["watermark"]
    assert checkpoint(db_path, "upsert")["watermark"] >= scalar(db_path, "SELECT max(deal_last_update) FROM deals")


class _Failing:
    """A worker whose step raises `error`: the lifecycle alone, in-process, real SQLite."""

    @staticmethod
    def make(db_path, error, where="step"):
        from ingest.workers.base import Worker

        class FailingWorker(Worker):
            name = "backfill"

            def setup(self):
                if where == "setup":
                    raise error

            def step(self):
                raise error

        return FailingWorker(db_path, {"leases": {"ttl_s": 3.0, "renew_s": 1.0, "retry_s": 0.25}}, keepa=object())


def _run_in_thread(worker, timeout=20):
    """Off the main thread, so run() installs no signal handlers in the test process."""
    import threading

    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("code", worker.run()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the worker did not stop"
    return out["code"]


@pytest.mark.parametrize("error, code, state", [
    (ConfigError("bad [upsert] start_from"), 3, "error"),
    (KeepaRequestError("Keepa answered 400: invalid key"), 3, "error"),  # retrying cannot help (402 pauses)
    (StoreError("database is read-only"), 4, "error"),
    (LeaseLost("lease taken"), 5, "lost"),
])
def test_each_fatal_error_exits_with_its_own_code_and_releases_the_lease(db_path, error, code, state):
    assert _run_in_thread(_Failing.make(db_path, error)) == code
    assert scalar(db_path, "SELECT state FROM worker_progress WHERE worker = 'backfill'") == state
    assert scalar(db_path, "SELECT last_error FROM worker_progress WHERE worker = 'backfill'") == str(error)
    assert scalar(db_path, "SELECT holder_pid FROM leases WHERE name = 'backfill'") is None


def test_a_config_error_in_setup_exits_3_before_the_lease(db_path):
    assert _run_in_thread(_Failing.make(db_path, ConfigError("bad query"), where="setup")) == 3
    assert scalar(db_path, "SELECT count(*) FROM lease_events") in (None, 0)
