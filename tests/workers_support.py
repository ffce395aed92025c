"""Shared set-up for worker tests: a simulator on loopback, a config file, worker processes."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from ingest.backends import is_url, open_store

INGEST = str(Path(sys.executable).parent / "ingest")
TEST_KEY = "TESTKEY-0123456789abcdef-SECRET"

FAST_CONFIG = """
[leases]
ttl_s = 3.0
renew_s = 1.0
retry_s = 0.25

[worker]
backoff_s = 0.2
backoff_max_s = 1.0
retry_base_s = 0.5
progress_log_s = 1.0

[backfill]
pass_pause_s = 3600

[upsert]
poll_s = 1.0
max_pages = 2
min_spare_batch = 1
"""


def write_config(folder: Path, extra: str = "") -> Path:
    path = folder / "ingest.toml"
    path.write_text(FAST_CONFIG + extra)
    return path


def worker_env(sim_url: str, db_path: Path, config: Path) -> dict:
    env = dict(os.environ)
    env.update(KEEPA_BASE_URL=sim_url, KEEPA_API_KEY=TEST_KEY, INGEST_DB=str(db_path),
               INGEST_CONFIG=str(config), PYTHONUNBUFFERED="1")
    return env


def start_worker(kind: str, env: dict, *args: str, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([INGEST, "run", kind, *args], env=env, stdout=out, stderr=out)


def run_worker(kind: str, env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([INGEST, "run", kind, *args], env=env, capture_output=True, text=True, timeout=timeout)


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def kill_left(*procs: "subprocess.Popen | None") -> None:
    """SIGKILL whichever of `procs` still runs (a test that failed before stopping them)."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def query(db_path: "Path | str", sql: str, *args):
    """Rows of `sql` on an SQLite file or a PostgreSQL URL (tuples on both)."""
    if is_url(db_path):
        conn = open_store(db_path).connect()
        try:
            return [tuple(row) for row in conn.execute(sql, args).fetchall()]
        finally:
            conn.close()
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def rows_when_ready(db_path: "Path | str", sql: str, *args) -> list | None:
    """The rows of `sql`, or None while the database or its tables do not exist yet (a worker
    that has just started may not have migrated the file)."""
    if not is_url(db_path) and not Path(db_path).exists():
        return None
    try:
        return query(db_path, sql, *args)
    except Exception as e:
        if "no such table" in str(e) or "does not exist" in str(e):
            return None
        raise


def scalar(db_path: "Path | str", sql: str, *args):
    """One value, or None while the database or its tables do not exist yet."""
    rows = rows_when_ready(db_path, sql, *args)
    return rows[0][0] if rows else None


SPENT_SQL = "SELECT worker, CAST(sum(actual) AS BIGINT) FROM keepa_calls GROUP BY worker"


def spent_by_worker(db_path: "Path | str") -> dict[str, int]:
    """Tokens each worker spent (the call log), {} while the database or its tables do not exist."""
    return {worker: spent or 0 for worker, spent in rows_when_ready(db_path, SPENT_SQL) or ()}


def share_for_a_while(db_path: "Path | str", at_least_s: float = 8.0) -> None:
    """Until both workers have spent tokens, and for `at_least_s` in all. Whichever starts first
    may spend the opening balance alone; the other is then served at the next refill tick (the
    simulator, like Keepa, refills once a minute): wait past one."""
    started = time.monotonic()
    wait_for(lambda: all(spent_by_worker(db_path).get(w, 0) > 0 for w in ("backfill", "upsert")), 90,
             interval=0.5, what="both workers to spend tokens")
    time.sleep(max(0.0, at_least_s - (time.monotonic() - started)))


def checkpoint(db_path: Path, name: str) -> dict | None:
    value = scalar(db_path, "SELECT value FROM checkpoints WHERE name = ?", name)
    return json.loads(value) if value else None
