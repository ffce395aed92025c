"""The lease tables: validated rows, every statement that reads or writes them, the operator's
view and admin release.

The rules that decide who may take a lease are pure functions in ingest/lease_rules.py; the
process side (heartbeat thread, fenced transactions) is ingest/leases.py. Times shown to
operators come from the wall clock only where nothing better exists (a holder on another host or
boot); see docs/leases.md.
"""

import math
from dataclasses import dataclass

from . import procinfo
from .backends import locked_row, transaction
from .clock import SYSTEM_CLOCK
from .errors import IngestError, StoreError
from .lease_rules import HolderStatus, LeaseEvent, LeaseState, holder_status
from .procinfo import Identity

HOLDER_COLUMNS = ("holder_host", "holder_boot", "holder_pidns", "holder_pid", "holder_start", "holder_nonce")


class CorruptLease(StoreError):
    """A lease row that does not make sense. We refuse to act on it rather than guess."""


class UnknownLease(IngestError):
    pass


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LeaseRow:
    name: str
    host: str | None
    boot: str | None
    pidns: str | None
    pid: int | None
    start: str | None
    nonce: str | None
    fence: int
    ttl_s: float
    acquired_at: float | None
    renewed_at: float | None
    expires_at: float | None
    renewed_mono: float | None
    renewals: int
    transitions: int

    @classmethod
    def parse(cls, row) -> "LeaseRow":
        """Validate a row read from `leases` (by column name); CorruptLease (one line) if it is damaged."""
        name = row["name"]

        def bad(what: str):
            return CorruptLease(f"lease row {name!r} is corrupt: {what}; fix or delete the row by hand")

        if not isinstance(name, str) or not name:
            raise bad("name is not text")
        for column in ("fence", "renewals", "transitions"):
            if not isinstance(row[column], int) or row[column] < 0:
                raise bad(f"{column} is not a non-negative integer ({row[column]!r})")
        if not _is_number(row["ttl_s"]) or row["ttl_s"] <= 0:
            raise bad(f"ttl_s is not a positive number ({row['ttl_s']!r})")
        held = row["holder_nonce"] is not None
        if held:
            for column in ("holder_host", "holder_boot", "holder_pidns", "holder_nonce"):
                if not isinstance(row[column], str):
                    raise bad(f"{column} is not text ({row[column]!r})")
            if not isinstance(row["holder_pid"], int) or row["holder_pid"] <= 0:
                raise bad(f"holder_pid is not a positive integer ({row['holder_pid']!r})")
            if row["holder_start"] is not None and not isinstance(row["holder_start"], str):
                raise bad(f"holder_start is not text ({row['holder_start']!r})")
            for column in ("renewed_mono", "acquired_at", "renewed_at", "expires_at"):
                if not _is_number(row[column]):
                    raise bad(f"{column} is not a number ({row[column]!r})")
        elif any(row[c] is not None for c in HOLDER_COLUMNS):
            raise bad("holder is half set (no nonce but other holder fields)")
        return cls(
            name=name, host=row["holder_host"], boot=row["holder_boot"], pidns=row["holder_pidns"],
            pid=row["holder_pid"], start=row["holder_start"], nonce=row["holder_nonce"],
            fence=row["fence"], ttl_s=float(row["ttl_s"]), acquired_at=row["acquired_at"],
            renewed_at=row["renewed_at"], expires_at=row["expires_at"], renewed_mono=row["renewed_mono"],
            renewals=row["renewals"], transitions=row["transitions"],
        )

    @property
    def held(self) -> bool:
        return self.nonce is not None

    @property
    def holder_label(self) -> str | None:
        return f"{self.host}:{self.pid}:{self.nonce[:6]}" if self.held else None

    @property
    def observed_key(self) -> tuple:
        """Changes whenever the holder renews or changes: what a remote observer watches."""
        return (self.fence, self.nonce, self.renewals)


def holder_alive(row: LeaseRow | None, me: Identity) -> bool | None:
    """Is the holder running? Asked of /proc only for a holder on our host, boot and pid
    namespace; None for any other (or a free row): nobody here can tell."""
    if row is None or not row.held or not me.is_local(row.host, row.boot, row.pidns):
        return None
    return procinfo.is_alive(row.pid, row.start)


# ---------------------------------------------------------------- statements (inside the caller's transaction)


def read_lease(conn, name: str) -> LeaseRow | None:
    """The row, locked until the end of the caller's write transaction (backends.locked_row)."""
    row = locked_row(conn, "SELECT * FROM leases WHERE name = ?", (name,), f"leases:{name}")
    return None if row is None else LeaseRow.parse(row)


def add_event(conn, name: str, event: LeaseEvent, fence: int, holder: str | None, at: float,
              detail: str | None = None) -> None:
    conn.execute(
        "INSERT INTO lease_events (name, at, event, fence, holder, detail) VALUES (?, ?, ?, ?, ?, ?)",
        (name, at, LeaseEvent(event).value, fence, holder, detail),
    )


def still_ours(conn, name: str, nonce: str, fence: int) -> bool:
    """Does the row still name holder `nonce` in epoch `fence`? The row stays locked until the end
    of the caller's transaction: no takeover commits in between."""
    row = locked_row(conn, "SELECT holder_nonce, fence FROM leases WHERE name = ?", (name,), f"leases:{name}")
    return row is not None and row["holder_nonce"] == nonce and row["fence"] == fence


