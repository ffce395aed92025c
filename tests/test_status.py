"""`ingest status` and ingest.supervisor: finding supervisord, reading its program states over the
unix socket, and the verdict / exit code an operator (or a monitor) acts on."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ingest.cli import main
from ingest.cli import status as status_module
from ingest.errors import EXIT_CONFIG, EXIT_LEASE_LOST, EXIT_MEANINGS
from ingest.supervisor import describe_exit, find_config, last_error_line, probe, server_url, supervisor_states
from ingest.verdicts import Check, HealthReport

from .conftest import INGEST

SUPERVISORD = str(Path(sys.executable).parent / "supervisord")

CONF = """\
[unix_http_server]
file = %(here)s/../var/s.sock
chmod = 0700

[supervisord]
logfile = %(here)s/../var/supervisord.log
pidfile = %(here)s/../var/supervisord.pid
childlogdir = %(here)s/../var

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = unix://%(here)s/../var/s.sock

[program:backfill]
command = sleep 600
startsecs = 0

[program:upsert]
; exits at once: FATAL after its retries, as a worker with a bad install would
command = false
startsecs = 1
startretries = 0

[program:sim]
command = sleep 600
autostart = false
"""


def write_conf(root: Path) -> Path:
    (root / "conf").mkdir(parents=True)
    (root / "var").mkdir()
    conf = root / "conf" / "supervisord.conf"
    conf.write_text(CONF)
    return conf


@pytest.fixture
def supervisord():
    """A real supervisord (foreground child of the test) with stand-in programs."""
    root = Path(tempfile.mkdtemp(prefix="ist-", dir="/tmp"))  # short: unix socket path limit
    conf = write_conf(root)
    proc = subprocess.Popen([SUPERVISORD, "-n", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            states = supervisor_states(conf)
            if states and states.get("upsert", {}).get("state") == "FATAL" and states["backfill"]["state"] == "RUNNING":
                break
            assert time.monotonic() < deadline, f"supervisord did not settle: {states}"
            time.sleep(0.1)
        yield conf
    finally:
        proc.terminate()  # supervisord stops its programs on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- finding and reading supervisord


def test_server_url_is_relative_to_the_config_file(tmp_path):
    conf = write_conf(tmp_path)
    assert server_url(conf) == f"unix://{tmp_path}/var/s.sock"


def test_config_lookup_order(tmp_path, monkeypatch):
    explicit, from_env = tmp_path / "a.conf", tmp_path / "b.conf"
    (tmp_path / "supervisor.d").mkdir()
    (tmp_path / "supervisor.d" / "supervisord.conf").write_text("")
    monkeypatch.chdir(tmp_path)
    assert find_config() == tmp_path / "supervisor.d" / "supervisord.conf"
    monkeypatch.setenv("INGEST_SUPERVISOR_CONF", str(from_env))
    assert find_config() == from_env
    assert find_config(explicit) == explicit


def test_not_running_is_none_with_a_reason(tmp_path):
    conf = write_conf(tmp_path)
    assert supervisor_states(conf) is None
    view = probe(conf)
    assert not view.running and view.error == "supervisord is not running"
    (tmp_path / "var" / "s.sock").write_text("")  # stale leftover of a killed supervisord
    assert supervisor_states(conf) is None


def test_a_broken_config_is_one_line_not_a_traceback(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("[supervisord\nno section end")
    view = probe(conf)
    assert not view.running and "not valid" in view.error and "\n" not in view.error


def test_last_error_line_says_what_a_worker_died_of(tmp_path):
    log = tmp_path / "backfill.log"
    log.write_text(
        "2026-01-01 10:00:00,000 backfill[7] INFO ingest.worker: waiting for lease 'backfill'\n"
        "2026-01-01 10:00:00,100 backfill[7] ERROR ingest.worker: configuration error: no Keepa API key\n"
        "2026-01-01 10:00:00,200 backfill[7] INFO ingest.leases: lease backfill released, fence 3\n"
    )
    assert last_error_line(str(log)) == "ERROR ingest.worker: configuration error: no Keepa API key"
    assert last_error_line(str(tmp_path / "missing.log")) == ""


@pytest.mark.slow
def test_reads_program_states_from_a_real_supervisord(supervisord):
    states = supervisor_states(supervisord)
    backfill, upsert, sim = states["backfill"], states["upsert"], states["sim"]
    assert backfill["state"] == "RUNNING" and backfill["pid"] > 0 and backfill["uptime_s"] >= 0
    assert os.path.exists(f"/proc/{backfill['pid']}")
    assert upsert["state"] == "FATAL" and upsert["pid"] is None and upsert["uptime_s"] is None
    assert sim["state"] == "STOPPED"


@pytest.mark.slow
def test_status_names_the_program_that_is_down(supervisord, tmp_path):
    from ingest.store import open_db

    open_db(tmp_path / "x.db").close()  # status reads an existing database (a missing one is exit 4)
    done = subprocess.run([INGEST, "--db", str(tmp_path / "x.db"), "status", "--json", "--supervisor-conf",
                           str(supervisord)], capture_output=True, text=True, timeout=60)
    state = json.loads(done.stdout)
    assert done.returncode == 2 and state["verdict"] == "down"
    assert any("upsert FATAL" in p for p in state["problems"])
    assert any("sim STOPPED" in p for p in state["problems"])  # not a worker, still reported
    assert state["supervisor"]["programs"]["backfill"]["state"] == "RUNNING"

    screen = subprocess.run([INGEST, "--db", str(tmp_path / "x.db"), "status", "--supervisor-conf",
                             str(supervisord)], capture_output=True, text=True, timeout=60)
    assert screen.returncode == 2
    lines = screen.stdout.splitlines()
    assert lines[1].split() == ["verdict", "DOWN"]
    assert any(line.split()[:2] == ["upsert", "FATAL"] for line in lines)


# ---------------------------------------------------------------- verdict -> exit code


@pytest.mark.parametrize("verdict,code", [("healthy", 0), ("degraded", 1), ("down", 2)])
def test_exit_code_follows_the_verdict(monkeypatch, tmp_path, verdict, code):
    check = Check("progress", {"healthy": "ok", "degraded": "warn", "down": "fail"}[verdict],
                  "backfill holds its lease but committed nothing for 12m", "ingest diagnose stall")
    problems = [] if verdict == "healthy" else [f"progress: {check.summary}"]
    monkeypatch.setattr(status_module, "system_report",
                        lambda conn, programs, **kw: HealthReport(verdict, problems, [check]))
    monkeypatch.setenv("INGEST_SUPERVISOR_CONF", str(tmp_path / "none.conf"))
    runner = CliRunner()
    from ingest.store import open_db

    open_db(tmp_path / "x.db").close()  # status reads an existing database (a missing one is exit 4)
    screen = runner.invoke(main, ["--db", str(tmp_path / "x.db"), "status"])
    assert screen.exit_code == code, screen.output
    if verdict != "healthy":
        assert "committed nothing for 12m" in screen.output and "-> ingest diagnose stall" in screen.output

    as_json = runner.invoke(main, ["--db", str(tmp_path / "x.db"), "status", "--json"])
    assert as_json.exit_code == code
    state = json.loads(as_json.output)
    assert state["verdict"] == verdict and state["problems"] == problems
    assert set(state) >= {"supervisor", "leases", "tokens", "deals", "progress", "checks"}


def test_an_exited_worker_shows_what_its_exit_status_means():
    assert describe_exit(EXIT_LEASE_LOST) == "exit 5: lost its lease"
    assert describe_exit(EXIT_CONFIG) == "exit 3: configuration error"
    assert describe_exit(77) == "exit 77" and describe_exit(None) == ""
    assert sorted(EXIT_MEANINGS) == [0, 1, 2, 3, 4, 5]


def test_status_shows_the_watchdog_the_last_alert_and_failed_deliveries(tmp_path, monkeypatch):
    from ingest.store import open_db, transaction

    db = tmp_path / "x.db"
    conn = open_db(db)
    now = time.time()
    with transaction(conn):
        conn.execute("INSERT INTO watch_actions (at, action, reason, pid, program) VALUES"
                     " (?, 'kill_stopped', 'backfill (pid 42) is stopped (state T)', 42, 'backfill')", (now - 120,))
        conn.execute("INSERT INTO alert_messages (at, kind, verdict, previous, text, payload) VALUES"
                     " (?, 'alert', 'down', 'healthy', 'ingest is DOWN', '{}')", (now - 60,))
        conn.execute("INSERT INTO alerts (at, message_id, kind, verdict, channel, target, result, attempts, error)"
                     " VALUES (?, 1, 'alert', 'down', 'webhook', 'hooks.example', 'failed', 4, 'hooks.example: HTTP 500')",
                     (now - 30,))
    monkeypatch.setenv("INGEST_SUPERVISOR_CONF", str(tmp_path / "none.conf"))
    screen = CliRunner().invoke(main, ["--db", str(db), "status"])
    lines = {line.split()[0]: line for line in screen.output.splitlines() if line.strip()}
    assert "last action 2m00s ago: kill_stopped backfill 42" in lines["watchdog"], screen.output
    assert "last 1m00s ago: alert down (webhook failed)" in lines["alerts"], screen.output
    assert "1 delivery(ies) FAILED in 24h; last: webhook hooks.example after 4 attempt(s): hooks.example: HTTP 500" \
        in screen.output
    state = json.loads(CliRunner().invoke(main, ["--db", str(db), "status", "--json"]).output)
    assert state["watch"]["last_action"]["pid"] == 42 and state["watch"]["last_alert"]["kind"] == "alert"
