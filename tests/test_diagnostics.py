"""`ingest diagnose stall|asin`, `ingest deals stats|rejections`, and the v004 views, from
database states built row by row."""

import json
import os
import sqlite3
import time
from collections import namedtuple
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

from ingest import diagnostics
from ingest.analytics import AnalyticsParams
from ingest.asin_report import UnknownAsin, explain_stored, render
from ingest.cli import main
from ingest.deals import compress_product, progress_rows
from ingest.diagnostics import (Environment, check_cursor, check_disk, check_integrity, check_sqlite_version,
                                check_token_trend, diagnose_stall)
from ingest.funnel import BadDuration, deal_stats, parse_duration, rejections
from ingest.verdicts import make_context
from ingest.keepatime import unix_seconds_to_keepa_minutes
from ingest.store import open_db

from .keepa_stub import KeepaStub, Reply, envelope
from .test_analytics import NOW as PRODUCT_NOW
from .test_analytics import one_sale
from .test_health import NOW, RUNNING, clock, conn, healthy_state, put_call, put_checkpoint  # noqa: F401

Usage = namedtuple("Usage", "total used free")
GIB = 2**30


def ctx(conn, **kw):
    return make_context(conn, now=NOW, supervisor=RUNNING, clock=clock(), **kw)


# ------------------------------------------------------------------ environment checks


@pytest.mark.parametrize("version, verdict", [("3.40.1", "warn"), ("3.51.2", "warn"), ("3.51.3", "ok"),
                                              ("3.52.0", "ok"), ("4.0.0", "ok")])
def test_sqlite_version_below_3_51_3_warns(version, verdict):
    check = check_sqlite_version(Environment(None, sqlite_version=version))
    assert check.verdict == verdict
    if verdict == "warn":
        assert "3.51.3" in check.summary and check.next_step


def test_this_machines_sqlite_is_judged_by_its_real_version():
    old = tuple(map(int, sqlite3.sqlite_version.split("."))) < (3, 51, 3)
    assert check_sqlite_version(Environment(None)).verdict == ("warn" if old else "ok")


@pytest.mark.parametrize("free, verdict", [(50 * GIB, "ok"), (int(0.5 * GIB), "warn"), (50 * 2**20, "fail")])
def test_disk_verdicts(tmp_path, free, verdict):
    env = Environment(tmp_path / "x.db", disk_usage=lambda _: Usage(100 * GIB, 100 * GIB - free, free))
    assert check_disk(env).verdict == verdict


def test_disk_warns_below_five_percent_of_a_big_disk(tmp_path):
    env = Environment(tmp_path / "x.db", disk_usage=lambda _: Usage(1000 * GIB, 960 * GIB, 40 * GIB))
    assert check_disk(env).verdict == "warn"


def test_integrity_ok_then_fails_on_a_damaged_file(db_path, conn):
    env = Environment(db_path)
    assert check_integrity(conn, env).verdict == "ok"
    conn.execute("CREATE TABLE filler (x TEXT)")
    conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,) for _ in range(400)])
    conn.execute("CREATE INDEX filler_x ON filler (x)")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = os.path.getsize(db_path)
    with open(db_path, "r+b") as f:  # scribble over pages in the middle of the file
        f.seek(size // 2)
        f.write(os.urandom(8192))
    damaged = sqlite3.connect(db_path)
    check = check_integrity(damaged, env)
    damaged.close()
    assert check.verdict == "fail" and check.summary.startswith("PRAGMA integrity_check:")
    assert ".recover" in check.next_step


def test_big_files_get_quick_check(db_path, conn, monkeypatch):
    monkeypatch.setattr(diagnostics, "QUICK_CHECK_ABOVE_BYTES", 0)
    check = check_integrity(conn, Environment(db_path))
    assert check.verdict == "ok" and check.data["pragma"] == "quick_check"


# ------------------------------------------------------------------ token trend, cursor


def test_token_trend_buckets_the_last_hour(conn):
    put_call(conn, age=50 * 60, actual=10, tokens_left=200)
    put_call(conn, age=5 * 60, actual=7, tokens_left=120)
    put_call(conn, age=2 * 3600, actual=1000)  # outside the hour
    check = check_token_trend(ctx(conn))
    assert check.verdict == "ok" and check.data["spent"] == 17
    assert [b["spent"] for b in check.data["buckets"]] == [0, 10, 0, 0, 0, 7]  # 50 min ago: second 10-minute bucket
    assert "balance 200 -> 120" in check.summary


def test_token_trend_warns_when_the_balance_stays_negative(conn):
    for age in (500, 300, 60):
        put_call(conn, age=age, actual=5, tokens_left=-30)
    check = check_token_trend(ctx(conn))
    assert check.verdict == "warn" and "stayed negative" in check.summary
    put_call(conn, age=10, actual=5, tokens_left=4)
    assert check_token_trend(ctx(conn)).verdict == "ok"


def upsert_mark(age_min=1, next_poll_in=30, watermark_age_min=3):
    return {"watermark": unix_seconds_to_keepa_minutes(NOW - watermark_age_min * 60), "at_watermark": [],
            "pending": [], "next_poll_at": NOW + next_poll_in}


def test_cursor_ok_when_both_move(conn):
    put_checkpoint(conn, "backfill", {"pass": 2, "page": 7, "pending": [{"asin": "a"}], "next_pass_at": None}, age=20)
    put_checkpoint(conn, "upsert", upsert_mark(), age=40)
    check = check_cursor(ctx(conn))
    assert check.verdict == "ok", check.summary
    assert check.data["backfill"]["pending"] == 1 and 180 <= check.data["upsert"]["watermark_lag"] < 240


def test_cursor_stuck_warns(conn):
    put_checkpoint(conn, "backfill", {"pass": 2, "page": 7, "pending": None, "next_pass_at": None}, age=25 * 60)
    put_checkpoint(conn, "upsert", upsert_mark(next_poll_in=-20 * 60), age=21 * 60)
    check = check_cursor(ctx(conn))
    assert check.verdict == "warn"
    assert "backfill cursor (pass 2 page 7) has not moved for 25m" in check.summary
    assert "next poll overdue by 20m" in check.summary


def test_cursor_between_passes_is_fine(conn):
    put_checkpoint(conn, "backfill", {"pass": 3, "page": 0, "pending": None, "next_pass_at": NOW + 300}, age=3600)
    put_checkpoint(conn, "upsert", upsert_mark(), age=10)
    assert check_cursor(ctx(conn)).verdict == "ok"


def test_no_checkpoints_warn(conn):
    assert check_cursor(ctx(conn)).verdict == "warn"


def test_diagnose_stall_runs_every_check(conn, db_path):
    healthy_state(conn)
    put_checkpoint(conn, "backfill", {"pass": 1, "page": 3, "pending": None}, age=20)
    put_checkpoint(conn, "upsert", upsert_mark(), age=20)
    env = Environment(db_path, sqlite_version="3.51.3", disk_usage=lambda _: Usage(100 * GIB, 0, 100 * GIB))
    result = diagnose_stall(conn, db_path, now=NOW, supervisor=RUNNING, env=env, clock=clock())
    assert [c.name for c in result.checks] == [
        "database", "supervisor", "leases", "heartbeats", "subscription", "progress", "last_fetch", "tokens", "rate_limits",
        "restarts", "space", "backups", "token_trend", "cursor", "sqlite_version", "disk", "integrity"]
    assert result.verdict == "healthy", result.problems
    old_sqlite = Environment(db_path, sqlite_version="3.40.1", disk_usage=env.disk_usage)
    degraded = diagnose_stall(conn, db_path, now=NOW, supervisor=RUNNING, env=old_sqlite, clock=clock())
    assert degraded.verdict == "degraded" and degraded.problems[0].startswith("sqlite_version:")


# ------------------------------------------------------------------ CLI: stall


def test_cli_stall_json_and_exit_code(db_path):
    open_db(db_path).close()  # a new, empty database (a missing one is reported unusable)
    result = CliRunner().invoke(main, ["--db", str(db_path), "diagnose", "stall", "--json",
                                       "--supervisor-conf", str(db_path.parent / "none.conf")])
    payload = json.loads(result.output)
    assert result.exit_code == 2 and payload["verdict"] == "down"  # nothing running: down
    names = {c["name"] for c in payload["checks"]}
    assert {"sqlite_version", "disk", "integrity", "cursor", "token_trend", "leases"} <= names
    assert all(c["verdict"] == "ok" or c["next_step"] for c in payload["checks"])


def test_cli_stall_on_a_file_that_is_not_a_database(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 200)
    result = CliRunner().invoke(main, ["--db", str(bad), "diagnose", "stall"])
    assert result.exit_code == 2
    assert "FAIL  database" in result.output and "not an SQLite database" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ funnel


def put_decision(conn, asin, outcome, reason, age):
    conn.execute("INSERT INTO decisions (at, worker, asin, outcome, reason, fence) VALUES (?, 'backfill', ?, ?, ?, 1)",
                 (NOW - age, asin, outcome, reason))


def put_deal(conn, asin, status="rejected", reason="no_sales", seen_age=60, avg=None, title="T"):
    conn.execute(
        "INSERT OR REPLACE INTO deals (asin, title, status, reason, one_year_avg_cents, first_seen, last_seen,"
        " last_fetched, source, fence, writer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'backfill', 1, 'backfill')",
        (asin, title, status, reason, avg, NOW - seen_age, NOW - seen_age, NOW - seen_age),
    )


@pytest.fixture
def funnel_state(conn):
    rows = [("A1", "accepted", "ok", 600), ("A2", "accepted", "ok", 1200), ("R1", "rejected", "no_sales", 300),
            ("R2", "rejected", "not_below_average", 900), ("R3", "rejected", "not_below_average", 1500),
            ("I1", "incomplete", "no_history", 100), ("I1", "incomplete", "no_history", 200),
            ("I2", "incomplete", "not_returned", 400), ("X1", "removed", "unseen_72h", 50),
            ("OLD", "rejected", "too_new", 3 * 3600)]
    for asin, outcome, reason, age in rows:
        put_decision(conn, asin, outcome, reason, age)
        if outcome != "removed":
            put_deal(conn, asin, outcome, reason, seen_age=age)
    return conn


def test_deal_stats_keeps_incomplete_apart_from_rejections(funnel_state):
    stats = deal_stats(funnel_state, NOW, 3600)
    assert stats["accepted"] == 2
    assert stats["rejected"] == 3 and stats["rejected_by_reason"] == {"not_below_average": 2, "no_sales": 1}
    assert stats["incomplete"] == 3 and stats["incomplete_by_cause"] == {"no_history": 2, "not_returned": 1}
    assert "no_history" not in stats["rejected_by_reason"]
    assert stats["evaluations"] == 8 and stats["evaluated"] == 7
    assert stats["removed"] == 1
    assert stats["accepted_pct_of_complete"] == 40.0
    assert stats["per_hour"]["rejected"] == 3.0
    assert stats["seen"] == 7  # OLD was last seen 3 h ago
    assert stats["current"]["rejected"]["total"] == 4
    two_hours = deal_stats(funnel_state, NOW, 7200)
    assert two_hours["per_hour"]["rejected"] == 1.5


def test_rejections_since_window(funnel_state):
    report = rejections(funnel_state, NOW, 30 * 60)
    assert report["rejected_by_reason"] == {"not_below_average": 2, "no_sales": 1}
    assert report["incomplete_by_cause"] == {"no_history": 2, "not_returned": 1}
    assert [r["asin"] for r in report["latest"]] == ["I1", "I1", "R1", "I2", "R2", "R3"]  # newest first
    assert rejections(funnel_state, NOW, 4 * 3600)["rejected_by_reason"]["too_new"] == 1


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("1h", 3600), ("2d", 172800), ("90s", 90),
                                           ("1.5h", 5400), ("1w", 604800), (" 2H ", 7200)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "h", "1y", "-1h", "0m", "1h30m"])
