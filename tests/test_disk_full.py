"""A full disk loses nothing: a real backfill worker on a 3 MiB tmpfs against the simulator.

The worker reports the full disk in one line, rolls back, waits and retries (no exit, no crash
loop); `ingest status` names the disk; once the filesystem is grown the pass completes with
every listed ASIN stored exactly once and integrity_check ok. Skipped when this process may not
mount a tmpfs (not root, or in a container without CAP_SYS_ADMIN)."""

import json
import sqlite3
import subprocess
import time

import pytest

from ingest.simulator import SimConfig, Simulator

from .conftest import INGEST
from .workers_support import query, scalar, start_worker, stop, wait_for, worker_env, write_config



def test_a_log_line_that_cannot_be_written_on_a_full_disk_is_dropped_without_a_traceback(capsys):
    import errno
    import logging

    from ingest.logs import LineHandler

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    logger = logging.getLogger("test.fulldisk")
    logger.propagate = False
    logger.handlers[:] = [LineHandler(FullDisk())]
    logger.error("this line cannot be written")
    assert capsys.readouterr().err == ""


def _mount(path, size: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True)


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MiB tmpfs at tmp_path/fs, unmounted at the end whatever happens; yields (path, grow)."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    try:
        result = _mount(mount_point, "3m")
    except OSError as e:
        pytest.skip(f"cannot run mount: {e}")
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")

    def grow(size: str = "64m") -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    try:
        yield mount_point, grow
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.fixture
def sim():
    simulator = Simulator(SimConfig(port=0, refill_rate=6000, seed=7, products=6000))
    simulator.start()
    yield simulator
    simulator.stop()


def _status(env) -> dict:
    result = subprocess.run([INGEST, "status", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout[-500:] + result.stderr[-1000:]  # down
    return json.loads(result.stdout)


@pytest.mark.slow
def test_a_full_disk_is_reported_waited_out_and_loses_nothing(sim, small_fs, tmp_path):
    mount_point, grow = small_fs
    db_path = mount_point / "ingest.db"
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("[worker]\n", "[worker]\ndisk_full_retry_s = 0.5\n"))
    env = worker_env(sim.url, db_path, config)
    log = tmp_path / "backfill.log"  # on the big disk: the worker's own output must not need the small one
    proc = start_worker("backfill", env, "--once", log=log)
    try:
        wait_for(lambda: "disk full" in log.read_text() or proc.poll() is not None, 90, 0.2, "the disk to fill")
        assert proc.poll() is None, "the worker exited on a full disk:\n" + log.read_text()[-3000:]
        time.sleep(4.5)  # retries, for longer than the lease's ttl (3 s): it keeps its lease
        assert proc.poll() is None, "the worker exited while waiting for space:\n" + log.read_text()[-3000:]
        full_lines = [l for l in log.read_text().splitlines() if "disk full" in l]
        assert len(full_lines) == 1, full_lines  # one line, not one per retry
        assert str(db_path) in full_lines[0] and "free" in full_lines[0]
        assert "Traceback" not in log.read_text()
        assert scalar(db_path, "SELECT holder_pid FROM leases WHERE name = 'backfill'") == proc.pid

        state = _status(env)
        problems = " | ".join(state["problems"])
        assert f"disk full ({db_path}, " in problems and " free)" in problems, problems
        space = next(c for c in state["checks"] if c["name"] == "space")
        assert space["verdict"] == "fail" and space["next_step"]

        grow("64m")
        assert proc.wait(180) == 0, log.read_text()[-3000:]
    finally:
        stop(proc)
    text = log.read_text()
    assert "disk space is back" in text
    listed = set(sim.stats()["listed_asins"])
    stored = {a for (a,) in query(db_path, "SELECT asin FROM deals")}
    assert stored == listed
    # stored exactly once: one decision per listed ASIN, none from a rolled-back batch
    assert scalar(db_path, "SELECT count(*) FROM decisions") == len(listed)
    assert scalar(db_path, "SELECT count(DISTINCT asin) FROM decisions") == len(listed)
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def test_status_names_the_full_disk_while_a_worker_waits_for_space(db_path):
    from ingest import deals
    from ingest.health import assess_health
    from ingest.store import open_db, transaction

    conn = open_db(db_path)
    report = assess_health(conn, supervisor=None)
    assert next(c for c in report.checks if c.name == "space").verdict == "ok"
    with transaction(conn):
        deals.update_progress(conn, "backfill", time.time(), state="disk_full", last_error="disk full: ...")
    report = assess_health(conn, supervisor=None)
    assert report.verdict == "down"
    space = next(c for c in report.checks if c.name == "space")
    assert space.summary.startswith(f"disk full ({db_path}, ") and "backfill waiting for space" in space.summary
    assert "grow it" in space.next_step
