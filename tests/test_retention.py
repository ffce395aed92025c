"""Retention: old history pruned in small batches, each ASIN's latest decision kept, recent lease
history un-deletable, freed pages returned to the disk; `ingest db stats`."""

import json
import os
import sqlite3
import time
from contextlib import contextmanager

import pytest
from click.testing import CliRunner

from ingest.backends.sqlite import SQLITE

from ingest.cli import main
from ingest.dbstats import days_until_full, net_growth
from ingest.retention import RetentionSettings, batch_sql, prune, targets, unfenced
from ingest.settings import load_settings
from ingest.store import open_db

from .workers_support import scalar, start_worker, stop, wait_for, worker_env, write_config

DAY = 86400.0
NOW = time.time()


def _decision(conn, at, asin, outcome="accepted"):
    conn.execute("INSERT INTO decisions (at, worker, asin, outcome, reason, fence) VALUES (?, 'upsert', ?, ?, 'ok', 1)",
                 (at, asin, outcome))


def _lease_event(conn, at):
    conn.execute("INSERT INTO lease_events (name, at, event, fence, holder) VALUES ('upsert', ?, 'acquired', 1, 'h')",
                 (at,))


def counting(conn):
    """An unfenced Commit that records how many rows each write transaction deleted."""
    sizes = []
    base = unfenced(conn)

    @contextmanager
    def commit(what, source):
        before = conn.total_changes
        with base(what, source) as pair:
            yield pair
        sizes.append(conn.total_changes - before)

    return commit, sizes


def test_settings_are_validated_with_one_line():
    with pytest.raises(Exception, match=r"\[retention\] decisions_days must be at least 1"):
        load_settings({"retention": {"decisions_days": 0}})
    with pytest.raises(Exception, match=r"did you mean batch_rows"):
        load_settings({"retention": {"batch_row": 10}})
    assert load_settings({})["retention"] == RetentionSettings()


def test_old_decisions_go_but_each_asins_latest_stays(db_path):
    conn = open_db(db_path)
    for i in range(30):
        _decision(conn, NOW - 20 * DAY + i, "OLDONLY001")   # all old: the newest of them stays
        _decision(conn, NOW - 20 * DAY + i, "MIXED00001")   # old ones go: a recent one exists
    _decision(conn, NOW - DAY, "MIXED00001")
    _decision(conn, NOW - 3 * DAY, "RECENT0001")
    report = prune(conn, unfenced(conn), NOW, RetentionSettings(decisions_days=7), 30)
    left = conn.execute("SELECT asin, at FROM decisions ORDER BY id").fetchall()
    assert [tuple(r) for r in left] == [("OLDONLY001", NOW - 20 * DAY + 29), ("MIXED00001", NOW - DAY),
                                         ("RECENT0001", NOW - 3 * DAY)]
    assert report.deleted == {"decisions": 59}


def test_pruning_goes_in_small_transactions(db_path):
    conn = open_db(db_path)
    conn.executemany("INSERT INTO fenced_commits (lease, fence, at, pid, what) VALUES ('upsert', 1, ?, 1, 'x')",
                     [(NOW - 30 * DAY + i,) for i in range(1050)] + [(NOW,)] * 5)
    commit, sizes = counting(conn)
    report = prune(conn, commit, NOW, RetentionSettings(batch_rows=100), 30)
    assert report.deleted == {"fenced_commits": 1050}
    assert max(sizes) <= 100 and len(sizes) == 11
    assert conn.execute("SELECT count(*) FROM fenced_commits").fetchone()[0] == 5


def test_lease_history_is_never_editable_and_recent_history_never_deletable(db_path):
    conn = open_db(db_path)
    for at in (NOW - 40 * DAY, NOW - 35 * DAY, NOW - 2 * 3600):
        _lease_event(conn, at)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE lease_events SET event = 'released'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM lease_events WHERE at > ?", (NOW - DAY,))
    # a retention of 1 day with a clock far ahead still cannot touch the last day's rows
    report = prune(conn, unfenced(conn), NOW + 100 * DAY, RetentionSettings(lease_events_days=1), 3650)
    assert report.deleted.get("lease_events") == 2
    assert conn.execute("SELECT count(*) FROM lease_events").fetchone()[0] == 1


