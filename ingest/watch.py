"""`ingest watch`: the watchdog, a supervisord event listener (`[eventlistener:watch]`).

supervisord starts it with events on stdin and the listener protocol on stdout: the listener
writes READY, reads one event (a header line `... eventname:NAME len:N`, then N bytes), acts on
it, and answers `RESULT 2\\nOK`. It subscribes to PROCESS_STATE (a FATAL or unexpected EXITED
is looked at at once) and TICK_5 (every 5 s). Logs go to stderr, never stdout.

Each look runs the checks of `ingest status` (ingest.health.system_report: one code path) and
then decides, with pure functions over what it saw:
- a child of this supervisord that is stopped (state T) is killed (SIGKILL: a stopped process
  cannot run a SIGTERM handler); supervisord restarts it and the new process takes the dead
  holder's lease at once;
- a child holding a lease whose heartbeat is older than the lease's TTL is hung: killed too;
- the holder of SQLite's WAL write lock (a POSIX lock on byte 120 of the -shm file, seen in
  /proc/locks) for longer than [watch] write_lock_max_s: killed when it is one of our children,
  otherwise reported by pid and command line and never signalled. (PostgreSQL has no such file
  lock: that look finds nothing, and a session stopped inside a transaction is ended by the
  server after ingest.backends.postgres.IDLE_IN_TRANSACTION_MS.)
Only pids that supervisord reports as its own children (getAllProcessInfo over its unix socket,
re-read right before the signal, and whose parent is supervisord) are ever signalled.
Every action is a row of watch_actions and an 'action' message; verdict changes become alerts
(ingest/alerts.py), delivered off this loop.
"""

import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .backends import open_store
from .alerts import AlertSettings, AlertState, Outbox, advance, compose, host_name, problems_of, state_from_history
from .health import system_report
from .lease_table import lease_rows
from .procinfo import command_line, parent_pid, process_state
from .settings import setting
from .supervisor import probe

log = logging.getLogger(__name__)

WAL_WRITE_LOCK_BYTE = 120   # SQLite's WALINDEX_LOCK_OFFSET + WAL_WRITE_LOCK in the -shm file
PROC_LOCKS = Path("/proc/locks")
SELF_PROGRAM = "watch"
TICK_S = 5.0   # TICK_5: how often supervisord asks for a look


def announced_within(confirm_s: float) -> float:
    """The longest wait from a new verdict to its message: looks come on ticks, so it is first
    seen within a tick (plus supervisord's 1 s loop), then confirmed at the first tick at least
    confirm_s later."""
    return math.ceil(confirm_s / TICK_S) * TICK_S + TICK_S + 2


@dataclass(frozen=True)
class WatchSettings:
    """[watch]: what the watchdog may do on its own."""

    act: bool = setting(True, "kill stopped and hung workers (false: report them only, never signal)")
    stopped_grace_s: float = setting(0.0, "a stopped (state T) child is killed once seen stopped this long",
                                     min=0, max=3600)
    write_lock_max_s: float = setting(30.0, "the write lock held longer than this: hung (ours) or reported (foreign)",
                                      above=0, max=86400)

    @classmethod
    def from_config(cls, config: dict) -> "WatchSettings":
        from .settings import parse

        return parse(cls, config.get("watch"), "watch")


# ------------------------------------------------------------------ the listener protocol


def parse_tokens(line: str) -> dict[str, str]:
    """'ver:3.0 server:supervisor eventname:TICK_5 len:15' -> {'ver': '3.0', ...}"""
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


def read_event(stdin) -> tuple[dict, dict, str] | None:
    """(header, payload tokens, payload text) of the next event, or None at end of input."""
    line = stdin.readline()
    if not line:
        return None
    header = parse_tokens(line)
    body = stdin.read(int(header.get("len", 0)))
    first, _, rest = body.partition("\n")  # PROCESS_LOG/COMMUNICATION events carry data after a newline
    return header, parse_tokens(first), rest


