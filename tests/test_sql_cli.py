"""`ingest sql`: one read-only query, as a table, CSV or JSON; writes refused before they run;
a missing database is one line and exit 4 and is not created."""

import csv
import hashlib
import io
import json
import sqlite3
import subprocess

import pytest

from ingest.errors import EXIT_DATABASE, EXIT_FAILURE
from ingest.store import open_db, transaction

from .conftest import INGEST


def ingest_sql(db_path, *args, timeout=30):
    return subprocess.run([INGEST, "--db", str(db_path), "sql", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def seeded(db_path):
    conn = open_db(db_path)
    with transaction(conn):
        for asin, status, reason in (("0439064872", "accepted", "ok"), ("B000000001", "rejected", "no_sales")):
            conn.execute("INSERT INTO deals (asin, status, reason, first_seen, last_seen, source, fence, writer, title)"
                         " VALUES (?, ?, ?, 1, 2, 'backfill', 1, 'backfill', NULL)", (asin, status, reason))
        conn.execute("INSERT INTO product_history VALUES ('0439064872', 2, ?)", (b"\x00\x01\x02",))
    conn.close()
    return db_path


def fingerprint(db_path) -> tuple:
    """What a write would change: the schema, every table's rows, user_version."""
    conn = sqlite3.connect(db_path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        rows = {t: conn.execute(f'SELECT * FROM "{t}" ORDER BY 1').fetchall() for t in tables}
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()
    return schema, hashlib.sha256(repr(rows).encode()).hexdigest(), version


def test_a_query_prints_an_aligned_table_with_asins_intact(seeded):
    done = ingest_sql(seeded, "SELECT asin, status, fence, title FROM deals ORDER BY asin")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["asin", "status", "fence", "title"]
    assert lines[1].split() == ["0439064872", "accepted", "1", "NULL"]
    assert lines[2].split() == ["B000000001", "rejected", "1", "NULL"]


def test_csv_and_json_carry_the_same_rows(seeded):
    query = "SELECT asin, status, reason FROM deals ORDER BY asin"
    as_csv = list(csv.reader(io.StringIO(ingest_sql(seeded, query, "--csv").stdout)))
    as_json = json.loads(ingest_sql(seeded, query, "--json").stdout)
    assert as_csv[0] == ["asin", "status", "reason"]
    assert as_csv[1:] == [[r["asin"], r["status"], r["reason"]] for r in as_json]
    assert as_json[0] == {"asin": "0439064872", "status": "accepted", "reason": "ok"}


def test_an_empty_result_still_has_its_header(seeded):
    assert ingest_sql(seeded, "SELECT asin, status FROM deals WHERE 0").stdout.split() == ["asin", "status"]
    assert ingest_sql(seeded, "SELECT asin FROM deals WHERE 0", "--csv").stdout == "asin\n"
    assert json.loads(ingest_sql(seeded, "SELECT asin FROM deals WHERE 0", "--json").stdout) == []


def test_views_pragmas_and_named_parameters_work(seeded):
    assert ingest_sql(seeded, "SELECT * FROM funnel").returncode == 0
    info = ingest_sql(seeded, "SELECT name FROM pragma_table_info('deals') WHERE pk", "--csv")
    assert info.stdout.splitlines() == ["name", "asin"]
    assert "asin" in ingest_sql(seeded, "PRAGMA table_info(deals)").stdout
    picked = ingest_sql(seeded, "SELECT asin FROM deals WHERE status = :s", "--json", "-p", "s", "rejected")
    assert json.loads(picked.stdout) == [{"asin": "B000000001"}]


def test_blobs_print_as_their_size_and_as_base64_in_json(seeded):
    query = "SELECT asin, product_z AS data FROM product_history"
    assert "<blob 3 bytes>" in ingest_sql(seeded, query).stdout
    assert json.loads(ingest_sql(seeded, query, "--json").stdout)[0]["data"] == {"$base64": True, "encoded": "AAEC"}


@pytest.mark.parametrize("statement", [
    "DELETE FROM deals",
    "UPDATE deals SET status = 'accepted'",
    "INSERT INTO deals SELECT * FROM deals",
    "WITH x AS (SELECT 1) DELETE FROM deals",
    "DROP TABLE deals",
    "CREATE TABLE t (x)",
    "CREATE TEMP TABLE t (x)",
    "ALTER TABLE deals ADD COLUMN x",
    "PRAGMA user_version = 99",
    "PRAGMA query_only = 0",
    "BEGIN IMMEDIATE",
    "ATTACH 'other.db' AS other",
    "VACUUM INTO 'copy.db'",
    "VACUUM",
    "SELECT 1; DELETE FROM deals",
])
def test_a_write_is_one_line_and_exit_1_and_changes_nothing(seeded, tmp_path, statement):
    before = fingerprint(seeded)
    files = set(tmp_path.rglob("*"))
    done = ingest_sql(seeded, statement)
    assert done.returncode == EXIT_FAILURE
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("ingest: error: ") and not done.stdout
    assert "Traceback" not in done.stderr
    assert fingerprint(seeded) == before
    assert {p for p in tmp_path.rglob("*") if not p.name.endswith(("-wal", "-shm"))} <= files  # no file made


def test_a_refused_write_says_it_is_read_only(seeded):
    assert "read-only (DELETE deals)" in ingest_sql(seeded, "DELETE FROM deals").stderr


def test_a_missing_database_is_one_line_exit_4_and_is_not_created(tmp_path):
    path = tmp_path / "nowhere" / "ingest.db"
    done = ingest_sql(path, "SELECT 1")
    assert done.returncode == EXIT_DATABASE
    assert done.stderr.count("\n") == 1 and "no database at" in done.stderr
    assert not path.parent.exists()


def test_a_file_that_is_not_sqlite_is_exit_4(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("not a database at all " * 100)
    done = ingest_sql(path, "SELECT * FROM deals")
    assert done.returncode == EXIT_DATABASE and "not an SQLite database" in done.stderr
    assert path.read_text() == "not a database at all " * 100


def test_bad_sql_is_one_line_exit_1(seeded):
    done = ingest_sql(seeded, "SELEC * FROM deals")
    assert done.returncode == EXIT_FAILURE and done.stderr.count("\n") == 1 and "syntax error" in done.stderr
    done = ingest_sql(seeded, "SELECT * FROM no_such_table")
    assert done.returncode == EXIT_FAILURE and "no such table" in done.stderr


def test_a_query_answers_while_a_worker_holds_the_write_lock(seeded):
    """WAL: readers never wait for the writer; the query sees the last committed state."""
    writer = open_db(seeded)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM deals")
        done = ingest_sql(seeded, "SELECT count(*) AS n FROM deals", "--csv", timeout=10)
        assert done.returncode == 0 and done.stdout.splitlines() == ["n", "2"]
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_key_in_a_stored_url_is_redacted_in_the_output(seeded):
    conn = sqlite3.connect(seeded)
    conn.execute("INSERT INTO keepa_calls (at, worker, endpoint, status, error) VALUES"
                 " (1, 'upsert', 'deal', 'transient', 'GET https://api.keepa.com/deal?key=SECRETKEY123&x=1')")
    conn.commit()
    conn.close()
    for fmt in ("--table", "--csv", "--json"):
        out = ingest_sql(seeded, "SELECT error FROM keepa_calls", fmt).stdout
        assert "SECRETKEY123" not in out and "key=<redacted>" in out
