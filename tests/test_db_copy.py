"""`ingest db copy --to postgresql://...` (ingest/db_copy.py) against a real PostgreSQL server:
an SQLite database filled by a real backfill pass against the simulator, copied, then compared
table by table, row by row."""

import json
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from ingest.db_copy import TOTALS_KEPT_BY_TRIGGERS, copy_order, freed, schema_mismatch
from ingest.errors import EXIT_CONFIG, EXIT_DATABASE, EXIT_OK, EXIT_USAGE, StoreError
from ingest.lease_table import HOLDER_COLUMNS
from ingest.procinfo import Identity

from .workers_support import INGEST, run_worker, worker_env, write_config

PASSWORD = "s3cret-Pw-77"


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Path:
    """An SQLite database as a real installation leaves it: a backfill pass, then rows in the
    tables the pass does not write, calls pruned (the totals now count more than the rows), and
    a lease still naming a holder that has exited."""
    from ingest.simulator import SimConfig, Simulator

    folder = tmp_path_factory.mktemp("filled")
    db = folder / "ingest.db"
    sim = Simulator(SimConfig(port=0, refill_rate=6000, seed=7, products=1200)).start()
    try:
        result = run_worker("backfill", worker_env(sim.url, db, write_config(folder)), "--once")
    finally:
        sim.stop()
    assert result.returncode == 0, result.stderr[-2000:]
    me = Identity.current()
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DELETE FROM keepa_calls WHERE id = (SELECT min(id) FROM keepa_calls)")  # retention
        conn.execute("INSERT INTO backups (at, path, bytes, ok) VALUES (1.7e9, 'backups/ingest-x.db', 4096, 1)")
        conn.execute("INSERT INTO watch_actions (at, action, reason, pid, program) VALUES (1.7e9, 'kill_hung', 'test', 42, 'upsert')")
        conn.execute("INSERT INTO alert_messages (at, kind, verdict, text, payload) VALUES (1.7e9, 'verdict', 'down', 'down', '{}')")
        conn.execute("INSERT INTO alerts (at, message_id, kind, channel, result, attempts)"
                     " SELECT 1.7e9, max(id), 'verdict', 'webhook', 'sent', 1 FROM alert_messages")
        # our own pid with another start time: a process that has exited (its pid reused)
        conn.execute("INSERT INTO leases (name, holder_host, holder_boot, holder_pidns, holder_pid, holder_start,"
                     " holder_nonce, fence, ttl_s, acquired_at, renewed_at, expires_at, renewed_mono, renewals,"
                     " transitions) VALUES ('upsert', ?, ?, ?, ?, '1', 'deadbeef', 7, 30, 1.7e9, 1.7e9, 1.7e9, 5.0, 3, 7)",
                     (me.host, me.boot, me.pidns, me.pid))
    conn.close()
    return db


@pytest.fixture
def source(filled, tmp_path) -> Path:
    """A private copy of the filled database (tests may add to it)."""
    path = tmp_path / "source.db"
    src, dst = sqlite3.connect(filled), sqlite3.connect(path)
    src.backup(dst)
    src.close(), dst.close()
    return path


