"""Backups, restore and vacuum: real files, real worker processes writing meanwhile, the CLI."""

import os
import sqlite3
import stat
import subprocess
import time

import pytest
from click.testing import CliRunner

from ingest.backup import (BackupError, BackupSettings, LastBackup, backup_name, beyond_keep, check_copy,
                           is_due, last_backup, restore, scheduled_backup, take_backup)
from ingest.cli import main
from ingest.simulator import SimConfig, Simulator
from ingest.store import connect, latest_version, open_db

from .conftest import INGEST
from .workers_support import scalar, start_worker, stop, wait_for, worker_env, write_config

DAY = 86400.0


def _integrity(path) -> list:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def _cli(db_path, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([INGEST, "--db", str(db_path), *args], capture_output=True, text=True, timeout=120, env=env)


# ---------------------------------------------------------------- pure rules


def test_backup_names_sort_by_utc_time_and_keep_prunes_only_ours():
    names = [backup_name(1_700_000_000 + i * 3600) for i in range(4)]
    assert names == sorted(names) and names[0] == "ingest-20231114T221320Z.db"
    assert beyond_keep(names + ["notes.txt", "ingest.db"], 2) == names[:2]
    assert beyond_keep(names[:1], 3) == []


def test_a_scheduled_backup_is_due_only_when_scheduling_is_on_and_the_last_is_old():
    on = BackupSettings(every_h=6)
    assert not is_due(None, 0, BackupSettings())  # every_h = 0: never
    assert is_due(None, 0, on)
    assert not is_due(LastBackup(1000.0, "x", 1, True), 1000 + 5.9 * 3600, on)
    assert is_due(LastBackup(1000.0, "x", 1, True), 1000 + 6 * 3600, on)


def test_backup_settings_are_validated(tmp_path):
    (tmp_path / "ingest.toml").write_text("[backup]\nevery_h = -1\n")
    result = CliRunner().invoke(main, ["--db", str(tmp_path / "x.db"), "db", "backup"])
    assert result.exit_code == 3 and "[backup] every_h must be at least 0" in result.output
    (tmp_path / "ingest.toml").write_text("[backup]\nkeeps = 3\n")
    result = CliRunner().invoke(main, ["--db", str(tmp_path / "x.db"), "db", "backup"])
    assert result.exit_code == 3 and "did you mean keep" in result.output


# ---------------------------------------------------------------- backups of a quiet file


def _filled(db_path, n=50):
    conn = open_db(db_path)
    conn.executemany("INSERT INTO keepa_calls (at, worker, endpoint, status) VALUES (?, 'upsert', 'product', 'ok')",
                     [(1000.0 + i,) for i in range(n)])
    return conn


def test_backup_is_checked_private_recorded_and_keep_prunes_the_oldest(db_path):
    conn = _filled(db_path)
    folder = db_path.parent / "backups"
    results = [take_backup(db_path, keep=2, now=1_700_000_000 + i * 60) for i in range(4)]
    assert sorted(os.listdir(folder)) == [results[2].path.name, results[3].path.name]
    assert results[3].pruned == [results[1].path.name]
    for r in results[2:]:
        assert stat.S_IMODE(r.path.stat().st_mode) == 0o600
        assert check_copy(r.path) == latest_version()
        copy = sqlite3.connect(r.path)
        assert copy.execute("SELECT count(*) FROM keepa_calls").fetchone()[0] == 50
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # self-contained: one file
        copy.close()
    assert not [n for n in os.listdir(folder) if n.startswith(".")]  # no temporary left behind
    last = last_backup(conn)
    assert last.ok and last.path == str(results[3].path) and last.bytes == results[3].bytes


def test_a_failed_backup_leaves_nothing_and_is_recorded(db_path, tmp_path):
    conn = _filled(db_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(BackupError, match="cannot write"):
        take_backup(db_path, str(blocker / "b.db"))
    assert last_backup(conn).ok is False
    assert last_backup(conn, ok_only=True) is None


def test_backup_refuses_to_overwrite(db_path, tmp_path):
    _filled(db_path)
    take_backup(db_path, str(tmp_path / "b.db"))
    result = _cli(db_path, "db", "backup", str(tmp_path / "b.db"))
    assert result.returncode == 1 and "already exists" in result.stderr and len(result.stderr.splitlines()) == 1


def test_scheduled_backup_runs_when_due_and_prunes(db_path):
    conn = _filled(db_path)
    settings = BackupSettings(every_h=1, keep=2)
    t = 1_700_000_000.0
    assert scheduled_backup(db_path, conn, t, settings) is not None
    assert scheduled_backup(db_path, conn, t + 1800, settings) is None  # not due yet
    assert scheduled_backup(db_path, conn, t + 3600, settings) is not None
    assert scheduled_backup(db_path, conn, t + 7200, settings) is not None
    assert len(os.listdir(db_path.parent / "backups")) == 2


# ---------------------------------------------------------------- while both workers write


@pytest.fixture
def sim():
    simulator = Simulator(SimConfig(port=0, refill_rate=600, seed=5, products=3000))
    simulator.start()
    yield simulator
    simulator.stop()


@pytest.mark.slow
def test_backup_while_both_workers_write_and_restore_refused_while_they_hold_leases(sim, tmp_path, db_path):
    config = write_config(tmp_path, "\n[backup]\nevery_h = 0.0005\nkeep = 3\n")  # ~2 s: the upsert worker's schedule
    env = worker_env(sim.url, db_path, config)
    logs = {w: tmp_path / f"{w}.log" for w in ("backfill", "upsert")}
    procs = {w: start_worker(w, env, log=logs[w]) for w in logs}
    try:
        wait_for(lambda: (scalar(db_path, "SELECT count(*) FROM fenced_commits WHERE lease = 'backfill'") or 0) >= 3
                 and (scalar(db_path, "SELECT count(*) FROM fenced_commits WHERE lease = 'upsert'") or 0) >= 1,
                 60, 0.2, "both workers committing")
        backups = []
        for i in range(3):  # while both write
            dest = tmp_path / "manual" / f"b{i}.db"
            result = _cli(db_path, "db", "backup", str(dest), env=env)
            assert result.returncode == 0, result.stderr
            backups.append(dest)
            time.sleep(0.3)
        for b in backups:
            assert _integrity(b) == [("ok",)]
            assert stat.S_IMODE(b.stat().st_mode) == 0o600
            stats = _cli(b, "deals", "stats", env=env)
            assert stats.returncode == 0, stats.stderr
        assert scalar(backups[-1], "SELECT count(*) FROM deals") > 0

        # the upsert worker's scheduled backups, pruned to `keep`
        folder = db_path.parent / "backups"
        wait_for(lambda: folder.exists() and len([n for n in os.listdir(folder) if n.endswith(".db")]) >= 2,
                 60, 0.2, "scheduled backups")
        status = _cli(db_path, "status", env=env)
        assert "backups      last backup" in status.stdout, status.stdout

        # restore is refused while the workers hold their leases: one line naming them
        before = db_path.stat().st_ino
        refused = _cli(db_path, "db", "restore", str(backups[0]), env=env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "restore refused" in refused.stderr and "backfill held by" in refused.stderr
        assert "upsert held by" in refused.stderr and "--force" in refused.stderr
        assert db_path.stat().st_ino == before
        for w, p in procs.items():
            assert p.poll() is None, logs[w].read_text()[-2000:]
    finally:
        for p in procs.values():
            stop(p)
    for w, p in procs.items():
        assert p.returncode == 0, logs[w].read_text()[-2000:]
        assert "Traceback" not in logs[w].read_text()
    assert len([n for n in os.listdir(db_path.parent / "backups") if n.endswith(".db")]) <= 3

    # stopped: the restore goes through, keeps the replaced file, and the data is the backup's
    deals_now = scalar(db_path, "SELECT count(*) FROM deals")
    deals_then = scalar(backups[0], "SELECT count(*) FROM deals")
    result = _cli(db_path, "db", "restore", str(backups[0]), env=env)
    assert result.returncode == 0, result.stderr
    kept = [p for p in db_path.parent.iterdir() if p.name.startswith("ingest.db.replaced-")]
    assert len(kept) == 1 and scalar(kept[0], "SELECT count(*) FROM deals") == deals_now
    assert scalar(db_path, "SELECT count(*) FROM deals") == deals_then
    assert _integrity(db_path) == [("ok",)]
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


# ---------------------------------------------------------------- restore


def test_restore_checks_its_source_first_and_changes_nothing_on_a_bad_one(db_path, tmp_path):
    conn = _filled(db_path)
    conn.close()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)")
    size = db_path.stat().st_size
    for bad, why in ((garbage, "not a usable SQLite database"), (other, "not an ingest database"),
                     (tmp_path / "missing.db", "does not exist")):
        result = _cli(db_path, "db", "restore", str(bad))
        assert result.returncode == 1 and why in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert db_path.stat().st_size == size
    assert not [p for p in db_path.parent.iterdir() if "replaced" in p.name]
    assert scalar(db_path, "SELECT count(*) FROM keepa_calls") == 50


def test_restore_drops_the_replaced_files_wal(db_path, tmp_path):
    """Rows still in the old file's WAL must not be applied to the restored file."""
    conn = _filled(db_path, 5)
    backup = take_backup(db_path, str(tmp_path / "b.db")).path
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.executemany("INSERT INTO keepa_calls (at, worker, endpoint, status) VALUES (?, 'x', 'deal', 'ok')",
                     [(2000.0 + i,) for i in range(100)])  # in the WAL only
    conn.close()
    result = restore(db_path, backup, now=1_700_000_000)
    assert scalar(db_path, "SELECT count(*) FROM keepa_calls") == 5
    assert scalar(result.kept, "SELECT count(*) FROM keepa_calls") == 105
    assert _integrity(db_path) == [("ok",)]


def test_restore_refused_while_a_live_process_holds_a_lease_unless_forced(db_path, tmp_path):
    from ingest.leases import Lease

    _filled(db_path).close()
    backup = take_backup(db_path, str(tmp_path / "b.db")).path
    lease = Lease(db_path, "backfill")
    assert lease.try_acquire()
    try:
        with pytest.raises(BackupError, match=r"restore refused: backfill held by .*--force"):
            restore(db_path, backup)
        with pytest.raises(BackupError, match="vacuum refused: backfill held by"):
            from ingest.backup import vacuum
            vacuum(db_path)
        assert restore(db_path, backup, force=True).kept is not None
    finally:
        lease.close()


# ---------------------------------------------------------------- vacuum


def test_vacuum_converts_an_old_file_to_incremental_auto_vacuum(tmp_path):
    db = tmp_path / "old.db"
    raw = sqlite3.connect(db)
    raw.execute("CREATE TABLE pre_existing (x)")  # a table before ingest's connect: auto_vacuum stays none
    raw.close()
    conn = open_db(db)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.executemany("INSERT INTO decisions (at, worker, asin, outcome, reason, fence) VALUES (?, 'w', ?, 'accepted', 'ok', 1)",
                     [(1.0, f"A{i:09d}") for i in range(5000)])
    conn.execute("DELETE FROM decisions")
    conn.close()
    result = CliRunner().invoke(main, ["--db", str(db), "db", "vacuum", "--json"])
    assert result.exit_code == 0, result.output
    assert '"auto_vacuum": "incremental"' in result.output
    assert connect(db).execute("PRAGMA auto_vacuum").fetchone()[0] == 2


def test_new_databases_use_incremental_auto_vacuum(db_path):
    assert open_db(db_path).execute("PRAGMA auto_vacuum").fetchone()[0] == 2


def test_restore_over_a_damaged_database_moves_the_damaged_file_aside(db_path, tmp_path):
    _filled(db_path, 7).close()
    backup = take_backup(db_path, str(tmp_path / "b.db")).path
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{db_path}{suffix}"):
            os.unlink(f"{db_path}{suffix}")
    db_path.write_bytes(b"garbage" * 5000)  # what a restore is for
    result = _cli(db_path, "db", "restore", str(backup))
    assert result.returncode == 0, result.stderr
    kept = [p for p in db_path.parent.iterdir() if p.name.startswith("ingest.db.replaced-")]
    assert len(kept) == 1 and kept[0].read_bytes() == b"garbage" * 5000
    assert scalar(db_path, "SELECT count(*) FROM keepa_calls") == 7
    assert _integrity(db_path) == [("ok",)]
