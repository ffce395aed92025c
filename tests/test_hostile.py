"""Hostile input and operator mistakes, against a misbehaving Keepa look-alike of the tests' own
(tests/hostile_server.py) on loopback: the key stays home, every response is bounded, absurd
envelopes never reach the ledger, the database cannot vanish under a worker."""

import re
import signal
import threading
import time
from pathlib import Path

import pytest

from ingest.clock import FakeClock
from ingest.keepa import Bounds, KeepaClient, MalformedResponse, RetryPolicy, TransientError
from ingest.metered import open_keepa

from .hostile_server import (REDIRECTS, Answer, Drip, Endless, GzipBomb, HostileServer, KeyTrap, Mangle, Redirect,
                             Stall, sane_envelope)

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


# the peak RSS of this process's own memory: /proc's VmHWM, not getrusage's ru_maxrss, which
# Linux carries over exec from the forking parent (a large pytest process would be counted)
_PEAK_RSS = """
import sys
from ingest.keepa import KeepaClient, RetryPolicy, TransientError
try:
    KeepaClient("HOSTILEKEY0123456789abcdef", sys.argv[1], retry=RetryPolicy(attempts=1)).token_status()
except TransientError as e:
    print(e, file=sys.stderr)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) // 1024)
"""


@pytest.mark.parametrize("behaviour", [Endless(), GzipBomb(decoded_mb=1024)], ids=["endless", "gzip-bomb-1GiB"])
def test_an_endless_body_leaves_a_fresh_process_under_200_mb(server, behaviour):
    """With the default bounds (max_body_mb = 64): the body is abandoned, memory stays bounded."""
    import subprocess
    import sys

    server.script("token", behaviour)
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, server.url], capture_output=True, text=True, timeout=60)
    assert "larger than max_body_mb = 64" in done.stderr
    assert int(done.stdout.strip()) < 200


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


ABSURD = {  # a member appended to a sane answer (a later duplicate key wins)
    "refillIn 10^12": '"refillIn": 1000000000000',
    "refillRate -5": '"refillRate": -5',
    "refillRate 1e308": '"refillRate": 1e308',
    "tokensLeft 400 digits": '"tokensLeft": ' + "9" * 400,
    "tokensLeft Infinity": '"tokensLeft": Infinity',
    "refillIn NaN": '"refillIn": NaN',
    "refillRate 1e999": '"refillRate": 1e999',
    "tokensConsumed -3": '"tokensConsumed": -3',
    "tokensLeft 2.5": '"tokensLeft": 2.5',
    "timestamp year 2058": '"timestamp": 2800000000000',
    "deep 100000": '"x": ' + "[" * 100_000 + "]" * 100_000,
    "deep 500": '"x": ' + "[" * 500 + "]" * 500,
}
SANE = '{"tokensLeft": 50, "refillIn": 1000, "refillRate": 5, "products": []'


@pytest.mark.parametrize("name", sorted(ABSURD))
def test_an_absurd_envelope_never_reaches_the_ledger_and_spending_goes_on(db_path, monkeypatch, server, name):
    monkeypatch.setenv("KEEPA_API_KEY", KEY)
    monkeypatch.setenv("KEEPA_BASE_URL", server.url)
    clock = FakeClock(wall=time.time())
    keepa = open_keepa(db_path, {}, "upsert", clock=clock)
    keepa.client.retry = ONCE
    keepa.token_status()  # a sane sync: 100 tokens, refill 5/min
    before = keepa.ledger.load()
    server.script("product", Answer(f"{SANE}, {ABSURD[name]}}}"))
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


# ------------------------------------------------------------------ workers against the hostile server


@pytest.fixture
def sim():
    from ingest.simulator import SimConfig, Simulator

    simulator = Simulator(SimConfig(port=0, refill_rate=6000, seed=7, products=300))
    simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture
def proxy(sim):
    with HostileServer(upstream=sim.url) as s:
        yield s


def _env(url, tmp_path, db_path, extra=""):
    from .workers_support import worker_env, write_config

    return worker_env(url, db_path, write_config(tmp_path, extra))