def ready(stdout) -> None:
    stdout.write("READY\n")
    stdout.flush()


def result_ok(stdout) -> None:
    stdout.write("RESULT 2\nOK")
    stdout.flush()


# ------------------------------------------------------------------ what a look sees


@dataclass(frozen=True)
class Child:
    program: str
    pid: int
    state: str             # supervisord's: RUNNING, STARTING ...
    proc_state: str | None  # /proc's letter: T is stopped


@dataclass(frozen=True)
class HeldLease:
    name: str
    pid: int
    heartbeat_age: float | None
    ttl_s: float


@dataclass(frozen=True)
class LockSeen:
    """The write lock's holder as seen on consecutive looks: since when, and its command line."""

    pid: int
    since: float
    cmdline: str = ""
    reported: bool = False


@dataclass(frozen=True)
class Action:
    action: str          # kill_stopped | kill_hung | kill_lock_holder | alert_foreign_lock
    pid: int
    program: str | None
    reason: str
    signal: bool
    detail: str = ""


def write_lock_holders(locks_text: str, device: tuple[int, int], inode: int) -> list[int]:
    """Pids holding a POSIX WRITE lock on the WAL write-lock byte of the -shm file with this
    device and inode, from the text of /proc/locks ('1: POSIX ADVISORY WRITE 8215 fe:00:2146369 120 120').
    Waiters ('1: -> POSIX ...') are not holders."""
    out = []
    for line in locks_text.splitlines():
        parts = line.split()
        if len(parts) < 8 or parts[1] == "->" or parts[1] not in ("POSIX", "OFDLCK") or parts[3] != "WRITE":
            continue
        try:
            major, minor, ino = parts[5].split(":")
            where = (int(major, 16), int(minor, 16)), int(ino)
            start = int(parts[6])
            end = float("inf") if parts[7] == "EOF" else int(parts[7])
            pid = int(parts[4])
        except ValueError:
            continue
        if where == (device, inode) and start <= WAL_WRITE_LOCK_BYTE <= end and pid > 0:
            out.append(pid)
    return out


def track_lock(previous: LockSeen | None, holder: int | None, now: float, cmdline: str = "") -> LockSeen | None:
    """The same holder keeps its `since`; a new one starts now; no holder: None."""
    if holder is None:
        return None
    if previous is not None and previous.pid == holder:
        return previous
    return LockSeen(holder, now, cmdline)


def track_stopped(previous: dict[int, float], children: list[Child], now: float) -> dict[int, float]:
    """pid -> since when it is seen stopped (state T), for the children stopped now."""
    return {c.pid: previous.get(c.pid, now) for c in children if c.proc_state == "T"}


def decide(children: list[Child], leases: list[HeldLease], lock: LockSeen | None, stopped: dict[int, float],
           now: float, settings: WatchSettings, self_pid: int) -> list[Action]:
    """What to do, from what was seen. Only a pid among `children` (and not this process) is
    ever given an action with signal=True; a foreign lock holder gets a report, once per hold."""
    ours = {c.pid: c for c in children if c.pid and c.pid != self_pid and c.state in ("RUNNING", "STARTING")}
    actions: dict[int, Action] = {}
    for pid, child in ours.items():
        if pid in stopped and now - stopped[pid] >= settings.stopped_grace_s:
            actions[pid] = Action("kill_stopped", pid, child.program,
                                  f"{child.program} (pid {pid}) is stopped (state T)", True)
    for lease in leases:
        child = ours.get(lease.pid)
        if child is None or lease.pid in actions or lease.heartbeat_age is None:
            continue
        if lock is not None and lock.pid != lease.pid:
            continue  # it cannot renew while another holds the write lock: that one is the cause
        if lease.heartbeat_age > lease.ttl_s:
            actions[lease.pid] = Action("kill_hung", lease.pid, child.program,
                                        f"{child.program} (pid {lease.pid}) holds lease {lease.name} but renewed it"
                                        f" {lease.heartbeat_age:.0f}s ago (TTL {lease.ttl_s:g}s)", True)
    if lock is not None and now - lock.since > settings.write_lock_max_s and lock.pid not in actions:
        held = f"held SQLite's write lock for {now - lock.since:.0f}s (limit {settings.write_lock_max_s:g}s)"
        child = ours.get(lock.pid)
        if child is not None:
            actions[lock.pid] = Action("kill_lock_holder", lock.pid, child.program,
                                       f"{child.program} (pid {lock.pid}) {held}", True)
        elif lock.pid != self_pid and not lock.reported:
            actions[lock.pid] = Action("alert_foreign_lock", lock.pid, None,
                                       f"pid {lock.pid} (not started by supervisord) {held}: not signalled;"
                                       f" end its transaction or the process by hand", False, lock.cmdline)
    if not settings.act:
        actions = {pid: Action(a.action, a.pid, a.program, a.reason + " (report only: [watch] act = false)",
                               False, a.detail) for pid, a in actions.items()}
    return list(actions.values())


# ------------------------------------------------------------------ the I/O around it


def last_action(conn) -> dict | None:
    """The watchdog's newest action row (ingest status's watchdog line)."""
    row = conn.execute("SELECT at, action, reason, pid, program FROM watch_actions ORDER BY id DESC LIMIT 1").fetchone()
    return dict(row) if row else None


def children_of(programs: dict[str, dict]) -> list[Child]:
    return [Child(name, p["pid"], p["state"], process_state(p["pid"]))
            for name, p in sorted(programs.items()) if p.get("pid")]


def held_leases(conn, now: float) -> list[HeldLease]:
    return [HeldLease(r["name"], r["pid"], r["heartbeat_age"], r["ttl_s"])
            for r in lease_rows(conn, now) if r["pid"] and r["state"] in ("held", "expired")]


def shm_lock_holder(db_path: Path, locks_path: Path = PROC_LOCKS) -> int | None:
    """The pid holding the database's WAL write lock now, or None."""
    return lock_file_holder(Path(f"{db_path}-shm"), locks_path)


def lock_file_holder(lock_file: Path, locks_path: Path = PROC_LOCKS) -> int | None:
    """The pid holding the write lock byte of `lock_file` (SQLite's -shm) now, or None."""
    try:
        st = os.stat(lock_file)
        text = locks_path.read_text()
    except OSError:
        return None
    holders = write_lock_holders(text, (os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino)
    return holders[0] if holders else None


def signal_child(pid: int, conf: str | None) -> str | None:
    """SIGKILL `pid` if supervisord (asked again now) still reports it as a running child of its
    own and its parent is supervisord; else say why not. Never any other pid."""
    view = probe(conf)
    if not view.running:
        return f"not signalled: supervisord cannot be asked ({view.error})"
    if pid not in {p.get("pid") for p in view.programs.values()}:
        return "not signalled: no longer a child of supervisord"
    if view.supervisord_pid and parent_pid(pid) != view.supervisord_pid:
        return "not signalled: its parent is not supervisord"
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "already gone"
    return None


@dataclass
class Watcher:
    """The state kept between looks, and the look itself (`look(now)`)."""

    db_path: Path
    config: dict
    outbox: Outbox
    stall_minutes: float = 10.0
    supervisor_conf: str | None = None
    settings: WatchSettings = field(default_factory=WatchSettings)
    alert_settings: AlertSettings = field(default_factory=AlertSettings)
    alert_state: AlertState | None = None
    lock: LockSeen | None = None
    stopped: dict = field(default_factory=dict)
    kill: Callable = signal_child   # (pid, supervisor_conf) -> why not signalled, or None
    _conn: object = None
    _missing_logged: bool = False

    @property
    def store(self):
        return open_store(self.db_path)

    def conn(self):
        """Read only, never migrated: a look must not wait for the write lock (its holder may be
        the very thing to act on). The outbox writes, with its own connection."""
        if self._conn is None:
            self._conn = self.store.read_only()
        return self._conn

    def look(self, now: float | None = None) -> list[Action]:
        now = time.time() if now is None else now
        if not self.store.backend.exists(self.db_path):
            if not self._missing_logged:
                log.info("waiting for %s (the workers create it)", self.store.label)
                self._missing_logged = True
            return []
        view = probe(self.supervisor_conf)
        programs = view.programs if view.running else None
        conn = self.conn()
        if self.alert_state is None:
            self.alert_state = state_from_history(conn)
        report = system_report(conn, programs, now=now, stall_minutes=self.stall_minutes, config=self.config)
        actions = self._act(conn, programs or {}, now)
        self._alert(report, programs, now)
        return actions

    def _act(self, conn, programs: dict, now: float) -> list[Action]:
        children = children_of(programs)
        lock_file = self.store.backend.write_lock_file(self.db_path)
        holder = lock_file_holder(lock_file) if lock_file is not None else None
        self.lock = track_lock(self.lock, holder, now, command_line(holder) if holder else "")
        self.stopped = track_stopped(self.stopped, children, now)
        actions = decide(children, held_leases(conn, now), self.lock, self.stopped, now, self.settings, os.getpid())
        for action in actions:
            outcome = self.kill(action.pid, self.supervisor_conf) if action.signal else None
            if action.action == "alert_foreign_lock":
                self.lock = LockSeen(self.lock.pid, self.lock.since, self.lock.cmdline, reported=True)
            self._record(action, now, outcome)
        return actions

    def _record(self, action: Action, now: float, outcome: str | None) -> None:
        reason = action.reason + (f" ({outcome})" if outcome else "")
        if action.signal and outcome is None:
            reason += ": killed (SIGKILL); supervisord restarts it"
        log.warning("watchdog %s: %s", action.action, reason)

        def record(conn):  # written by the outbox: the database may be the very thing that is locked
            conn.execute("INSERT INTO watch_actions (at, action, reason, pid, program, detail) VALUES (?, ?, ?, ?, ?, ?)",
                         (now, action.action, reason, action.pid, action.program, action.detail or None))

        note = reason + (f". Command line: {action.detail}" if action.detail else "")
        self.outbox.put(compose("action", None, None, (), host=host_name(), database=self.store.label, at=now,
                                note=note), record)

    def _alert(self, report, programs, now: float) -> None:
        before = self.alert_state
        self.alert_state, kind = advance(before, report.verdict, now, self.alert_settings)
        if kind is None:
            return
        previous = before.reported
        problems = problems_of(report, programs) if kind != "recovered" else ()
        since = before.since if kind in ("recovered", "repeat") else None
        self.outbox.put(compose(kind, report.verdict, previous, problems, host=host_name(),
                                database=self.store.label, at=now, since=since))


LOOK_ON = ("TICK_5", "PROCESS_STATE_FATAL", "PROCESS_STATE_EXITED", "PROCESS_STATE_BACKOFF")
MIN_GAP_S = 1.0   # a burst of state events is looked at once
SLOW_LOOK_S = 2.0


def listen(watcher: Watcher, stdin=sys.stdin, stdout=sys.stdout) -> int:
    """The listener loop: until supervisord closes stdin. A failed look is one log line and the
    event is still acknowledged (an unacknowledged listener stops getting events)."""
    last = 0.0
    while True:
        ready(stdout)
        event = read_event(stdin)
        if event is None:
            return 0
        header, payload, _ = event
        name = header.get("eventname", "")
        wanted = name in LOOK_ON and not (name == "PROCESS_STATE_EXITED" and payload.get("expected") == "1")
        if wanted and payload.get("processname") != SELF_PROGRAM and time.monotonic() - last >= MIN_GAP_S:
            last = time.monotonic()
            try:
                watcher.look()
            except Exception as e:
                log.error("look failed: %s: %s", type(e).__name__, e)
            took = time.monotonic() - last
            if took > SLOW_LOOK_S:
                log.warning("a look took %.1f s (events wait meanwhile)", took)
        result_ok(stdout)
