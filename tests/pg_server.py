"""A real PostgreSQL server for the tests and benches, from the installed server binaries.

    server = PgServer.start()          # initdb + pg_ctl start in a fresh temporary directory
    url = server.create_database()     # a new, empty database: postgresql:///NAME?host=DIR...
    server.stop()                      # stops the server and removes the directory

The binaries are looked for in PATH, /usr/local/bin and Debian's /usr/lib/postgresql/*/bin
(newest first); `find_bin_dir()` is None without them (the tests skip, saying so). PostgreSQL
refuses to run as root: as root, every server command runs as the `postgres` user (or `nobody`)
through runuser (or setpriv), in a directory that user owns. The server listens only on a unix
socket in that directory (no TCP port to collide on) and trusts local connections.

Cleaning up also when interrupted: `stop()` is called by the fixture's teardown and at exit, and
a small reaper process (its own session, so a Ctrl-C does not reach it) waits for our end of a
pipe to close, which happens however this process ends (kill -9 included), and then stops the
server and removes the directory if that was not done already.
"""

import atexit
import glob
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

try:
    import psycopg

    # what a test expects a refused statement to raise, on either store
    DB_ERRORS = (sqlite3.Error, psycopg.Error)
except ImportError:  # pragma: no cover - no postgres extra: the PostgreSQL cases skip
    DB_ERRORS = (sqlite3.Error,)

SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
SUPERUSER = "postgres"
PORT = 5432  # only names the socket file: the server listens on no TCP address

# Tests need no durability: a crash of the test server loses nothing anyone keeps.
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
# Benches: durable data files, commits not waiting for their WAL flush; the same promise as
# SQLite's WAL with synchronous = NORMAL (a power cut may lose the last commits, never corrupts).
DURABLE = {"synchronous_commit": "off"}

REAPER = r"""
import os, shutil, subprocess, sys
sys.stdin.read()  # EOF: the process that started the server is gone or done with it
pg_ctl, data, root, *runas = sys.argv[1:]
if os.path.isdir(data):
    subprocess.run([*runas, pg_ctl, "stop", "-D", data, "-m", "immediate", "-w", "-t", "30"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
shutil.rmtree(root, ignore_errors=True)
"""


def find_bin_dir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None."""
    candidates = []
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).resolve().parent)
    candidates.append(Path("/usr/local/bin"))
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: _version_key(p), reverse=True)
    candidates += [Path(p) for p in debian]
    for folder in candidates:
        if all((folder / name).is_file() and os.access(folder / name, os.X_OK) for name in SERVER_BINARIES):
            return folder
    return None


def _version_key(path: str) -> tuple:
    version = Path(path).parent.name
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def why_unavailable() -> str | None:
    """Why no server can be started here (the tests' skip reason), or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[postgres]')"
    if find_bin_dir() is None:
        return ("no PostgreSQL server binaries (initdb, pg_ctl, postgres) in PATH, /usr/local/bin or "
                "/usr/lib/postgresql/*/bin; .ci/run installs Debian's postgresql")
    if os.geteuid() == 0 and _server_user() is None:
        return "running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as"
    return None


def _server_user() -> pwd.struct_passwd | None:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def _shared_tmp() -> str:
    """A temporary folder the server's user can reach: $TMPDIR, unless others cannot enter it."""
    folder = tempfile.gettempdir()
    return folder if os.stat(folder).st_mode & 0o001 else "/tmp"


def _run_as_prefix() -> list[str]:
    """The command prefix that drops root for the server commands ([] when not root)."""
    if os.geteuid() != 0:
        return []
    user = _server_user()
    if shutil.which("runuser"):
        return ["runuser", "-u", user.pw_name, "--"]
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]


@dataclass
class PgServer:
    bin_dir: Path
    root: Path                       # temporary directory: data/, the socket, server.log
    run_as: list[str]
    _reaper: subprocess.Popen | None = field(default=None, repr=False)
    _databases: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stopped: bool = False
    _owner: int = field(default_factory=os.getpid, repr=False)  # a forked child never stops it

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @classmethod
    def start(cls, *, durable: bool = False) -> "PgServer":
        """initdb and start a server in a new temporary directory. Raises RuntimeError (with the
        server's log) when it does not come up; call why_unavailable() first to skip instead."""
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError(why_unavailable() or "no PostgreSQL server binaries")
        root = Path(tempfile.mkdtemp(prefix="ingest-pg-", dir=_shared_tmp()))
        run_as = _run_as_prefix()
        if run_as:
            user = _server_user()
            os.chown(root, user.pw_uid, user.pw_gid)
        server = cls(bin_dir, root, run_as)
        server._start_reaper()
        atexit.register(server.stop)
        try:
            server._initdb()
            server._pg_ctl_start(DURABLE if durable else FAST)
        except BaseException:
            server.stop()
            raise
        return server

    def _start_reaper(self) -> None:
        self._reaper = subprocess.Popen(
            [sys.executable, "-c", REAPER, str(self.bin_dir / "pg_ctl"), str(self.data), str(self.root), *self.run_as],
            stdin=subprocess.PIPE, start_new_session=True,
        )

    def _server_command(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.run_as, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{Path(args[0]).name} failed ({result.returncode}): {result.stdout[-2000:]}\n{log}")
        return result

    def _initdb(self) -> None:
        self._server_command(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
                             "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions", timeout=START_TIMEOUT_S)

    def _pg_ctl_start(self, settings: dict) -> None:
        options = {
            "listen_addresses": "''", "unix_socket_directories": f"'{self.root}'", "port": str(PORT),
            "dynamic_shared_memory_type": "mmap", "max_connections": "60", "shared_buffers": "64MB",
            **settings,
        }
        opts = " ".join(f"-c {k}={v}" for k, v in options.items())
        self._server_command(str(self.bin_dir / "pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log),
                             "-w", "-t", str(START_TIMEOUT_S), "-o", opts, timeout=START_TIMEOUT_S + 10)

    def url(self, database: str = "postgres") -> str:
        """A libpq URL for `database` on this server's socket."""
        return f"postgresql://{SUPERUSER}@/{database}?host={self.root}&port={PORT}"

    def create_database(self, *, extensions: tuple[str, ...] = ()) -> str:
        """A new, empty database with `extensions` created in it (an administrator's step, e.g.
        amcheck for the integrity check); returns its URL."""
        import psycopg

        with self._lock:
            self._databases += 1
            name = f"ingest_test_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        with psycopg.connect(self.url(name), autocommit=True) as conn:
            for extension in extensions:
                conn.execute(f'CREATE EXTENSION "{extension}"')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (immediate: nothing to keep) and remove the directory. Idempotent."""
        if self._stopped or os.getpid() != self._owner:
            return
        self._stopped = True
        try:
            if (self.data / "postmaster.pid").exists():
                subprocess.run([*self.run_as, str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data),
                                "-m", "immediate", "-w", "-t", str(STOP_TIMEOUT_S)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=STOP_TIMEOUT_S + 10)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            if self._reaper is not None:
                self._reaper.stdin.close()  # the reaper finds nothing left to do
                try:
                    self._reaper.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self._reaper.kill()