@pytest.mark.slow
def test_sigterm_during_a_drip_fed_response_stops_the_worker_within_5_s(proxy, tmp_path, db_path):
    from .workers_support import scalar, start_worker, stop, wait_for

    proxy.script("product", Drip(interval_s=0.5), times=None)
    proc = start_worker("backfill", _env(proxy.url, tmp_path, db_path), log=tmp_path / "worker.log")
    try:
        wait_for(lambda: proxy.served("product", "Drip"), 30, what="a drip-fed /product")
        time.sleep(1.0)  # well inside the attempt (deadline_s = 30 s)
        started = time.monotonic()
        assert stop(proc, timeout=10) == 0
        assert time.monotonic() - started < 5
    finally:
        stop(proc, signal.SIGKILL, timeout=5)
    assert scalar(db_path, "SELECT holder_pid FROM leases WHERE name = 'backfill'") is None
    assert "Traceback" not in (tmp_path / "worker.log").read_text()


@pytest.mark.slow
def test_absurd_envelopes_neither_crash_nor_stop_a_worker(proxy, tmp_path, db_path):
    from .workers_support import run_worker, scalar

    proxy.script("product", Mangle([ABSURD[name] for name in sorted(ABSURD)]), times=None)
    result = run_worker("backfill", _env(proxy.url, tmp_path, db_path), "--once", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "ignored for the ledger" in result.stderr
    assert proxy.served("product", "Mangle") >= 3  # the malformed ones were retried, the others used
    assert scalar(db_path, "SELECT count(*) FROM deals WHERE status IN ('accepted', 'rejected')") > 0
    next_tick, rate = query_one(db_path, "SELECT next_tick, refill_rate FROM token_accounts")
    assert next_tick < time.time() + 120 and 0 < rate <= 100_000


def query_one(db_path, sql):
    from .workers_support import query

    return query(db_path, sql)[0]


# ------------------------------------------------------------------ 5. the database cannot vanish


@pytest.mark.slow
@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_deleted_or_replaced_under_a_worker_stops_it_with_exit_4(sim, tmp_path, db_path, how):
    import shutil
    import sqlite3

    from .workers_support import scalar, start_worker, stop, wait_for

    proc = start_worker("backfill", _env(sim.url, tmp_path, db_path), log=tmp_path / "worker.log")
    try:
        wait_for(lambda: scalar(db_path, "SELECT count(*) FROM deals"), 30, what="first deals")
        if how == "replaced":  # a restore by mv: a consistent copy moved over the path
            copy = tmp_path / "copy.db"
            with sqlite3.connect(db_path) as src, sqlite3.connect(copy) as dst:
                src.backup(dst)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        if how == "replaced":
            shutil.move(copy, db_path)
            before = db_path.read_bytes()
        started = time.monotonic()
        code = proc.wait(10)
        waited = time.monotonic() - started
    finally:
        stop(proc, signal.SIGKILL, timeout=5)
    assert code == 4 and waited < 1.0 + 1.5  # renew_s = 1 in the test config
    log_text = (tmp_path / "worker.log").read_text()
    assert f"was {how}" in log_text and "Traceback" not in log_text
    if how == "deleted":
        assert sorted(p.name for p in db_path.parent.iterdir()) == []  # nothing recreated
    else:
        assert db_path.read_bytes() == before and not Path(f"{db_path}-wal").exists()


@pytest.mark.parametrize("command", [["status"], ["deals"], ["leases"], ["leases", "history"], ["tokens"], ["tokens", "history"],
                                     ["db", "version"], ["db", "stats"], ["diagnose", "asin", "B000000001"]])
def test_read_only_commands_never_create_a_database_or_folder(tmp_path, command):
    import subprocess

    from .workers_support import INGEST

    missing = tmp_path / "typo" / "ingest.db"
    result = subprocess.run([INGEST, "--db", str(missing), *command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 4, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "no database at" in result.stderr
    assert not missing.parent.exists()


def test_an_empty_db_option_is_a_usage_error(tmp_path):
    import subprocess

    from .workers_support import INGEST

    result = subprocess.run([INGEST, "--db", "", "status"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--db needs a path" in result.stderr


# ------------------------------------------------------------------ 6, 7. scripts/start and scripts/stop


def _supervisords(root: Path) -> list[int]:
    """supervisord processes running for the checkout at `root` (its cwd or its command line)."""
    import os

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if "supervisord " in cmdline and (cwd == str(root) or str(root) in cmdline):
            found.append(int(entry.name))
    return found


@pytest.fixture
def project(sim):
    import os

    from .supervised import SupervisedProject

    p = SupervisedProject(sim.url)
    yield p
    p.close()
    for pid in _supervisords(p.root):  # a second supervisord the test failed to prevent
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_two_concurrent_starts_leave_one_supervisord_and_stop_leaves_none(project):
    import subprocess

    starts = [subprocess.Popen([str(project.root / "scripts/start")], cwd=project.root, env=project.env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=90)[0] for p in starts]
    assert [p.returncode for p in starts] == [0, 0], outputs
    assert any("supervisord is running (pid" in out for out in outputs)  # the second found the first
    assert len(_supervisords(project.root)) == 1
    assert (project.root / "var/log/supervisord.log").stat().st_mode & 0o777 == 0o600
    project.script("stop", timeout=120)
    assert _supervisords(project.root) == []


@pytest.mark.slow
def test_stop_finds_a_supervisord_whose_socket_was_deleted(project):
    project.script("start", timeout=90)
    (project.root / "var/supervisor.sock").unlink()
    again = project.script("start", check=False, timeout=30)
    assert again.returncode == 1 and "does not answer" in again.stderr
    assert len(_supervisords(project.root)) == 1
    project.script("stop", timeout=120)
    assert _supervisords(project.root) == []


@pytest.mark.parametrize("line,expected", [
    ("HOSTILE-BARE-KEY-0123456789abcdef", "line 3 is not KEY=value"),
    ("KEEPA_QUERY_FILE=x.json\r", "line 3 ends with a carriage return"),
])
def test_a_bad_ingest_env_line_is_named_by_number_never_shown(project, line, expected):
    (project.root / "ingest.env").write_text(f"# settings\nINGEST_X=1\n{line}\n")
    (project.root / "ingest.env").chmod(0o600)
    done = project.script("start", check=False, timeout=30)
    assert done.returncode == 3 and expected in done.stderr
    assert "HOSTILE-BARE-KEY" not in done.stdout + done.stderr
    assert _supervisords(project.root) == []


@pytest.mark.parametrize("url", ["not-a-url", "ftp://api.keepa.com", "http://127.0.0.1:99999", "http://host\r"])
def test_a_bad_base_url_is_exit_3_in_one_line_from_start_and_from_a_worker(project, tmp_path, db_path, url):
    from .workers_support import run_worker

    project.env["KEEPA_BASE_URL"] = url
    done = project.script("start", check=False, timeout=30)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 3 and len(lines) == 1 and re.search("base.url", lines[0], re.I), done.stderr
    assert _supervisords(project.root) == []
    worker = run_worker("backfill", _env(url, tmp_path, db_path), "--once", timeout=60)
    lines = worker.stderr.strip().splitlines()
    assert worker.returncode == 3 and len(lines) == 1 and re.search("base.url", lines[0], re.I), worker.stderr


# ------------------------------------------------------------------ 4. one marketplace per query


def test_a_query_for_another_marketplace_is_exit_3_before_any_token(sim, tmp_path, db_path):
    import json as json_module

    from .workers_support import run_worker, scalar

    query = tmp_path / "de.json"
    query.write_text(json_module.dumps({"domainId": 3, "priceTypes": [2]}))
    result = run_worker("backfill", _env(sim.url, tmp_path, db_path), "--once", "--query", str(query), timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3 and "domainId 3" in lines[-1] and "[keepa] domain is 1" in lines[-1]
    assert not scalar(db_path, "SELECT count(*) FROM keepa_calls")


@pytest.mark.slow
def test_stored_deals_record_their_marketplace(sim, tmp_path, db_path):
    from .workers_support import query, run_worker

    assert run_worker("backfill", _env(sim.url, tmp_path, db_path), "--once", timeout=120).returncode == 0
    domains = {d for (d,) in query(db_path, "SELECT DISTINCT domain FROM deals")}
    assert domains == {1}


def test_the_client_never_sends_a_deal_query_for_another_marketplace(server):
    from ingest.errors import ConfigError

    with pytest.raises(ConfigError, match="one marketplace per query"):
        client(server.url, domain=1).deals({"domainId": 3}, page=0)
    assert server.requests == []


# ------------------------------------------------------------------ 7. ASINs


def test_entries_without_a_valid_asin_are_dropped_in_one_line(server, caplog):
    good = {"asin": "B00EXAMPLE"}
    listed = [good, {"asin": "X" * 5000}, {"asin": 1234567890}, {"asin": "b00example"}, "B00EXAMPLE", {}]
    server.script("deal", Answer({**sane_envelope(), "deals": {"dr": listed}}))
    assert client(server.url).deals({}, page=0).deals == [good]
    server.script("product", Answer({**sane_envelope(), "products": listed}))
    assert client(server.url).products(["B00EXAMPLE"]).products == [good]
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped == ["keepa deal: 5 of 6 entries dropped: not an object with a valid ASIN (10 of A-Z0-9)",
                       "keepa product: 5 of 6 entries dropped: not an object with a valid ASIN (10 of A-Z0-9)"]
    assert all("XXXXXXXX" not in r.getMessage() for r in caplog.records)


def test_cli_asin_arguments_are_validated_and_looked_up_case_insensitively(db_path):
    from click.testing import CliRunner

    from ingest.cli import main
    from ingest.store import open_db

    open_db(db_path).close()
    bad = CliRunner().invoke(main, ["--db", str(db_path), "diagnose", "asin", "B00'; DROP--" + "X" * 100])
    assert bad.exit_code == 2 and "is not an ASIN" in bad.output and "X" * 30 not in bad.output
    lower = CliRunner().invoke(main, ["--db", str(db_path), "diagnose", "asin", "b00example"])
    assert "B00EXAMPLE: unknown ASIN" in lower.output


@pytest.mark.parametrize("args", [["deals", "--limit", str(10**30)], ["deals", "--limit", "-1"],
                                  ["tokens", "history", "--limit", "0"], ["leases", "history", "--limit", str(10**20)],
                                  ["status", "--stall-minutes", "1e308"]])
def test_cli_numbers_out_of_range_are_a_usage_error(db_path, args):
    from click.testing import CliRunner

    from ingest.cli import main
    from ingest.store import open_db

    open_db(db_path).close()
    result = CliRunner().invoke(main, ["--db", str(db_path), *args])
    assert result.exit_code == 2 and "Traceback" not in result.output and "range" in result.output


# ------------------------------------------------------------------ 8. the simulator's faults for the chaos run


def test_the_simulator_redirect_and_drip_faults_are_survived(trap):
    from ingest.simulator import SimConfig, Simulator

    sim = Simulator(SimConfig(port=0, fault_redirect=1.0, redirect_to=f"{trap.url}/x")).start()
    try:
        with pytest.raises(TransientError, match=r"HTTP 302 redirect to 127\.0\.0\.2:\d+ not followed"):
            client(sim.url).token_status()
        assert trap.queries == []
        sim.set_faults(fault_redirect=0, fault_drip=1.0, drip_s=10)
        started = time.monotonic()
        with pytest.raises(TransientError, match="deadline_s = 1 s"):
            client(sim.url, bounds=Bounds(deadline_s=1.0)).products(["B00EXAMPLE"])
        assert time.monotonic() - started < 2.0
        assert sim.stats()["faults"]["redirect"] == 1 and sim.stats()["faults"]["drip"] == 1
    finally:
        sim.stop()


@pytest.mark.parametrize("text,expected", [
    ('{"products": [' + "[" * 100_000 + "]" * 100_000 + "]}", "nested deeper"),
    ('{"products": [' + "[" * 500 + "]" * 500 + "]}", "nested deeper than 64"),
    ('{"asin": "B00EXAMPLE", "csv": [' + "7" * 5000 + "]}", "not JSON"),
    ('{"asin": "B00EXAMPLE", "csv": [1, "x", ' + "7" * 400 + "]}", "an integer of more than 20 digits"),
    ('{"asin": "B00EXAMPLE", "csv": [NaN]}', "non-finite number NaN"),
])
def test_analyze_on_hostile_json_is_one_line_not_a_traceback(tmp_path, text, expected):
    import subprocess

    from .workers_support import INGEST

    source = tmp_path / "product.json"
    source.write_text(text)
    result = subprocess.run([INGEST, "analyze", str(source)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr
