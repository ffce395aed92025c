"""One database, one source: a worker refuses a file filled from another Keepa account (or the
simulator) in one line, exit 3, before its lease or any Keepa call; `ingest db source --adopt`."""

import configparser
import json
import subprocess
import threading

import pytest

from ingest.backends import open_store
from ingest.db_source import SIMULATOR, claim, is_loopback, recorded, source_of
from ingest.errors import ConfigError
from ingest.settings import KeepaSettings
from ingest.simulator import SimConfig, Simulator
from ingest.store import open_db
from ingest.token_model import account_id

from .conftest import INGEST, ROOT
from .workers_support import TEST_KEY, run_worker, scalar, worker_env, write_config

pytestmark = pytest.mark.slow


def test_workers_starting_together_claim_the_database_once_without_an_error(store_target):
    """Both workers claim at start, at the same moment under supervisord: on PostgreSQL (no
    file-wide write lock) a read-then-insert let both insert, and one died of a duplicate key."""
    open_store(store_target).open().close()  # migrated
    conns = [open_store(store_target).connect() for _ in range(8)]
    start = threading.Barrier(len(conns))
    claimed, failed = [], []

    def one(conn):
        start.wait()
        try:
            claimed.append(claim(conn, SIMULATOR, "db", 1000.0).source)
        except Exception as e:  # what the test is about: any error at all
            failed.append(repr(e))

    threads = [threading.Thread(target=one, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in conns:
        c.close()
    assert failed == [] and claimed == [SIMULATOR] * len(conns)
    assert scalar(store_target, "SELECT count(*) FROM db_source") == 1


def test_the_simulator_is_any_loopback_address_and_keepa_is_the_keys_fingerprint():
    for url in ("http://127.0.0.1:8765", "http://localhost:1", "http://[::1]:9"):
        assert is_loopback(url) and source_of(KeepaSettings(api_key="k", base_url=url)) == SIMULATOR
    real = source_of(KeepaSettings(api_key=TEST_KEY))
    assert real == account_id(TEST_KEY) and TEST_KEY not in real
    assert source_of(KeepaSettings(api_key="other")) != real


def test_claim_records_the_first_source_and_refuses_another(db_path):
    conn = open_db(db_path)
    assert recorded(conn) is None
    assert claim(conn, SIMULATOR, db_path, 1000.0).source == SIMULATOR
    assert claim(conn, SIMULATOR, db_path, 2000.0).adopted_at == 1000.0
    with pytest.raises(ConfigError, match="holds deals from the simulator, but this worker is configured for Keepa"
                                          " account k[0-9a-f]{12}.*ingest db source --adopt"):
        claim(conn, account_id(TEST_KEY), db_path, 3000.0)


@pytest.fixture
def sim():
    simulator = Simulator(SimConfig(port=0, refill_rate=6000, seed=7, products=400))
    simulator.start()
    yield simulator
    simulator.stop()


def test_a_worker_for_another_source_exits_3_in_one_line_before_its_lease(sim, tmp_path, db_path):
    config = write_config(tmp_path)
    env = worker_env(sim.url, db_path, config)
    assert run_worker("backfill", env, "--once").returncode == 0
    deals = scalar(db_path, "SELECT count(*) FROM deals")
    calls = scalar(db_path, "SELECT count(*) FROM keepa_calls")
    assert deals > 0 and scalar(db_path, "SELECT source FROM db_source") == SIMULATOR

    # the same file, configured for Keepa itself (an unroutable address: no call may be made)
    real = dict(env, KEEPA_BASE_URL="http://192.0.2.1:9")
    events = scalar(db_path, "SELECT count(*) FROM lease_events")
    refused = run_worker("upsert", real, "--once", timeout=30)
    assert refused.returncode == 3, refused.stderr[-2000:]
    errors = [l for l in refused.stderr.splitlines() if "ERROR" in l]
    assert len(errors) == 1 and "holds deals from the simulator" in errors[0] and "--adopt" in errors[0]
    assert TEST_KEY not in refused.stderr and "Traceback" not in refused.stderr
    assert scalar(db_path, "SELECT count(*) FROM lease_events") == events  # no lease taken
    assert scalar(db_path, "SELECT count(*) FROM keepa_calls") == calls

    # the explicit override, then the simulator is the stranger
    adopted = subprocess.run([INGEST, "db", "source", "--adopt", "--json"], env=real, capture_output=True, text=True)
    assert adopted.returncode == 0, adopted.stderr
    shown = json.loads(adopted.stdout)
    assert shown["source"] == account_id(TEST_KEY) and shown["previous"] == SIMULATOR
    assert TEST_KEY not in adopted.stdout
    again = run_worker("backfill", env, "--once", timeout=30)
    assert again.returncode == 3 and "holds deals from Keepa account" in again.stderr
    assert scalar(db_path, "SELECT count(*) FROM deals") == deals


def test_the_demo_programs_differ_from_the_production_ones_in_their_database_only():
    programs = sorted(p.stem for p in (ROOT / "supervisor.d" / "programs").glob("*.conf"))
    assert {"backfill", "upsert"} <= set(programs)
    for worker in programs:
        ini = {}
        for where in ("programs", "demo"):
            parser = configparser.RawConfigParser()
            parser.read(ROOT / "supervisor.d" / where / f"{worker}.conf")
            # a program, or an event listener (the watchdog, watch.conf)
            section = next(s for s in parser.sections() if s in (f"program:{worker}", f"eventlistener:{worker}"))
            ini[where] = dict(parser.items(section))
        prod, demo = ini["programs"], ini["demo"]
        # production: supervisord's INGEST_DB (scripts/start: var/ingest.db unless set); the demo: its own file
        assert "%(ENV_INGEST_DB)s" in prod["environment"] and "var/demo.db" in demo["environment"]
        assert {**demo, "environment": prod["environment"]} == prod
    demo_conf = configparser.RawConfigParser()
    demo_conf.read(ROOT / "supervisor.d" / "demo.conf")
    assert demo_conf.get("include", "files").split() == ["supervisord.conf", "demo/*.conf"]