def db_copy(source: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([INGEST, "--db", str(source), "db", "copy", "--to", url, *args],
                          capture_output=True, text=True, timeout=60)


def sqlite_tables(path: Path) -> dict[str, list]:
    conn = sqlite3.connect(path)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {n: conn.execute(f'SELECT * FROM "{n}"').fetchall() for n in names}
    finally:
        conn.close()


def pg_rows(url: str, sql: str, *args) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchall()


def pg_tables(url: str, names) -> dict[str, list]:
    return {n: pg_rows(url, f'SELECT * FROM "{n}"') for n in names}


def pg_total_rows(url: str, names) -> int:
    return sum(pg_rows(url, f'SELECT count(*) FROM "{n}"')[0][0] for n in names)


def dbname(url: str) -> str:
    import psycopg

    return psycopg.conninfo.conninfo_to_dict(url)["dbname"]


def columns(path: Path, table: str) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()


# ---------------------------------------------------------------- the copy


def test_copy_gives_the_same_rows_in_every_table(source, pg_url):
    before = sqlite_tables(source)
    result = db_copy(source, pg_url, "--json")
    assert result.returncode == EXIT_OK, result.stderr
    summary = json.loads(result.stdout)
    assert summary["counts_match"] and summary["target"] == f"PostgreSQL database {dbname(pg_url)!r}"
    assert {t["table"]: t["source_rows"] for t in summary["tables"]} == {n: len(r) for n, r in before.items()}
    assert summary["freed_leases"] and summary["freed_leases"][0].startswith("upsert ")

    after = pg_tables(pg_url, before)
    lease_columns = columns(source, "leases")
    for table, rows in before.items():
        if table == "leases":  # free, everything else as it was (fences kept)
            rows = [freed(lease_columns, r) for r in rows]
        assert Counter(after[table]) == Counter(rows), table
        assert after[table], f"{table}: the fixture should fill every table"
    # the totals are the source's, not the source's plus what the insert triggers counted, and
    # not a recount of the rows (a call was pruned)
    calls = pg_rows(pg_url, "SELECT sum(calls) FROM keepa_call_totals")[0][0]
    assert calls == sum(r[3] for r in before["keepa_call_totals"]) == len(before["keepa_calls"]) + 1
    assert pg_rows(pg_url, "SELECT sum(decisions) FROM decision_totals")[0][0] == len(before["decisions"])
    # leases free, fences kept
    assert pg_rows(pg_url, "SELECT name, fence, holder_nonce FROM leases ORDER BY name") == [
        ("backfill", 1, None), ("upsert", 7, None)]
    # the identity sequences continue after the copied ids; the totals trigger runs on
    top = max(r[0] for r in before["keepa_calls"])
    new = pg_rows(pg_url, "INSERT INTO keepa_calls (at, worker, endpoint, status, http_status, actual)"
                          " VALUES (1.8e9, 'backfill', '/deal', 'ok', 200, 5) RETURNING id")[0][0]
    assert new == top + 1
    assert pg_rows(pg_url, "SELECT sum(calls) FROM keepa_call_totals")[0][0] == calls + 1
    events = pg_rows(pg_url, "INSERT INTO lease_events (name, at, event, fence) VALUES ('backfill', 1.8e9, 'acquired', 2) RETURNING id")
    assert events[0][0] == max(r[0] for r in before["lease_events"]) + 1


def test_workers_lease_on_the_copy_continues_the_fence(source, pg_url):
    from ingest.leases import Lease

    assert db_copy(source, pg_url).returncode == EXIT_OK
    with Lease(pg_url, "upsert") as lease:
        assert lease.try_acquire() and lease.fence == 8  # the copied epoch was 7


def test_text_output_lists_every_table_and_never_the_password(source, pg_url):
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")
    assert url != pg_url
    result = db_copy(source, url)
    assert result.returncode == EXIT_OK, result.stderr
    assert "counts match in every table" in result.stdout and "decision_totals" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
    again = db_copy(source, url)  # refused (not empty): the message names the database, not the URL
    assert again.returncode == EXIT_DATABASE
    assert PASSWORD not in again.stdout + again.stderr and "PostgreSQL database" in again.stderr


# ---------------------------------------------------------------- refusals and failures


def test_refused_while_a_live_process_holds_a_lease(source, pg_url):
    from ingest.leases import Lease

    with Lease(source, "backfill") as lease:
        assert lease.try_acquire()
        result = db_copy(source, pg_url)
    assert result.returncode == EXIT_DATABASE
    assert result.stderr.count("\n") == 1 and "backfill held by" in result.stderr and "stop the workers" in result.stderr
    assert pg_total_rows(pg_url, sqlite_tables(source)) == 0


def test_refused_into_a_target_with_rows_naming_the_table(source, pg_url):
    from ingest.backends import open_store

    conn = open_store(pg_url).open()
    conn.execute("INSERT INTO checkpoints (name, value, updated_at, fence) VALUES ('x', '{}', 1.0, 1)")
    conn.close()
    result = db_copy(source, pg_url)
    assert result.returncode == EXIT_DATABASE
    assert result.stderr.count("\n") == 1 and "checkpoints has 1 rows" in result.stderr
    assert pg_total_rows(pg_url, sqlite_tables(source)) == 1


def test_a_row_the_target_refuses_midway_leaves_it_empty(source, pg_url):
    conn = sqlite3.connect(source)
    with conn:  # SQLite keeps a NUL in TEXT; PostgreSQL refuses it. alerts is copied near the end
        conn.execute("INSERT INTO alerts (at, kind, channel, result, attempts, text)"
                     " VALUES (1.7e9, 'verdict', 'webhook', 'failed', 1, 'a' || char(0) || 'b')")
    conn.close()
    result = db_copy(source, pg_url)
    assert result.returncode == EXIT_DATABASE
    assert result.stderr.count("\n") == 1 and "copying alerts failed" in result.stderr
    assert pg_total_rows(pg_url, sqlite_tables(source)) == 0
    # no identity sequence moved (setval, which a rollback does not undo, comes after every row)
    assert pg_rows(pg_url, "SELECT is_called FROM keepa_calls_id_seq") == [(False,)]
    # the target is as it was: once the row is fixed, the copy goes through
    conn = sqlite3.connect(source)
    with conn:
        conn.execute("DELETE FROM alerts WHERE text LIKE 'a%'")
    conn.close()
    assert db_copy(source, pg_url).returncode == EXIT_OK


def test_bad_arguments_are_one_line(source, pg_url, tmp_path):
    assert db_copy(source, "/tmp/not-a-url.db").returncode == EXIT_USAGE
    from_url = subprocess.run([INGEST, "--db", pg_url, "db", "copy", "--to", pg_url], capture_output=True, text=True)
    assert from_url.returncode == EXIT_CONFIG and "copies an SQLite database" in from_url.stderr
    missing = db_copy(tmp_path / "nothing.db", pg_url)
    assert missing.returncode == EXIT_DATABASE and not (tmp_path / "nothing.db").exists()


# ---------------------------------------------------------------- planning and the schema


def test_copy_order_puts_parents_and_fed_rows_first():
    assert copy_order(["b", "a", "c"], {"b": {"a"}, "c": set()}) == ["a", "b", "c"]
    assert copy_order(["t", "x"], {"t": {"not-copied"}}) == ["t", "x"]
    with pytest.raises(StoreError, match="depend on each other"):
        copy_order(["a", "b"], {"a": {"b"}, "b": {"a"}})


def test_freed_clears_the_holder_only():
    cols = ["name", *HOLDER_COLUMNS, "fence"]
    assert freed(cols, ("x", "h", "b", "n", 1, "s", "nonce", 9)) == ("x", None, None, None, None, None, None, 9)


def test_schema_mismatch_names_the_difference():
    assert schema_mismatch({"a": ["x"]}, {"a": ["x"], "ingest_schema": ["version"]}) is None
    assert "only in the source: ['b']" in schema_mismatch({"a": ["x"], "b": ["y"]}, {"a": ["x"]})
    assert "columns of a differ" in schema_mismatch({"a": ["x", "y"]}, {"a": ["y", "x"]})


def test_every_insert_trigger_that_keeps_a_total_is_known(pg_url):
    """A new AFTER INSERT trigger (a total kept from rows) must be listed in
    TOTALS_KEPT_BY_TRIGGERS, or the copy would count those rows twice."""
    from ingest.backends import open_store

    open_store(pg_url).open().close()
    fed = pg_rows(pg_url, "SELECT DISTINCT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                          " WHERE NOT t.tgisinternal AND t.tgtype & 1 = 1 AND t.tgtype & 2 = 0 AND t.tgtype & 4 = 4")
    assert {r[0] for r in fed} == set(TOTALS_KEPT_BY_TRIGGERS.values())


def test_progress_reports_rows_of_each_big_table(source, pg_url, monkeypatch):
    import ingest.db_copy as db_copy_module

    monkeypatch.setattr(db_copy_module, "PROGRESS_EVERY_S", 0.0)  # every table counts as big
    seen = []
    result = db_copy_module.copy_database(source, pg_url, progress=lambda *a: seen.append(a))
    finals = {table: (done, total) for table, done, total, _ in seen}
    assert finals == {t.name: (t.source_rows, t.source_rows) for t in result.tables}