def write_holder(conn, name: str, row: LeaseRow | None, me: Identity, ttl_s: float, wall: float,
                 mono: float) -> int:
    """Make `me` the holder in a new epoch (fence + 1; the row is created at fence 1). Returns
    the new fence."""
    holder = (me.host, me.boot, me.pidns, me.pid, me.start, me.nonce)
    times = (ttl_s, wall, wall, wall + ttl_s, mono)
    if row is None:
        fence = 1
        conn.execute(
            "INSERT INTO leases (name, holder_host, holder_boot, holder_pidns, holder_pid, holder_start,"
            " holder_nonce, fence, ttl_s, acquired_at, renewed_at, expires_at, renewed_mono, renewals,"
            " transitions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 1)",
            (name, *holder, fence, *times),
        )
        return fence
    fence = row.fence + 1
    conn.execute(
        "UPDATE leases SET holder_host = ?, holder_boot = ?, holder_pidns = ?, holder_pid = ?,"
        " holder_start = ?, holder_nonce = ?, fence = ?, ttl_s = ?, acquired_at = ?, renewed_at = ?,"
        " expires_at = ?, renewed_mono = ?, renewals = 0, transitions = transitions + 1"
        " WHERE name = ?",
        (*holder, fence, *times, name),
    )
    return fence


def write_renewal(conn, name: str, ttl_s: float, wall: float, mono: float) -> None:
    conn.execute(
        "UPDATE leases SET renewed_at = ?, expires_at = ?, renewed_mono = ?, renewals = renewals + 1"
        " WHERE name = ?",
        (wall, wall + ttl_s, mono, name),
    )


def clear_holder(conn, name: str, nonce: str, fence: int) -> bool:
    """Free the lease if holder `nonce` still holds it in epoch `fence` (never a successor's).
    True when it was cleared."""
    return conn.execute(
        f"UPDATE leases SET {', '.join(c + ' = NULL' for c in HOLDER_COLUMNS)}"
        " WHERE name = ? AND holder_nonce = ? AND fence = ?",
        (name, nonce, fence),
    ).rowcount > 0


# ---------------------------------------------------------------- the operator's view


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _status(row: LeaseRow, me: Identity, clock, now_wall: float | None = None) -> HolderStatus:
    return holder_status(row, me, holder_alive(row, me), clock.monotonic(),
                         clock.wall() if now_wall is None else now_wall)


def lease_rows(conn, now_wall: float | None = None, *, clock=SYSTEM_CLOCK) -> list[dict]:
    """Every lease with its state: what `ingest leases --json` prints."""
    me = Identity.current()
    now_wall = clock.wall() if now_wall is None else now_wall
    out = []
    for raw in conn.execute("SELECT * FROM leases ORDER BY name").fetchall():
        row = LeaseRow.parse(raw)
        a = _status(row, me, clock, now_wall)
        out.append({
            "name": row.name,
            "holder": row.holder_label,
            "host": row.host,
            "pid": row.pid,
            "alive": a.alive,
            "fence": row.fence,
            "state": a.state,
            "held_for": _round(now_wall - row.acquired_at) if row.held else None,
            "heartbeat_age": _round(a.heartbeat_age),
            "expires_in": _round(a.expires_in(row.ttl_s)),
            "ttl_s": row.ttl_s,
            "basis": a.basis,
            "renewals": row.renewals,
            "transitions": row.transitions,
            "acquired_at": row.acquired_at,
            "renewed_at": row.renewed_at,
        })
    return out


def lease_history(conn, name: str | None = None, limit: int = 50) -> list[dict]:
    """The last `limit` events (of one lease, or all), oldest first."""
    where, args = ("WHERE name = ?", [name]) if name else ("", [])
    rows = conn.execute(
        f"SELECT * FROM (SELECT * FROM lease_events {where} ORDER BY id DESC LIMIT ?) AS recent ORDER BY id",
        (*args, limit),
    ).fetchall()
    return [dict(r) for r in rows]


def lease_exists(conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM leases WHERE name = ?", (name,)).fetchone() is not None


def admin_release(conn, name: str, *, force: bool = False, clock=SYSTEM_CLOCK) -> str:
    """`ingest leases release`: clear the holder. Refuses (IngestError) while the holder is
    alive and renewing unless `force`. Returns the line to show the operator."""
    me = Identity.current()
    with transaction(conn):
        row = read_lease(conn, name)
        if row is None:
            raise UnknownLease(f"no lease named {name!r}")
        if not row.held:
            return f"lease {name!r} is already free (fence {row.fence})"
        a = _status(row, me, clock)
        if a.state == LeaseState.HELD and not force:
            who = "alive and renewing" if a.alive else "renewing (by its wall clock; on another host)"
            raise IngestError(
                f"lease {name!r} is held by {row.host} pid {row.pid}, {who}, "
                f"last heartbeat {a.heartbeat_age:.1f}s ago; use --force to release it anyway"
            )
        event = LeaseEvent.FORCE_RELEASED if a.state == LeaseState.HELD else LeaseEvent.RELEASED
        clear_holder(conn, name, row.nonce, row.fence)  # read in this transaction: always clears
        add_event(conn, name, event, row.fence, row.holder_label, clock.wall(),
                  f"by `ingest leases release` (pid {me.pid}); holder state was {a.state}")
    verb = "force-released" if event == LeaseEvent.FORCE_RELEASED else "released"
    return f"{verb} lease {name!r} (was {row.holder_label}, {a.state}, fence {row.fence})"
