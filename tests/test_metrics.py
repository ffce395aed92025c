"""`ingest metrics`: the Prometheus text, parsed with prometheus_client's own parser; the series
while both workers run against the simulator; the HTTP endpoint, the textfile, the tables of
other features, and a real Prometheus and promtool when they are installed."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from ingest.calllog import CallRecord, prune
from ingest.cli import main
from ingest.health import assess_health, with_other_programs
from ingest.metrics import IngestCollector, MetricsSettings, exposition, parse_listen, read_snapshot, write_textfile
from ingest.simulator import SimConfig, Simulator
from ingest.store import open_db

from .conftest import INGEST, ROOT
from .workers_support import TEST_KEY, start_worker, stop, wait_for, worker_env, write_config

# every series the issue names, with the labels each sample must carry
REQUIRED = {
    "ingest_tokens_balance": (), "ingest_tokens_refill_per_minute": (), "ingest_tokens_reserved": (),
    "ingest_tokens_blocked_until_timestamp_seconds": (),
    "ingest_keepa_requests_total": ("endpoint", "code"), "ingest_keepa_tokens_spent_total": ("worker",),
    "ingest_keepa_429_total": (),
    "ingest_lease_held": ("lease",), "ingest_lease_fence": ("lease",), "ingest_lease_heartbeat_age_seconds": ("lease",),
    "ingest_worker_last_commit_timestamp_seconds": ("worker",), "ingest_worker_last_fetch_timestamp_seconds": ("worker",),
    "ingest_worker_state": ("worker", "state"),
    "ingest_deals": ("status",), "ingest_decisions_total": ("outcome", "reason"), "ingest_incomplete_backlog": (),
    "ingest_health_verdict": (), "ingest_health_check": ("check",),
    "ingest_db_size_bytes": (), "ingest_db_wal_size_bytes": (), "ingest_disk_free_bytes": (),
}
OTHER_FEATURES = ("ingest_watchdog_actions_total", "ingest_alerts_sent_total", "ingest_last_backup_timestamp_seconds")


def samples(text: str) -> dict[str, list]:
    """sample name -> [(labels, value)], parsed by prometheus_client's parser."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(parsed: dict, name: str, **labels) -> float:
    found = [v for lab, v in parsed.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, (name, labels, parsed.get(name))
    return found[0]


def scrape_text(db_path: Path, now: float | None = None) -> str:
    collector = IngestCollector(db_path, supervisor_conf="/nonexistent/supervisord.conf",
                                clock=(lambda: now) if now is not None else time.time)
    return exposition(collector).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ against a database built here


def test_a_missing_database_is_down_and_is_not_created(tmp_path):
    path = tmp_path / "nothing.db"
    parsed = samples(scrape_text(path))
    assert value(parsed, "ingest_health_verdict") == 2
    assert value(parsed, "ingest_health_check", check="database") == 2
    assert not path.exists() and not Path(f"{path}-wal").exists()


def test_a_file_that_is_not_sqlite_is_down_with_one_line_in_the_log(tmp_path, caplog):
    path = tmp_path / "garbage.db"
    path.write_bytes(b"not a database at all" * 100)
    collector = IngestCollector(path, supervisor_conf="/nonexistent/supervisord.conf")
    parsed = samples(exposition(collector).decode())
    assert value(parsed, "ingest_health_verdict") == 2
    assert [r.getMessage() for r in caplog.records if r.name == "ingest.metrics"] == [
        f"scrapes say down: database {path}: file is not a database"]
    exposition(collector)   # the same problem again: not logged again
    assert len([r for r in caplog.records if r.name == "ingest.metrics"]) == 1
    done = subprocess.run([INGEST, "--db", str(path), "metrics", "print"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "ingest_health_verdict 2.0" in done.stdout


def test_counters_come_from_running_totals_and_never_go_back(db_path):
    conn = open_db(db_path)
    now = time.time()
    for at, worker, status, code, actual in [(now - 40 * 86400, "backfill", "ok", 200, 5),
                                             (now - 10, "backfill", "ok", 200, 7),
                                             (now - 5, "upsert", "rate_limited", 429, 0),
                                             (now - 4, "upsert", "transient", None, None)]:
        CallRecord(at=at, worker=worker, endpoint="product", status=status, http_status=code, actual=actual).insert(conn, "acct")
    conn.execute("INSERT INTO decisions (at, worker, asin, outcome, reason, fence) VALUES"
                 " (?, 'backfill', 'A1', 'accepted', 'ok', 1), (?, 'backfill', 'A2', 'rejected', 'too_new', 1),"
                 " (?, 'backfill', 'A3', 'rejected', 'too_new', 1)", (now, now, now))
    before = samples(scrape_text(db_path))
    assert value(before, "ingest_keepa_requests_total", endpoint="product", code="200") == 2
    assert value(before, "ingest_keepa_requests_total", endpoint="product", code="429") == 1
    assert value(before, "ingest_keepa_requests_total", endpoint="product", code="none") == 1
    assert value(before, "ingest_keepa_tokens_spent_total", worker="backfill") == 12
    assert value(before, "ingest_keepa_429_total") == 1
    assert value(before, "ingest_decisions_total", outcome="rejected", reason="too_new") == 2
    assert value(before, "ingest_decisions_total", outcome="accepted", reason="ok") == 1

    assert prune(conn, now, days=30) == 1   # the call log forgets; the counters do not
    after = samples(scrape_text(db_path))
    assert value(after, "ingest_keepa_requests_total", endpoint="product", code="200") == 2
    assert value(after, "ingest_keepa_tokens_spent_total", worker="backfill") == 12


def test_the_scrape_counts_no_call_log_rows(db_path):
    """No statement a scrape runs counts or sums over the whole call log or decisions (the query
    plan of each aggregate over them is an index search of a window, never a SCAN)."""
    conn = open_db(db_path)
    plans = []
    conn.set_trace_callback(lambda sql: plans.append(sql))
    read_snapshot(conn, db_path, time.time(), supervisor=None)
    conn.set_trace_callback(None)
    scans, aggregates = [], 0
    for sql in plans:
        if not sql.lstrip().upper().startswith("SELECT") or not any(f in sql.lower() for f in ("count(", "sum(")):
            continue
        try:
            rows = conn.execute("EXPLAIN QUERY PLAN " + sql, [0] * sql.count("?")).fetchall()
        except Exception:
            continue
        aggregates += 1
        scans += [(sql, r[3]) for r in rows if r[3].startswith("SCAN") and ("keepa_calls" in r[3] or "decisions" in r[3])]
    assert scans == [] and aggregates >= 5


def test_the_totals_are_seeded_from_the_rows_there_at_upgrade(db_path):
    from ingest.store import connect, migrate, migrations
    conn = connect(db_path)  # the file of a v005 ingest: migrations up to v005 only
    for version, _, sql in migrations():
        if version <= 5:
            conn.executescript(sql)
    conn.execute("PRAGMA user_version = 5")
    CallRecord(at=time.time(), worker="upsert", endpoint="deal", http_status=200, actual=5).insert(conn, "acct")
    conn.execute("INSERT INTO decisions (at, worker, asin, outcome, reason, fence) VALUES (1, 'upsert', 'A', 'accepted', 'ok', 1)")
    migrate(conn)
    parsed = samples(scrape_text(db_path))
    assert value(parsed, "ingest_keepa_requests_total", endpoint="deal", code="200") == 1
    assert value(parsed, "ingest_keepa_tokens_spent_total", worker="upsert") == 5
    assert value(parsed, "ingest_decisions_total", outcome="accepted", reason="ok") == 1


def test_other_features_tables_are_read_when_they_exist(db_path):
    conn = open_db(db_path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    parsed = samples(scrape_text(db_path))
    for name, table in (("ingest_watchdog_actions_total", "watch_actions"), ("ingest_alerts_sent_total", "alerts"),
                        ("ingest_last_backup_timestamp_seconds", "backups")):
        if table not in tables:
            assert name not in parsed   # the family is there with no samples until the table exists
    # the agreed schemas (shared_tables: v007 watch, v009 datasafe)
    conn.executescript("""
        CREATE TABLE IF NOT EXISTS watch_actions(id INTEGER PRIMARY KEY, at REAL NOT NULL, action TEXT NOT NULL, reason TEXT,
                                   pid INTEGER, program TEXT, detail TEXT);
        CREATE TABLE IF NOT EXISTS alerts(id INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL, verdict TEXT,
                            channel TEXT NOT NULL, result TEXT NOT NULL, attempts INTEGER NOT NULL, error TEXT, text TEXT);
        CREATE TABLE IF NOT EXISTS backups(id INTEGER PRIMARY KEY, at REAL NOT NULL, path TEXT NOT NULL, bytes INTEGER, ok INTEGER NOT NULL);
    """)
    parsed = samples(scrape_text(db_path))
    assert value(parsed, "ingest_last_backup_timestamp_seconds") == 0   # none yet: alerts can fire on it
    conn.executescript("""
        INSERT INTO watch_actions (at, action, pid, program) VALUES (1, 'kill_hung', 10, 'backfill'),
            (2, 'kill_hung', 11, 'backfill'), (3, 'alert_foreign_lock', NULL, NULL);
        INSERT INTO alerts (at, kind, channel, result, attempts) VALUES (1, 'alert', 'webhook', 'sent', 1),
            (2, 'alert', 'email', 'failed', 3), (3, 'recovered', 'webhook', 'sent', 1);
        INSERT INTO backups (at, path, bytes, ok) VALUES (100.5, '/b/1', 10, 1), (200.5, '/b/2', NULL, 0);
    """)
    parsed = samples(scrape_text(db_path))
    assert value(parsed, "ingest_watchdog_actions_total", action="kill_hung") == 2
    assert value(parsed, "ingest_watchdog_actions_total", action="alert_foreign_lock") == 1
    assert value(parsed, "ingest_alerts_sent_total", channel="webhook", result="sent") == 2
    assert value(parsed, "ingest_alerts_sent_total", channel="email", result="failed") == 1
    assert value(parsed, "ingest_last_backup_timestamp_seconds") == 100.5   # the failed one does not count


def test_health_is_the_verdict_of_ingest_status(db_path):
    open_db(db_path).close()
    now = time.time()
    report = with_other_programs(assess_health(open_db(db_path), now=now, supervisor=None), None)
    parsed = samples(scrape_text(db_path, now))
    assert value(parsed, "ingest_health_verdict") == ("healthy", "degraded", "down").index(report.verdict)
    shown = {lab["check"]: v for lab, v in parsed["ingest_health_check"]}
    assert shown == {c.name: ("ok", "warn", "fail").index(c.verdict) for c in report.checks}

    done = subprocess.run([INGEST, "--db", str(db_path), "status", "--json", "--supervisor-conf", "/nonexistent"],
                          capture_output=True, text=True, timeout=60)
    state = json.loads(done.stdout)
    assert {c["name"]: c["verdict"] for c in state["checks"]} == {c.name: c.verdict for c in report.checks}


def test_a_program_besides_the_workers_not_running_degrades_as_in_status():
    from ingest.verdicts import Check, HealthReport
    report = HealthReport("healthy", [], [Check("leases", "ok", "")])
    programs = {"backfill": {"state": "RUNNING"}, "upsert": {"state": "RUNNING"}, "metrics": {"state": "FATAL"}}
    folded = with_other_programs(report, programs)
    assert folded.verdict == "degraded" and folded.problems == ["supervisor: metrics FATAL (not a worker)"]
    assert with_other_programs(report, None).verdict == "healthy"


def test_the_key_never_appears_even_in_stored_errors(db_path):
    conn = open_db(db_path)
    CallRecord(at=time.time(), worker="backfill", endpoint="product", status="request_error", http_status=400,
               error=f"bad request for key={TEST_KEY}").insert(conn, "acct")
    assert TEST_KEY not in scrape_text(db_path)


# ------------------------------------------------------------------ settings and the CLI


@pytest.mark.parametrize("text, expected", [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:0", ("::1", 0)),
                                            ("localhost:80", ("localhost", 80))])
def test_listen_is_host_and_port(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9464", ":9464", "host:", "host:70000", "host:x", "a b:1"])
def test_a_bad_listen_is_a_config_error_naming_it(tmp_path, text):
    (tmp_path / "ingest.toml").write_text(f'[metrics]\nlisten = "{text}"\n')
    result = CliRunner().invoke(main, ["--db", str(tmp_path / "x.db"), "metrics", "print"])
    assert result.exit_code == 3, result.output
    assert "listen" in result.output and "Traceback" not in result.output
    assert MetricsSettings().listen == "127.0.0.1:9464"


def test_print_writes_the_text_and_textfile_writes_it_atomically_0644(tmp_path, db_path):
    open_db(db_path).close()
    printed = subprocess.run([INGEST, "--db", str(db_path), "metrics", "print"], capture_output=True, text=True,
                             timeout=60)
    assert printed.returncode == 0, printed.stderr
    assert "ingest_health_verdict" in samples(printed.stdout)
    target = tmp_path / "tf" / "ingest.prom"
    target.parent.mkdir()
    os.umask(0o077)   # the textfile is readable by node_exporter's user whatever the umask
    try:
        done = subprocess.run([INGEST, "--db", str(db_path), "metrics", "print", "--textfile", str(target)],
                              capture_output=True, text=True, timeout=60)
    finally:
        os.umask(0o022)
    assert done.returncode == 0 and done.stdout == "", done.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert "ingest_deals" in samples(target.read_text())
    assert os.listdir(target.parent) == ["ingest.prom"]   # no temporary file left behind

    wrong = subprocess.run([INGEST, "--db", str(db_path), "metrics", "print", "--textfile", str(tmp_path / "x.txt")],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and ".prom" in wrong.stderr and not (tmp_path / "x.txt").exists()


def test_write_textfile_replaces_in_one_step(tmp_path):
    target = tmp_path / "a.prom"
    target.write_text("old 1\n")
    inode = target.stat().st_ino
    write_textfile(target, b"new 2\n")
    assert target.read_text() == "new 2\n" and target.stat().st_ino != inode


def _serve(db_path: Path, *args: str, env=None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([INGEST, "--db", str(db_path), "metrics", "serve", *args], stderr=subprocess.PIPE,
                            text=True, env=env)
    line = proc.stderr.readline()
    assert "serving http://" in line, line
    return proc, line.split("serving ")[1].split()[0]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def test_serve_answers_metrics_and_stops_on_sigterm_with_exit_0(db_path):
    open_db(db_path).close()
    proc, url = _serve(db_path, "--listen", "127.0.0.1:0")
    try:
        code, text = _get(url)
        assert code == 200 and value(samples(text), "ingest_deals", status="accepted") == 0
        assert _get(url.replace("/metrics", "/other"))[0] == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_serve_on_a_port_in_use_is_one_line_and_exit_1(db_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([INGEST, "--db", str(db_path), "metrics", "serve", "--listen", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}" in done.stderr


# ------------------------------------------------------------------ both workers against the simulator


@pytest.fixture
def running(tmp_path, db_path):
    """Both workers and the endpoint running against the simulator; stopped at the end."""
    sim = Simulator(SimConfig(port=0, refill_rate=300, start_tokens=300, seed=5, products=600)).start()
    env = worker_env(sim.url, db_path, write_config(tmp_path))
    procs = []
    try:
        procs += [start_worker("backfill", env), start_worker("upsert", env)]
        wait_for(lambda: _progress_of_both(db_path), 60, what="both workers committing")
        proc, url = _serve(db_path, "--listen", "127.0.0.1:0", env=env)
        procs.append(proc)
        yield sim, url, procs, env
    finally:
        for p in procs:
            stop(p)
        sim.stop()


def _progress_of_both(db_path: Path) -> bool:
    from .workers_support import scalar
    return ((scalar(db_path, "SELECT count(*) FROM worker_progress WHERE last_commit_at IS NOT NULL"
                             " AND last_success_at IS NOT NULL") or 0) >= 2
            and (scalar(db_path, "SELECT count(*) FROM decisions") or 0) > 0)


@pytest.mark.slow
def test_every_series_is_present_while_both_workers_run(running):
    sim, url, procs, _ = running
    code, text = _get(url)
    assert code == 200
    parsed = samples(text)
    missing = [n for n in REQUIRED if n not in parsed]
    assert missing == []
    for name, labels in REQUIRED.items():
        for lab, v in parsed[name]:
            assert set(lab) == set(labels), (name, lab)
    for worker in ("backfill", "upsert"):
        assert value(parsed, "ingest_lease_held", lease=worker) == 1
        assert value(parsed, "ingest_keepa_tokens_spent_total", worker=worker) > 0
        assert sum(v for lab, v in parsed["ingest_worker_state"] if lab["worker"] == worker) == 1
        assert time.time() - value(parsed, "ingest_worker_last_commit_timestamp_seconds", worker=worker) < 60
    assert value(parsed, "ingest_tokens_refill_per_minute") == 300
    assert value(parsed, "ingest_keepa_429_total") == sim.stats()["served_429"] == 0
    assert sum(v for _, v in parsed["ingest_deals"]) > 0
    assert TEST_KEY not in text


@pytest.mark.slow
def test_the_balance_agrees_with_the_simulators(running):
    sim, url, procs, _ = running
    # while the workers spend: within one batch of calls in flight
    parsed = samples(_get(url)[1])
    assert abs(value(parsed, "ingest_tokens_balance") - sim.stats()["tokens"]["tokensLeft"]) <= 150
    for p in procs[:2]:
        assert stop(p) == 0
    # at rest: the ledger's projection of the server's balance is the server's balance
    parsed = samples(_get(url)[1])
    server = sim.stats()["tokens"]["tokensLeft"]
    assert abs(value(parsed, "ingest_tokens_balance") - server) <= 5, (parsed["ingest_tokens_balance"], server)
    assert value(parsed, "ingest_tokens_reserved") == 0
    # the maintained counts are those of the tables the workers wrote
    from .workers_support import query
    counted = dict(query(procs[2].args[2], "SELECT status, count(*) FROM deals GROUP BY 1"))
    assert {lab["status"]: v for lab, v in parsed["ingest_deals"] if v} == counted
    spent = dict(query(procs[2].args[2], "SELECT worker, sum(actual) FROM keepa_calls GROUP BY 1"))
    assert {lab["worker"]: v for lab, v in parsed["ingest_keepa_tokens_spent_total"]} == spent


# ------------------------------------------------------------------ promtool and a real Prometheus


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_the_example_alerting_rules_pass_promtool():
    done = subprocess.run(["promtool", "check", "rules", str(ROOT / "docs" / "prometheus" / "alerts.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_the_example_alerts_fire_when_they_should_and_not_on_an_idle_worker():
    done = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=ROOT / "docs" / "prometheus",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _as_nobody_when_root():
    """Prometheus runs unprivileged: as nobody when the test runs as root."""
    if os.geteuid() == 0:
        def drop():
            os.setgid(65534)
            os.setuid(65534)
        return drop
    return None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (Debian package prometheus)")
def test_a_real_prometheus_scrapes_and_stores_the_balance(running):
    sim, url, procs, _ = running
    target = url.split("//")[1].split("/")[0]
    folder = Path(tempfile.mkdtemp(prefix="iprom-"))
    try:
        os.chmod(folder, 0o777)
        (folder / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            f"scrape_configs:\n  - job_name: ingest\n    static_configs:\n      - targets: ['{target}']\n")
        port = free_port()
        prom = subprocess.Popen(["prometheus", f"--config.file={folder / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=open(folder / "prometheus.log", "wb"),
                                preexec_fn=_as_nobody_when_root(), cwd=folder)
        try:
            def stored():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query=ingest_tokens_balance",
                                                timeout=5) as r:
                        body = json.load(r)
                except OSError:
                    return None
                result = body.get("data", {}).get("result", [])
                return result[0] if result else None
            found = wait_for(stored, 60, interval=0.5, what="Prometheus to store ingest_tokens_balance")
            assert found["metric"]["job"] == "ingest"
            assert 0 <= float(found["value"][1]) <= 300 * 60
        finally:
            prom.terminate()
            try:
                prom.wait(20)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------ under the shipped supervisord


def test_the_metrics_program_is_in_both_supervisord_configs():
    import configparser
    import glob

    for conf in ("supervisord.conf", "demo.conf"):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(ROOT / "supervisor.d" / conf)
        patterns = parser.get("include", "files").split()
        included = {Path(f).name for p in patterns for f in glob.glob(str(ROOT / "supervisor.d" / p))}
        assert "metrics.conf" in included, (conf, included)


@pytest.mark.slow
def test_under_supervisord_the_endpoint_says_what_ingest_status_says():
    from .supervised import SupervisedProject

    sim = Simulator(SimConfig(port=0, refill_rate=6000, products=3000, seed=3)).start()
    project = SupervisedProject(sim.url)
    try:
        done = project.script("start", check=False, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        project.wait_running("backfill", "upsert", "metrics")
        log = project.root / "var" / "log" / "metrics.log"
        url = project.wait(lambda: log.exists() and "serving " in (t := log.read_text()) and
                           t.split("serving ")[1].split()[0], 20, "the metrics program to log its address")

        def healthy_in_both():
            status = json.loads(project.script("status", "--json", check=False).stdout)
            parsed = samples(_get(url)[1])
            return (status, parsed) if status["verdict"] == "healthy" and value(
                parsed, "ingest_health_verdict") == 0 else None
        status, parsed = project.wait(healthy_in_both, 60, "status and metrics both healthy", interval=0.5)
        assert {lab["check"]: v for lab, v in parsed["ingest_health_check"]} == {c["name"]: 0 for c in status["checks"]}
        assert value(parsed, "ingest_health_check", check="supervisor") == 0   # it found supervisord itself
        assert "e2e-key" not in _get(url)[1]

        project.ctl("stop", "upsert")   # a worker down: both say down
        def down_in_both():
            status = json.loads(project.script("status", "--json", check=False).stdout)
            return status["verdict"] == "down" and value(samples(_get(url)[1]), "ingest_health_verdict") == 2
        project.wait(down_in_both, 30, "status and metrics both down", interval=0.5)
    finally:
        project.close()
        sim.stop()
