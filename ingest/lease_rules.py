"""The lease rules as pure functions: who may take a lease now, and what state a holder is in.

No SQLite, no /proc, no clock here: the caller reads the row (ingest/lease_table.py), observes
the holder's liveness (`lease_table.holder_alive`) and passes its own monotonic (and, for display,
wall) reading. The rules (docs/leases.md):

1. Free (or no row yet): take it (`acquired`).
2. Holder on this host, boot and pid namespace, and dead: take it at once (`taken_over_dead`).
3. Holder local and alive: take it once `now - renewed_mono > ttl_s` on CLOCK_MONOTONIC, which is
   one clock per boot (`taken_over_expired`). A reading from the future falls back to rule 4.
4. Holder on another host or boot: take it only after watching its row stay unchanged (same fence,
   nonce and renewal count) for a whole TTL on our own monotonic clock (`taken_over_expired`).
"""

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the row record lives with the table; these functions only read its fields
    from .lease_table import LeaseRow
    from .procinfo import Identity

FUTURE_TOLERANCE_S = 1.0  # a local renewed_mono this far ahead of ours is not from our clock


class LeaseEvent(StrEnum):
    """What `lease_events.event` holds (the schema's CHECK lists the same values)."""

    ACQUIRED = "acquired"
    RELEASED = "released"
    TAKEN_OVER_EXPIRED = "taken_over_expired"
    TAKEN_OVER_DEAD = "taken_over_dead"
    LOST = "lost"
    FORCE_RELEASED = "force_released"


ACQUISITIONS = (LeaseEvent.ACQUIRED, LeaseEvent.TAKEN_OVER_EXPIRED, LeaseEvent.TAKEN_OVER_DEAD)


class LeaseState(StrEnum):
    """A lease as `ingest leases` shows it."""

    FREE = "free"
    HELD = "held"
    EXPIRED = "expired"
    DEAD_HOLDER = "dead-holder"


class Basis(StrEnum):
    """Which clock a holder's heartbeat age comes from."""

    MONOTONIC = "monotonic"  # a holder on this boot: exact
    WALL = "wall"            # a holder on another host or boot: an estimate from wall clocks


# ---------------------------------------------------------------- may we take it?


@dataclass(frozen=True)
class Watch:
    """A remote holder's row as we saw it: its `observed_key` and our monotonic reading then."""

    key: tuple
    since: float


@dataclass(frozen=True)
class TakeDecision:
    """`event` (with `detail`) when we may take the lease now, None to wait. `watch`: what to
    remember for the next look (None unless we are watching a remote holder's row)."""

    event: LeaseEvent | None
    detail: str | None = None
    watch: Watch | None = None

    @property
    def take(self) -> bool:
        return self.event is not None


def decide_take(row: "LeaseRow | None", me: "Identity", alive: bool | None, watch: Watch | None,
                now_mono: float) -> TakeDecision:
    """May `me` take the lease whose row is `row`? `alive`: the holder's liveness as observed on
    this host (None when it is not local); `watch`: the previous decision's; `now_mono`: our
    CLOCK_MONOTONIC."""
    if row is None or not row.held:
        return TakeDecision(LeaseEvent.ACQUIRED)
    if row.nonce == me.nonce:
        # our own row that we no longer track (a release that failed): start a new epoch
        return TakeDecision(LeaseEvent.ACQUIRED, "own stale row")
    if me.is_local(row.host, row.boot, row.pidns):
        if not alive:
            return _takeover(row, LeaseEvent.TAKEN_OVER_DEAD, f"pid {row.pid} is not running (or is another process now)")
        age = now_mono - row.renewed_mono
        if age > row.ttl_s:
            return _takeover(row, LeaseEvent.TAKEN_OVER_EXPIRED,
                             f"no renewal for {age:.1f}s (monotonic), ttl {row.ttl_s:g}s")
        if age >= -FUTURE_TOLERANCE_S:
            return TakeDecision(None, watch=watch)
        # a reading from the future cannot come from this boot's clock: fall back to watching
    key = row.observed_key
    if watch is None or watch.key != key:
        return TakeDecision(None, watch=Watch(key, now_mono))
    unchanged = now_mono - watch.since
    if unchanged > row.ttl_s:
        return _takeover(row, LeaseEvent.TAKEN_OVER_EXPIRED,
                         f"row unchanged for {unchanged:.1f}s (observed), ttl {row.ttl_s:g}s")
    return TakeDecision(None, watch=watch)


def _takeover(row: "LeaseRow", event: LeaseEvent, why: str) -> TakeDecision:
    return TakeDecision(event, f"from {row.holder_label} (fence {row.fence}): {why}")


# ---------------------------------------------------------------- what state is it in?


@dataclass(frozen=True)
class HolderStatus:
    """One look at a lease row for display and admin release (acquiring uses `decide_take`)."""

    state: LeaseState
    alive: bool | None            # None: holder on another host/boot, cannot tell
    heartbeat_age: float | None
    basis: Basis | None

    def expires_in(self, ttl_s: float) -> float | None:
        if self.state == LeaseState.FREE:
            return None
        if self.state in (LeaseState.EXPIRED, LeaseState.DEAD_HOLDER):
            return 0.0
        return max(0.0, ttl_s - self.heartbeat_age)


def holder_status(row: "LeaseRow", me: "Identity", alive: bool | None, now_mono: float,
                  now_wall: float) -> HolderStatus:
    """The state of `row` seen by `me`: exact (monotonic) for a local holder, a wall-clock
    estimate for a remote one. `alive` as for `decide_take`."""
    if not row.held:
        return HolderStatus(LeaseState.FREE, None, None, None)
    if me.is_local(row.host, row.boot, row.pidns):
        age = now_mono - row.renewed_mono
        if not alive:
            return HolderStatus(LeaseState.DEAD_HOLDER, False, age, Basis.MONOTONIC)
        return HolderStatus(_held_or_expired(age, row.ttl_s), True, age, Basis.MONOTONIC)
    age = now_wall - row.renewed_at
    return HolderStatus(_held_or_expired(age, row.ttl_s), None, age, Basis.WALL)


def _held_or_expired(age: float, ttl_s: float) -> LeaseState:
    return LeaseState.EXPIRED if age > ttl_s else LeaseState.HELD