def test_parse_duration_refuses(text):
    with pytest.raises(BadDuration):
        parse_duration(text)


def test_cli_deals_stats_and_rejections(db_path):
    c = open_db(db_path)
    now = time.time()
    for asin, outcome, reason in [("A", "accepted", "ok"), ("B", "rejected", "no_sales"),
                                  ("C", "incomplete", "no_history")]:
        c.execute("INSERT INTO decisions (at, worker, asin, outcome, reason, fence) VALUES (?, 'upsert', ?, ?, ?, 1)",
                  (now - 60, asin, outcome, reason))
    c.close()
    runner = CliRunner()
    stats = runner.invoke(main, ["--db", str(db_path), "deals", "stats", "--since", "1h", "--json"])
    assert stats.exit_code == 0, stats.output
    payload = json.loads(stats.output)
    assert (payload["accepted"], payload["rejected"], payload["incomplete"]) == (1, 1, 1)
    text = runner.invoke(main, ["--db", str(db_path), "deals", "rejections", "--since", "30m"])
    assert text.exit_code == 0
    assert "rejected in the last 30m: 1" in text.output and "no_sales" in text.output
    assert "not rejections" in text.output and "no_history" in text.output
    bad = runner.invoke(main, ["--db", str(db_path), "deals", "rejections", "--since", "soon"])
    assert bad.exit_code == 2 and "not a duration" in bad.output


# ------------------------------------------------------------------ diagnose asin


