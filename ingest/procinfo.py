"""Who is this process, and is that other process still alive? (Linux /proc.)

A lease holder is identified by host, boot id, pid namespace, pid and the process start time.
The start time (field 22 of /proc/<pid>/stat, clock ticks since boot) tells a live holder from
an unrelated process that later got the same pid. The boot id and pid namespace say whether a
holder's pid and CLOCK_MONOTONIC readings mean anything here: only when both match ours.
"""

import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
UNKNOWN_BOOT = "unknown-boot"  # no /proc: we can neither check pids nor trust shared clocks


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def boot_id() -> str:
    """Changes on every boot: CLOCK_MONOTONIC readings compare only within one boot."""
    return _read(PROC / "sys/kernel/random/boot_id") or UNKNOWN_BOOT


def pid_namespace() -> str:
    """Pids compare only within one pid namespace (containers on one kernel share the boot id)."""
    try:
        return os.readlink(PROC / "self/ns/pid")
    except OSError:
        return "unknown-pidns"


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name. The name is in parentheses and may
    itself contain spaces and ')', so split at the last ')'."""
    text = _read(PROC / str(pid) / "stat")
    if text is None or ")" not in text:
        return None
    return text[text.rindex(")") + 1 :].split()


def start_time(pid: int) -> str | None:
    """The process start time in clock ticks since boot, or None when there is no such pid."""
    fields = _stat_fields(pid)
    # after the name: state is field 3 of stat, starttime field 22 -> index 0 and 19 here
    return fields[19] if fields and len(fields) > 19 else None


def is_alive(pid: int, started: str | None) -> bool:
    """True when `pid` runs and is the very process that started at `started`.

    A zombie (killed, not yet reaped by its parent) is dead: it will never renew again.
    """
    fields = _stat_fields(pid)
    if not fields or len(fields) <= 19:
        return False
    if fields[0] in ("Z", "X"):
        return False
    return started is None or fields[19] == started


@dataclass(frozen=True)
class Identity:
    """Who holds a lease. `nonce` tells apart two Lease objects of one process."""

    host: str
    boot: str
    pidns: str
    pid: int
    start: str | None
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))

    @classmethod
    def current(cls) -> "Identity":
        pid = os.getpid()
        return cls(socket.gethostname(), boot_id(), pid_namespace(), pid, start_time(pid))

    def is_local(self, host: str | None, boot: str | None, pidns: str | None) -> bool:
        """Same machine, same boot, same pid namespace: pids and monotonic clocks compare.
        Without a boot id nothing is local: every holder gets the (safe) remote rule."""
        return self.boot != UNKNOWN_BOOT and (host, boot, pidns) == (self.host, self.boot, self.pidns)

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid}:{self.nonce[:6]}"


def process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat: R running, S sleeping, D disk wait, T stopped
    (SIGSTOP), t traced, Z zombie ... None when there is no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields and len(fields) > 1 else None


def command_line(pid: int, limit: int = 300) -> str:
    """The process's argv joined by spaces ('' when it is gone or unreadable)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:limit]
