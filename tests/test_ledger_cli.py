"""`ingest tokens`, `--json`, `history` and `sync` as an operator runs them (real process,
simulator on loopback); the key never appears in their output."""

import json
import subprocess

import pytest

from ingest.errors import EXIT_CONFIG
from ingest.simulator import SimConfig, Simulator

from .conftest import INGEST

KEY = "CLIKEY-recognisable-9876543210"


@pytest.fixture
def sim():
    s = Simulator(SimConfig(port=0, seed=1, refill_rate=300, start_tokens=40, products=200)).start()
    yield s
    s.stop()


def ingest(db_path, *args, env_key=True, base_url=None):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEPA_")}
    if env_key:
        env["KEEPA_API_KEY"] = KEY
    if base_url:
        env["KEEPA_BASE_URL"] = base_url
    result = subprocess.run([INGEST, "--db", str(db_path), *args], capture_output=True, text=True, env=env, timeout=60)
    assert KEY not in result.stdout + result.stderr
    return result


def test_tokens_before_any_call_says_so(db_path):
    from ingest.store import open_db

    open_db(db_path).close()  # a new, empty database (a missing one is exit 4)
    r = ingest(db_path, "tokens")
    assert r.returncode == 0 and "no token ledger yet" in r.stdout
    data = json.loads(ingest(db_path, "tokens", "--json").stdout)
    assert data["balance"] is None and data["reservations"] == []


def test_sync_then_status_then_history(db_path, sim):
    r = ingest(db_path, "tokens", "sync", base_url=sim.url)
    assert r.returncode == 0 and "40 tokens left" in r.stdout and "300/min" in r.stdout
    data = json.loads(ingest(db_path, "tokens", "--json").stdout)
    for field in ("balance", "refill_rate", "cap", "blocked_until", "reservations"):
        assert field in data
    assert (data["balance"], data["refill_rate"], data["cap"], data["blocked_until"]) == (40, 300, 18000, None)
    assert data["spend"]["last_hour"]["cli"]["calls"] == 1
    text = ingest(db_path, "tokens").stdout
    assert "balance        40 now" in text and "cap 18000" in text
    history = ingest(db_path, "tokens", "history").stdout
    assert "token" in history and "ok" in history
    rows = json.loads(ingest(db_path, "tokens", "history", "--json").stdout)
    assert rows[0]["endpoint"] == "token" and rows[0]["status"] == "ok"


def test_sync_without_a_key_is_one_line_config_error(db_path):
    r = ingest(db_path, "tokens", "sync", env_key=False)
    assert r.returncode == EXIT_CONFIG
    assert r.stderr.count("\n") == 1 and "no Keepa API key" in r.stderr


def test_sync_against_a_dead_server_is_one_line_without_the_key(db_path):
    r = ingest(db_path, "tokens", "sync", base_url="http://127.0.0.1:9")
    assert r.returncode == 1 and "token sync failed" in r.stderr and "Traceback" not in r.stderr