def store_product(conn, product, status="rejected", reason="not_below_average", avg=None):
    fetched = PRODUCT_NOW.timestamp()
    conn.execute(
        "INSERT INTO deals (asin, title, status, reason, one_year_avg_cents, first_seen, last_seen, last_fetched,"
        " source, fence, writer) VALUES (?, 'A book', ?, ?, ?, ?, ?, ?, 'backfill', 1, 'backfill')",
        (product["asin"], status, reason, avg, fetched, fetched, fetched),
    )
    conn.execute("INSERT INTO product_history (asin, fetched_at, product_z) VALUES (?, ?, ?)",
                 (product["asin"], fetched, compress_product(product)))
    conn.execute("INSERT INTO decisions (at, worker, asin, outcome, reason, one_year_avg_cents, fence)"
                 " VALUES (?, 'backfill', ?, ?, ?, ?, 1)", (fetched, product["asin"], status, reason, avg))


def test_explain_stored_reproduces_the_stored_decision(conn):
    product = one_sale(days_ago=100, price=1500)   # used price now 2000: not below the 1500 average
    store_product(conn, product, avg=1500)
    report = explain_stored(conn, product["asin"], AnalyticsParams())
    assert report["tokens"] == 0 and report["source"] == "stored"
    steps = report["steps"]
    assert [s["price_cents"] for s in steps["sales"]] == [1500]
    assert steps["sales"][0]["time"].startswith("2024-02-22")  # 100 days before 2024-06-01
    assert steps["result"]["value_cents"] == 1500 and steps["result"]["reason"] == "ok"
    assert steps["evaluation"]["reason"] == "not_below_average"
    assert report["comparison"]["matches"] is True
    text = "\n".join(render(report))
    assert "2. sales inferred: 1 (1 in the window" in text
    assert "4. 1yr average: $15.00 (ok, median of 1 sale(s))" in text
    assert "5. decision: rejected (not_below_average)" in text


def test_explain_stored_flags_a_changed_outcome(conn):
    product = one_sale()
    store_product(conn, product, status="accepted", reason="ok", avg=1500)  # stored under other rules
    report = explain_stored(conn, product["asin"], AnalyticsParams())
    assert report["comparison"]["matches"] is False
    assert "differs from the stored outcome" in "\n".join(render(report))


def test_unknown_asin_and_missing_history_are_one_line_exit_1(db_path):
    c = open_db(db_path)
    put_deal(c, "B0NOHISTRY", status="incomplete", reason="not_returned")
    c.close()
    runner = CliRunner()
    unknown = runner.invoke(main, ["--db", str(db_path), "diagnose", "asin", "B0UNKNOWN1"])
    assert unknown.exit_code == 1
    assert unknown.output.strip() == "ingest: error: B0UNKNOWN1: unknown ASIN (not in the deals table)"
    no_history = runner.invoke(main, ["--db", str(db_path), "diagnose", "asin", "b0nohistry"])
    assert no_history.exit_code == 1 and len(no_history.output.strip().splitlines()) == 1
    assert "no stored history (incomplete: not_returned)" in no_history.output and "--fetch" in no_history.output
    with pytest.raises(UnknownAsin):
        explain_stored(open_db(db_path), "B0UNKNOWN1", AnalyticsParams())


