"""A throwaway copy of the project run by a real supervisord, for the end-to-end tests.

The copy holds the real supervisor.d/ and scripts/ (so the tests exercise the shipped files), a
.venv/bin of links to the test's own interpreter and tools, an ingest.toml with short lease
timings, and its own var/. Its database is var/ingest.db, or with `db=` a PostgreSQL URL, given
to supervisord the way an operator does: INGEST_DB in ./ingest.env. It lives in a short /tmp
folder: unix socket paths are limited to ~100 characters. `close()` shuts supervisord down and
kills anything left, even after a failure.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ingest.backends import open_store
from ingest.supervisor import supervisor_states

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TOOLS = ("python", "ingest", "supervisord", "supervisorctl")
CONF = "supervisor.d/supervisord.conf"

# ttl >= 2 x renew >= 4 x retry (ingest.leases.LeaseTiming); backfill starts its next pass at once
# (a pass over the simulator takes ~100 s), so there is always work to commit
# the metrics endpoint on any free port: tests run beside each other and beside a real one
TEST_TOML = ("[leases]\nttl_s = 4.0\nrenew_s = 1.0\nretry_s = 0.25\n\n"
               "[backfill]\npass_pause_s = 1\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n")
TTL_S = 4.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class SupervisedProject:
    def __init__(self, keepa_url: str, *, toml: str = TEST_TOML, db: str | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="ie2e-", dir="/tmp"))
        shutil.copytree(ROOT / "supervisor.d", self.root / "supervisor.d")
        shutil.copytree(ROOT / "scripts", self.root / "scripts")
        bin_dir = self.root / ".venv" / "bin"
        bin_dir.mkdir(parents=True)
        for tool in TOOLS:
            (bin_dir / tool).symlink_to(VENV_BIN / tool)
        (self.root / ".venv" / ".ingest-run-installed").touch()  # scripts/demo: installed already
        (self.root / "ingest.toml").write_text(toml)
        self.db_path = self.root / "var" / "ingest.db"
        self.store = open_store(db or self.db_path)  # what the programs use
        if db:
            env_file = self.root / "ingest.env"
            env_file.write_text(f"INGEST_DB={db}\n")
            env_file.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("INGEST_", "KEEPA_"))}
        self.env.update(KEEPA_BASE_URL=keepa_url, KEEPA_API_KEY="e2e-key")
        self.seen_pids: set[int] = set()
        self._conn = None

    # ------------------------------------------------------------ running things

    def run(self, *args, timeout: float = 120, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(args, cwd=self.root, env=env or self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def script(self, name: str, *args, **kwargs) -> subprocess.CompletedProcess:
        return self.run(str(self.root / "scripts" / name), *args, **kwargs)

    def ingest(self, *args, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        """An admin command on the programs' database (as an operator runs one with INGEST_DB)."""
        return self.run(str(self.root / ".venv/bin/ingest"), *args, timeout=timeout, check=check,
                        env={**self.env, "INGEST_DB": str(self.store.target)})

    def ctl(self, *args, **kwargs) -> subprocess.CompletedProcess:
        return self.run(str(self.root / ".venv/bin/supervisorctl"), "-c", CONF, *args, **kwargs)

    def states(self) -> dict[str, dict] | None:
        states = supervisor_states(self.root / CONF)
        for proc in (states or {}).values():
            if proc.get("pid"):
                self.seen_pids.add(proc["pid"])
        return states

    def pid(self, program: str) -> int | None:
        return ((self.states() or {}).get(program) or {}).get("pid")

    @property
    def supervisord_pid(self) -> int | None:
        try:
            return int((self.root / "var" / "supervisord.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------ the database

    def use_database(self, target) -> None:
        """Read another database from now on (the demo's var/demo.db, say)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.db_path = target
        self.store = open_store(target)

    @property
    def db_errors(self) -> tuple:
        return self.store.backend.errors

    def db_exists(self) -> bool:
        return self.store.backend.exists(self.store.target)

    def db(self):
        """A connection to the programs' database (autocommit on both stores), opened once and
        opened again if it was lost (a PostgreSQL server restart)."""
        if self._conn is not None and getattr(self._conn, "lost", False):
            self._conn.close()
            self._conn = None
        if self._conn is None:
            self._conn = self.store.connect()
        return self._conn

    def query(self, sql: str, *args) -> list:
        return self.db().execute(sql, args).fetchall()

    def lease(self, name: str) -> dict | None:
        try:
            rows = self.query("SELECT * FROM leases WHERE name = ?", name)
        except self.db_errors as e:  # the database exists, its first migration is not done yet
            if "no such table" not in str(e) and "does not exist" not in str(e):
                raise
            return None
        return dict(rows[0]) if rows else None

    def events(self, name: str, since_id: int = 0) -> list[dict]:
        return [dict(r) for r in self.query(
            "SELECT * FROM lease_events WHERE name = ? AND id > ? ORDER BY id", name, since_id)]

    def last_event_id(self) -> int:
        return self.query("SELECT coalesce(max(id), 0) FROM lease_events")[0][0]

    # ------------------------------------------------------------ waiting

    @staticmethod
    def wait(predicate, timeout: float, what: str, interval: float = 0.1):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(interval)

    def wait_running(self, *programs: str, timeout: float = 30.0) -> dict:
        def ready():
            states = self.states()
            return states if states and all(
                (states.get(p) or {}).get("state") == "RUNNING" for p in programs) else None
        return self.wait(ready, timeout, f"{', '.join(programs)} RUNNING (last: {self.states()})")

    def wait_held_by(self, name: str, pid: int, timeout: float = 15.0) -> dict:
        def held():
            row = self.lease(name) if self.db_exists() else None
            return row if row and row["holder_pid"] == pid else None
        return self.wait(held, timeout, f"lease {name} held by pid {pid} (now {self.lease(name)})", 0.05)

    # ------------------------------------------------------------ cleanup

    def close(self) -> None:
        """Shut supervisord down gracefully; kill whatever is still alive; delete the copy."""
        try:
            pid = self.supervisord_pid
            if pid and _alive(pid):
                try:
                    self.states()  # remember the children's pids in case we must kill them
                    self.ctl("shutdown", timeout=30, check=False)
                except subprocess.TimeoutExpired:
                    pass
                deadline = time.monotonic() + 60
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            for child in self.seen_pids:  # orphans, if supervisord had to be killed
                if _alive(child) and str(self.root) in _cmdline(child):
                    os.kill(child, signal.SIGKILL)
        finally:
            if self._conn is not None:
                self._conn.close()
            shutil.rmtree(self.root, ignore_errors=True)