def test_call_log_uses_the_ledger_setting_and_other_branches_tables_only_when_present(db_path):
    conn = open_db(db_path)
    conn.executemany("INSERT INTO keepa_calls (at, worker, endpoint, status) VALUES (?, 'u', 'product', 'ok')",
                     [(NOW - 10 * DAY,), (NOW - DAY,)])
    report = prune(conn, unfenced(conn), NOW, RetentionSettings(), call_log_days=5)
    assert report.deleted == {"keepa_calls": 1}
    names = {t.table for t in targets(RetentionSettings(), 30, {"decisions", "alerts"}, SQLITE.now_sql)}
    assert names == {"decisions", "alerts"}
    assert "EXISTS" in batch_sql(targets(RetentionSettings(), 30, {"decisions"}, SQLITE.now_sql)[0])


def test_the_file_shrinks_after_pruning(db_path):
    conn = open_db(db_path)
    conn.executemany("INSERT INTO decisions (at, worker, asin, outcome, reason, fence) VALUES (?, 'u', ?, 'rejected', ?, 1)",
                     [(NOW - 30 * DAY, f"B{i % 2000:09d}", "x" * 200) for i in range(40_000)])
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    big = os.path.getsize(db_path)
    report = prune(conn, unfenced(conn), NOW, RetentionSettings(batch_rows=5000), 30)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    small = os.path.getsize(db_path)
    assert report.deleted["decisions"] == 38_000 and report.pages_freed > 0
    assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    assert small < big / 3, (big, small)


def test_growth_projection_is_net_of_what_retention_removes():
    per_row = {"decisions": 100.0, "deals": 5000.0}
    assert net_growth({"decisions": 1000, "deals": 10}, {"decisions": 1000, "deals": 4}, per_row) == 6 * 5000
    assert days_until_full(10**6, 1000.0) == 1000
    assert days_until_full(10**6, -5.0) is None and days_until_full(None, 1.0) is None


def test_db_stats_shows_tables_indexes_growth_and_days_until_full(db_path):
    conn = open_db(db_path)
    for i in range(200):
        _decision(conn, NOW - 3600, f"C{i:09d}")
    conn.close()
    result = CliRunner().invoke(main, ["--db", str(db_path), "db", "stats", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    objects = {o["name"]: o for o in stats["objects"]}
    assert objects["decisions"]["rows"] == 200 and objects["decisions"]["bytes"] > 0
    assert objects["decisions_asin"]["kind"] == "index" and objects["decisions_asin"]["table"] == "decisions"
    assert stats["auto_vacuum"] == "incremental" and stats["disk_free"] > 0
    assert stats["growth_rows"]["decisions"] == 200 and stats["growth_bytes_per_day"] > 0
    assert stats["days_until_full"] > 0
    text = CliRunner().invoke(main, ["--db", str(db_path), "db", "stats"])
    assert text.exit_code == 0 and "growth" in text.output and "disk full in" in text.output


@pytest.mark.slow
def test_the_upsert_worker_prunes_in_its_maintenance_step(tmp_path, db_path):
    from ingest.simulator import SimConfig, Simulator

    conn = open_db(db_path)
    for i in range(500):
        _decision(conn, NOW - 30 * DAY, f"D{i:09d}")
        _decision(conn, NOW - 29 * DAY, f"D{i:09d}")
    conn.close()
    sim = Simulator(SimConfig(port=0, refill_rate=600, seed=3, products=500)).start()
    log = tmp_path / "upsert.log"
    proc = None
    try:
        env = worker_env(sim.url, db_path, write_config(tmp_path, "\n[retention]\nbatch_rows = 100\n"))
        proc = start_worker("upsert", env, log=log)
        wait_for(lambda: "retention: deleted" in log.read_text() or proc.poll() is not None, 60, 0.2, "retention")
    finally:
        if proc is not None:
            stop(proc)
        sim.stop()
    assert "retention: deleted 500 decisions" in log.read_text(), log.read_text()[-2000:]
    assert scalar(db_path, "SELECT count(*) FROM decisions WHERE at < ?", NOW - 29.5 * DAY) == 0
    assert scalar(db_path, "SELECT count(*) FROM fenced_commits WHERE what = 'retention'") == 5  # 5 batches, fenced
