"""The admin commands on PostgreSQL (docs/postgres.md, "The CLI"): each runs as a real
subprocess against a PostgreSQL database holding the same rows as an SQLite file and answers
the same; `ingest sql` is read-only by the server's rules; an unreachable server is one line,
exit 4; the password never appears in any output."""

import json
import subprocess
import time

import pytest

from ingest.backends import open_store, transaction
from ingest.errors import EXIT_DATABASE, EXIT_FAILURE

from .conftest import INGEST

PASSWORD = "s3cret-pw-91c4"
NOW = time.time()


def with_password(url: str) -> str:
    """The suite's server trusts local connections: a password in the URL is accepted and unused,
    so it can be checked for in every output."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@", 1)


def fill(target) -> None:
    conn = open_store(target).open()
    with transaction(conn):
        conn.execute("INSERT INTO leases (name, fence, ttl_s) VALUES ('backfill', 3, 30.0)")
        for event, fence in (("acquired", 3), ("released", 3)):
            conn.execute("INSERT INTO lease_events (name, at, event, fence, holder, detail) VALUES (?, ?, ?, ?, ?, ?)",
                         ("backfill", NOW - 60, event, fence, "host:1:n", None))
        for asin, status, reason in (("0439064872", "accepted", "ok"), ("B000000001", "rejected", "no_sales"),
                                     ("B000000002", "incomplete", "no_history")):
            conn.execute("INSERT INTO deals (asin, status, reason, first_seen, last_seen, source, fence, writer, title)"
                         " VALUES (?, ?, ?, ?, ?, 'backfill', 3, 'backfill', ?)",
                         (asin, status, reason, NOW - 600, NOW - 60, f"title {asin}"))
            conn.execute("INSERT INTO decisions (at, worker, asin, outcome, reason, one_year_avg_cents, fence)"
                         " VALUES (?, 'backfill', ?, ?, ?, 1234, 3)", (NOW - 120, asin, status, reason))
    conn.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory, pg_server):
    """The same rows in an SQLite file and a PostgreSQL database (its URL with a password)."""
    sqlite_path = tmp_path_factory.mktemp("pgcli") / "ingest.db"
    url = with_password(pg_server.create_database())
    for target in (sqlite_path, url):
        fill(target)
    return {"sqlite": str(sqlite_path), "postgresql": url}


def ingest(target: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    done = subprocess.run([INGEST, "--db", target, *args],
                          capture_output=True, text=True, timeout=timeout, env=_env())
    assert PASSWORD not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("INGEST_", "KEEPA_"))}


def both(stores, *args) -> dict[str, subprocess.CompletedProcess]:
    return {name: ingest(target, *args) for name, target in stores.items()}


def json_of(done: subprocess.CompletedProcess):
    assert done.returncode in (0, 1, 2), done.stderr
    return json.loads(done.stdout)


# ------------------------------------------------------------------ the same answers


def test_leases_and_their_history_are_the_same(stores):
    def summary(rows):
        return [{k: r[k] for k in ("name", "holder", "fence", "state")} for r in rows]

    out = both(stores, "leases", "--json")
    assert summary(json_of(out["postgresql"])) == summary(json_of(out["sqlite"])) != []
    out = both(stores, "leases", "history", "--json")
    events = {n: [(e["name"], e["event"], e["fence"], e["holder"]) for e in json_of(d)] for n, d in out.items()}
    assert events["postgresql"] == events["sqlite"] and len(events["sqlite"]) == 2


def test_a_lease_released_by_hand_the_same(stores):
    out = both(stores, "leases", "release", "backfill")
    assert out["postgresql"].returncode == out["sqlite"].returncode
    assert out["postgresql"].stdout == out["sqlite"].stdout


@pytest.mark.parametrize("args", [("deals", "--json"), ("deals", "stats", "--json"), ("deals", "rejections", "--json"),
                                  ("alerts", "--json")])
def test_deal_and_alert_reports_are_the_same(stores, args):
    out = both(stores, *args)
    pg, lite = json_of(out["postgresql"]), json_of(out["sqlite"])
    for side in (pg, lite):
        if isinstance(side, dict):
            for key in ("since", "until"):  # when each ran
                side.pop(key, None)
    assert pg == lite


@pytest.mark.parametrize("args", [("db", "version"), ("config", "check")])
def test_schema_version_and_config_check_say_the_same(stores, args):
    out = both(stores, *args)
    assert out["postgresql"].returncode == out["sqlite"].returncode == 0
    assert out["postgresql"].stdout == out["sqlite"].stdout


def test_db_migrate_names_the_database_without_its_url(stores):
    done = ingest(stores["postgresql"], "db", "migrate")
    assert done.returncode == 0
    assert done.stdout.startswith("PostgreSQL database 'ingest_test_") and "nothing to do" in done.stdout


def test_db_stats_counts_the_same_rows_and_says_what_it_cannot_see(stores):
    out = both(stores, "db", "stats", "--json")
    pg, lite = json_of(out["postgresql"]), json_of(out["sqlite"])
    rows = {n: {o["name"]: o["rows"] for o in side["objects"] if o["kind"] == "table" and o["name"] != "ingest_schema"}
            for n, side in (("pg", pg), ("lite", lite))}
    assert rows["pg"] == rows["lite"] and rows["pg"]["deals"] == 3
    assert pg["path"].startswith("PostgreSQL database 'ingest_test_") and pg["file_bytes"] > 0
    assert pg["wal_bytes"] is None and pg["disk_free"] is None and pg["growth_rows"] == lite["growth_rows"]
    text = ingest(stores["postgresql"], "db", "stats").stdout
    assert "the server's: not visible from here" in text


def metrics_text(stores) -> dict[str, str]:
    out = both(stores, "metrics", "print", "--supervisor-conf", "/nonexistent/supervisord.conf")
    for done in out.values():
        assert done.returncode == 0, done.stderr
    return {store: done.stdout for store, done in out.items()}


def test_metrics_parse_and_have_the_same_series(stores):
    from prometheus_client.parser import text_string_to_metric_families

    names = {store: {f.name for f in text_string_to_metric_families(text)} for store, text in metrics_text(stores).items()}
    assert names["postgresql"] == names["sqlite"] and "ingest_deals" in names["sqlite"]


def test_metrics_samples_are_the_same(stores):
    texts = metrics_text(stores)
    deals = {store: [line for line in text.splitlines() if line.startswith(("ingest_deals{", "ingest_lease_fence"))]
             for store, text in texts.items()}
    assert deals["postgresql"] == deals["sqlite"] != []


SUMMARY_COMMANDS = [("status", "--json"), ("diagnose", "stall", "--json"), ("tokens", "--json"), ("watch", "--once")]


@pytest.mark.parametrize("args", SUMMARY_COMMANDS, ids=" ".join)
def test_status_diagnose_tokens_and_watch_answer_the_same(stores, args):
    out = both(stores, *args, "--supervisor-conf", "/nonexistent/supervisord.conf") if args[0] in (
        "status", "diagnose", "watch") else both(stores, *args)
    assert out["postgresql"].returncode == out["sqlite"].returncode
    if "--json" in args:
        pg, lite = json_of(out["postgresql"]), json_of(out["sqlite"])
        assert pg.get("verdict") == lite.get("verdict")
        assert [c["name"] for c in pg.get("checks", [])] == [c["name"] for c in lite.get("checks", [])]


# ------------------------------------------------------------------ ingest sql


def test_sql_answers_the_same_on_both(stores):
    query = "SELECT asin, status, reason FROM deals ORDER BY asin"
    out = both(stores, "sql", query, "--json")
    assert json_of(out["postgresql"]) == json_of(out["sqlite"]) != []
    out = both(stores, "sql", "SELECT count(*) AS n FROM deals WHERE status = :s", "-p", "s", "accepted")
    assert out["postgresql"].stdout == out["sqlite"].stdout


@pytest.mark.parametrize("statement", ["DELETE FROM deals", "UPDATE deals SET status = 'accepted'",
                                       "CREATE TEMP TABLE t (x int)", "DROP TABLE deals",
                                       "SELECT 1; DELETE FROM deals", "SELECT 1; SELECT 2"])
def test_sql_on_postgresql_refuses_a_write_and_a_second_statement(stores, statement):
    done = ingest(stores["postgresql"], "sql", statement)
    assert done.returncode == EXIT_FAILURE and not done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("ingest: error: refused: ")
    count = ingest(stores["postgresql"], "sql", "SELECT count(*) AS n FROM deals")
    assert count.stdout.split() == ["n", "3"]


# ------------------------------------------------------------------ an unreachable server


@pytest.mark.parametrize("args", [("status",), ("sql", "SELECT 1"), ("db", "version"), ("leases",), ("db", "stats")])
def test_an_unreachable_server_is_one_line_exit_4_without_the_password(tmp_path, args):
    url = f"postgresql://postgres:{PASSWORD}@/nowhere?host={tmp_path}&connect_timeout=2"
    done = ingest(url, *args)
    assert done.returncode == EXIT_DATABASE
    assert done.stderr.count("\n") == 1 and "PostgreSQL database 'nowhere'" in done.stderr and not done.stdout


# ------------------------------------------------------------------ the watchdog's stale-heartbeat kill


HOLDER = """
import sys, time
from ingest.leases import Lease, LeaseTiming
lease = Lease(sys.argv[1], "upsert", LeaseTiming(ttl_s=1.0, renew_s=0.4, retry_s=0.1))
assert lease.try_acquire()
print("ACQUIRED", flush=True)
time.sleep(120)  # never renews: hung, as far as the watchdog can tell
"""


def test_the_watchdog_kills_a_child_whose_heartbeat_is_older_than_the_ttl_on_postgresql(pg_url):
    import sys

    from ingest.watch import Watcher

    class NoOutbox:
        def put(self, *args):
            pass

    child = subprocess.Popen([sys.executable, "-c", HOLDER, pg_url], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ACQUIRED"
        time.sleep(1.5)  # past the TTL without a renewal
        killed = []
        watcher = Watcher(pg_url, {}, NoOutbox(), kill=lambda pid, conf: killed.append(pid))
        programs = {"upsert": {"pid": child.pid, "state": "RUNNING"}}
        actions = watcher._act(watcher.conn(), programs, time.time())
        assert [(a.action, a.pid) for a in actions] == [("kill_hung", child.pid)] and killed == [child.pid]
        assert watcher.lock is None  # no file lock to look at on PostgreSQL
    finally:
        child.kill()
        child.wait(timeout=10)


def test_ingest_db_names_the_postgresql_database_as_well(stores):
    done = subprocess.run([INGEST, "db", "migrate"], capture_output=True, text=True, timeout=60,
                          env={**_env(), "INGEST_DB": stores["postgresql"]})
    assert done.returncode == 0 and done.stdout.startswith("PostgreSQL database 'ingest_test_")
    assert PASSWORD not in done.stdout + done.stderr


def _integrity(target: str) -> dict:
    report = json_of(ingest(target, "diagnose", "stall", "--json", "--supervisor-conf", "/nonexistent/supervisord.conf"))
    return next(c for c in report["checks"] if c["name"] == "integrity")


def test_integrity_runs_amcheck_once_an_administrator_installed_it(pg_url):
    fill(pg_url)
    check = _integrity(pg_url)
    assert check["verdict"] == "ok" and "amcheck extension is not installed" in check["summary"], check
    admin = open_store(pg_url).connect()
    admin.execute("CREATE EXTENSION amcheck")  # ingest never creates one: the administrator's
    admin.close()
    check = _integrity(pg_url)
    assert check["verdict"] == "ok" and check["summary"].startswith("amcheck bt_index_check"), check
    assert check["summary"].endswith(": ok"), check
