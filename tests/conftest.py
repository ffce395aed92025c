import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INGEST = str(Path(sys.executable).parent / "ingest")


@pytest.fixture
def clock():
    """A clock tests move by hand (modules that need another start define their own)."""
    from ingest.clock import FakeClock

    return FakeClock(wall=1_700_000_000.0)


@pytest.fixture
def make_sim(request, clock):
    """Start simulators on `clock` (products: the module's SIM_PRODUCTS, else 300); all stopped
    at the end of the test."""
    from ingest.simulator import SimConfig, Simulator

    sims = []

    def make(**overrides):
        overrides.setdefault("products", getattr(request.module, "SIM_PRODUCTS", 300))
        sim = Simulator(SimConfig(clock=clock, **overrides)).start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        sim.stop()


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "state" / "ingest.db"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test sees the operator's environment or config file."""
    for name in ("INGEST_DB", "INGEST_CONFIG", "KEEPA_API_KEY", "KEEPA_BASE_URL", "INGEST_QUERY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


# CI runs a fixed set of hypothesis examples (a red CI must mean a regression, not a new random
# draw); local runs keep exploring new examples.
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        _hypothesis_settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass


# ---------------------------------------------------------------- PostgreSQL (tests/pg_server.py)


@pytest.fixture(scope="session")
def pg_server():
    """One real PostgreSQL server for the session (skips, saying why, where none can run)."""
    from .pg_server import PgServer, why_unavailable

    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    server = PgServer.start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server) -> str:
    """A new, empty database on the session's server."""
    return pg_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request, db_path):
    """The same test on both stores: an SQLite file path, or a PostgreSQL URL."""
    if request.param == "sqlite":
        return db_path
    return request.getfixturevalue("pg_url")