def test_cli_diagnose_asin_json_costs_nothing(db_path):
    c = open_db(db_path)
    store_product(c, one_sale(), avg=1500)
    c.close()
    result = CliRunner().invoke(main, ["--db", str(db_path), "diagnose", "asin", "0000000001", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["tokens"] == 0 and payload["steps"]["result"]["value_cents"] == 1500
    assert open_db(db_path).execute("SELECT count(*) FROM keepa_calls").fetchone()[0] == 0


def test_cli_diagnose_asin_fetch_goes_through_the_ledger_and_shows_cost(db_path, monkeypatch):
    open_db(db_path).close()  # a new, empty database (a missing one is exit 4)
    product = one_sale()
    with KeepaStub() as stub:
        stub.script("product", Reply(200, {"products": [product], **envelope(tokensConsumed=1, tokensLeft=99)}))
        monkeypatch.setenv("KEEPA_API_KEY", "secret-key-123")
        monkeypatch.setenv("KEEPA_BASE_URL", stub.url)
        result = CliRunner().invoke(main, ["--db", str(db_path), "diagnose", "asin", "0000000001", "--fetch"])
    assert result.exit_code == 0, result.output
    assert "source: fetched now: 1 tokens (estimated 1, 99 left)" in result.output
    assert "secret-key-123" not in result.output
    calls = open_db(db_path).execute("SELECT worker, endpoint, actual FROM keepa_calls WHERE endpoint = 'product'")
    assert [tuple(r) for r in calls] == [("diagnose", "product", 1)]


# ------------------------------------------------------------------ views


def test_views_answer_from_constructed_rows(db_path):
    c = open_db(db_path)
    now = time.time()
    c.execute("INSERT INTO leases (name, holder_host, holder_boot, holder_pidns, holder_pid, holder_nonce, fence,"
              " ttl_s, acquired_at, renewed_at, expires_at, renewed_mono, transitions)"
              " VALUES ('backfill', 'h', 'b', 'p', 42, 'n', 3, 30.0, ?, ?, ?, 1.0, 3)", (now - 600, now - 100, now - 70))
    c.execute("INSERT INTO lease_events (name, at, event, fence, holder) VALUES ('backfill', ?, 'acquired', 3, 'h')",
              (now - 600,))
    for age, status, actual in [(120, "ok", 5), (60, "rate_limited", 0), (30, "transient", None)]:
        c.execute("INSERT INTO keepa_calls (at, worker, endpoint, estimated, actual, status, tokens_left)"
                  " VALUES (?, 'upsert', 'deal', 5, ?, ?, 10)", (now - age, actual, status))
    for asin, outcome, reason in [("A", "accepted", "ok"), ("B", "rejected", "no_sales"),
                                  ("C", "incomplete", "no_history"), ("D", "rejected", "no_sales")]:
        c.execute("INSERT INTO decisions (at, worker, asin, outcome, reason, fence) VALUES (?, 'w', ?, ?, ?, 1)",
                  (now - 5, asin, outcome, reason))
    lease = dict(c.execute("SELECT * FROM lease_health").fetchone())
    assert (lease["state"], lease["fence"], lease["acquisitions_last_hour"]) == ("expired", 3, 1)
    assert 99 <= lease["heartbeat_age_s"] <= 110
    c.execute("INSERT INTO leases (name, fence, ttl_s, acquired_at, renewed_at) VALUES ('upsert', 2, 30.0, ?, ?)",
              (now - 900, now - 800))  # released: the old times stay in the row
    free = dict(c.execute("SELECT * FROM lease_health WHERE name = 'upsert'").fetchone())
    assert (free["state"], free["holder"], free["heartbeat_age_s"], free["held_for_s"]) == ("free", None, None, None)
    flow = [dict(r) for r in c.execute("SELECT * FROM token_flow_hourly")]
    assert sum(r["calls"] for r in flow) == 3 and sum(r["tokens_spent"] for r in flow) == 5
    assert sum(r["rate_limited"] for r in flow) == 1 and sum(r["errors"] for r in flow) == 1
    rej = {(r["outcome"], r["reason"]): r["decisions"] for r in c.execute("SELECT * FROM rejections_hourly")}
    assert rej == {("rejected", "no_sales"): 2, ("incomplete", "no_history"): 1}
    funnel = [dict(r) for r in c.execute("SELECT * FROM funnel")]
    assert sum(r["accepted"] for r in funnel) == 1 and sum(r["incomplete"] for r in funnel) == 1
    c.execute("INSERT INTO checkpoints (name, value, updated_at, fence) VALUES ('upsert', ?, ?, 1)",
              (json.dumps({"watermark": unix_seconds_to_keepa_minutes(now - 600), "pending": [1, 2]}), now - 5))
    mark = dict(c.execute("SELECT * FROM checkpoint_progress WHERE name = 'upsert'").fetchone())
    assert mark["pending"] == 2 and 600 <= mark["watermark_lag_s"] <= 680
    for view in ("deal_freshness", "worker_activity"):
        c.execute(f"SELECT * FROM {view}").fetchall()


def test_worker_activity_counts_tokens_from_the_call_log(db_path):
    """Workers no longer count tokens in worker_progress: the view reads the call log's totals."""
    c = open_db(db_path)
    c.execute("INSERT INTO worker_progress (worker, state, updated_at) VALUES ('backfill', 'working', ?)",
              (time.time(),))
    for actual in (5, 7, None):
        put_call(c, age=10, actual=actual)
    put_call(c, age=10, actual=100, worker="upsert")
    row = dict(c.execute("SELECT * FROM worker_activity WHERE worker = 'backfill'").fetchone())
    assert row["tokens_spent"] == 12
    assert [p["tokens_spent"] for p in progress_rows(c)] == [12]
