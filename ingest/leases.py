"""Leases: a named row in SQLite that one process holds while it keeps renewing it.

A lease replaces a lock that could outlive its holder. The rules (docs/leases.md):

* Acquire succeeds when the row is free; held by a dead process on this host (pid gone, or the
  pid now belongs to a process with another start time): at once; or expired.
* Expiry is never judged by the wall clock. A holder on this boot stored its CLOCK_MONOTONIC
  reading at each renewal, and CLOCK_MONOTONIC is system-wide, so we compare readings directly.
  A holder on another host or boot is expired only after we have watched its row stay unchanged
  (same fence, nonce and renewal count) for a whole TTL on our own monotonic clock.
* Every change of holder adds 1 to the fencing token. `fenced(conn)` checks, inside the caller's
  write transaction, that we still hold the lease with our token: a paused or partitioned old
  holder can never write after a takeover.
"""

import logging
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator

from . import procinfo
from .clock import SYSTEM_CLOCK
from .errors import EXIT_LEASE_LOST, ConfigError, IngestError
from .lease_table import CorruptLease, LeaseRow, add_event, lease_history, lease_rows, read_lease  # noqa: F401
from .procinfo import Identity
from .settings import parse, setting
from .store import connect, open_db, transaction

log = logging.getLogger("ingest.leases")

MAX_TTL_S = 600.0  # a dead holder on another host blocks work for at most this long
RELEASE_JOIN_S = 5.0
# release() runs on shutdown paths: wait for the write lock briefly, then leave the row to the
# dead-holder / TTL rules rather than stall the exit
RELEASE_BUSY_MS = 1_000
RELEASE_ATTEMPTS = 2


@dataclass(frozen=True)
class LeaseTiming:
    """ttl_s: how long a holder that stops renewing keeps the lease. renew_s: heartbeat period.
    retry_s: how often a contender looks again. ttl >= 2 x renew, so one late heartbeat never
    loses the lease; renew >= 2 x retry, so a failed renewal is retried before the next one."""

    ttl_s: float = setting(30.0, "a holder that stops renewing keeps the lease this long", above=0, max=600)
    renew_s: float = setting(10.0, "heartbeat period", above=0)
    retry_s: float = setting(2.0, "how often a contender looks again", above=0)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"lease {f.name} must be a positive number of seconds, not {value!r}")
        if self.ttl_s > MAX_TTL_S:
            raise ConfigError(f"lease ttl_s ({self.ttl_s}) must be at most {MAX_TTL_S:g} s")
        if self.ttl_s < 2 * self.renew_s:
            raise ConfigError(f"lease ttl_s ({self.ttl_s}) must be at least 2 x renew_s ({self.renew_s})")
        if self.renew_s < 2 * self.retry_s:
            raise ConfigError(f"lease renew_s ({self.renew_s}) must be at least 2 x retry_s ({self.retry_s})")

    @classmethod
    def from_config(cls, config: dict) -> "LeaseTiming":
        """From the [leases] section (ttl_s, renew_s, retry_s); missing keys keep the defaults."""
        return parse(cls, (config or {}).get("leases"), "leases")


class LeaseLost(IngestError):
    """Another process holds our lease now (or it was released): stop working."""

    exit_code = EXIT_LEASE_LOST


class Lease:
    """One process's claim on the lease `name`. Not shared between processes; one object may be
    used from the worker's thread and its own heartbeat thread."""

    def __init__(self, db_path, name: str, timing: LeaseTiming = LeaseTiming(), clock=SYSTEM_CLOCK,
                 *, identity: Identity | None = None):
        if not isinstance(name, str) or not name:
            raise ConfigError("a lease name must be non-empty text")
        self.db_path = db_path
        self.name = name
        self.timing = timing
        self.clock = clock
        self.me = identity or Identity.current()  # tests pass a foreign identity
        self.lost = threading.Event()
        self._fence: int | None = None           # set while we believe we hold the lease
        self._conn = None
        self._observed: tuple | None = None      # (row key, our monotonic when first seen)
        self._lost_recorded = False
        self._lost_lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_stop = threading.Event()
        self._local = threading.local()          # per thread: depth of our open transactions
        self._release_pending = False

    def __repr__(self):
        return f"<Lease {self.name!r} fence={self._fence} holder={self.me.label}>"

    # ------------------------------------------------------------ acquiring

    def try_acquire(self) -> bool:
        """One attempt, never waits for the lease. True when we hold it afterwards."""
        if self.held:
            return True
        try:
            with self._own_transaction(self._connection()) as conn:
                row = read_lease(conn, self.name)
                how = self._may_take(row)
                if how is None:
                    return False
                event, detail = how
                # set before the commit: a release() deferred to the commit must see it
                self._fence = self._take(conn, row, event, detail)
                self._observed = None
                with self._lost_lock:
                    self._lost_recorded = False
                    self.lost.clear()
        except BaseException:
            self._fence = None
            raise
        if self._fence is None:  # a signal asked for release during the attempt
            return False
        log.info("lease %s %s, fence %d%s", self.name, event, self._fence, f" ({detail})" if detail else "")
        return True

    def acquire(self, stop: threading.Event | None = None, timeout: float | None = None) -> bool:
        """Wait for the lease, looking every retry_s. False if `stop` is set or `timeout` passes."""
        deadline = None if timeout is None else self.clock.monotonic() + timeout
        while True:
            if stop is not None and stop.is_set():
                return False
            if self.try_acquire():
                return True
            wait = self.timing.retry_s
            if deadline is not None:
                left = deadline - self.clock.monotonic()
                if left <= 0:
                    return False
                wait = min(wait, left)
            if self.clock.sleep(wait, stop):
                return False

    def _may_take(self, row: LeaseRow | None) -> tuple[str, str | None] | None:
        """(event, detail) when we may take the lease now, else None."""
        if row is None or not row.held:
            return ("acquired", None)
        if row.nonce == self.me.nonce:
            # our own row that we no longer track (a release that failed): start a new epoch
            return ("acquired", "own stale row")
        now = self.clock.monotonic()
        if self.me.is_local(row.host, row.boot, row.pidns):
            if not procinfo.is_alive(row.pid, row.start):
                return ("taken_over_dead", f"pid {row.pid} is not running (or is another process now)")
            age = now - row.renewed_mono
            if age > row.ttl_s:
                return ("taken_over_expired", f"no renewal for {age:.1f}s (monotonic), ttl {row.ttl_s:g}s")
            if age >= -1.0:
                return None
            # a reading from the future cannot come from this boot's clock: fall back to watching
        key = row.observed_key
        if self._observed is None or self._observed[0] != key:
            self._observed = (key, now)
            return None
        unchanged = now - self._observed[1]
        if unchanged > row.ttl_s:
            return ("taken_over_expired", f"row unchanged for {unchanged:.1f}s (observed), ttl {row.ttl_s:g}s")
        return None

    def _take(self, conn, row: LeaseRow | None, event: str, detail: str | None) -> int:
        me, wall, mono, ttl = self.me, self.clock.wall(), self.clock.monotonic(), self.timing.ttl_s
        holder = (me.host, me.boot, me.pidns, me.pid, me.start, me.nonce)
        times = (ttl, wall, wall, wall + ttl, mono)
        if row is None:
            fence = 1
            conn.execute(
                "INSERT INTO leases (name, holder_host, holder_boot, holder_pidns, holder_pid, holder_start,"
                " holder_nonce, fence, ttl_s, acquired_at, renewed_at, expires_at, renewed_mono, renewals,"
                " transitions) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 1)",
                (self.name, *holder, fence, *times),
            )
        else:
            fence = row.fence + 1
            conn.execute(
                "UPDATE leases SET holder_host = ?, holder_boot = ?, holder_pidns = ?, holder_pid = ?,"
                " holder_start = ?, holder_nonce = ?, fence = ?, ttl_s = ?, acquired_at = ?, renewed_at = ?,"
                " expires_at = ?, renewed_mono = ?, renewals = 0, transitions = transitions + 1"
                " WHERE name = ?",
                (*holder, fence, *times, self.name),
            )
            if row.held and event != "acquired":
                detail = f"from {row.holder_label} (fence {row.fence}): {detail}"
        add_event(conn, self.name, event, fence, me.label, wall, detail)
        return fence

    # ------------------------------------------------------------ holding

    @property
    def fence(self) -> int:
        """Our fencing token while we hold the lease."""
        fence = self._fence
        if fence is None:
            raise LeaseLost(f"lease {self.name!r} is not held by this process")
        return fence

    @property
    def held(self) -> bool:
        return self._fence is not None and not self.lost.is_set()

    def check(self) -> None:
        """Raise LeaseLost once the loss is noticed (workers call it between steps)."""
        if self.lost.is_set():
            raise LeaseLost(f"lease {self.name!r} was lost (fence {self._fence}): another process holds it now")
        if self._fence is None:
            raise LeaseLost(f"lease {self.name!r} is not held by this process")

    def renew(self) -> bool:
        """Renew once on our own connection. False (and `lost` set) when the row is not ours."""
        return self._renew_on(self._connection())

    def _renew_on(self, conn) -> bool:
        fence = self._fence
        if fence is None or self.lost.is_set():
            return False
        with self._own_transaction(conn):
            row = conn.execute(
                "SELECT holder_nonce, fence FROM leases WHERE name = ?", (self.name,)
            ).fetchone()
            if row is not None and row["holder_nonce"] == self.me.nonce and row["fence"] == fence:
                wall = self.clock.wall()
                conn.execute(
                    "UPDATE leases SET renewed_at = ?, expires_at = ?, renewed_mono = ?, renewals = renewals + 1"
                    " WHERE name = ?",
                    (wall, wall + self.timing.ttl_s, self.clock.monotonic(), self.name),
                )
                return True
            self._record_lost(conn, fence, "renewal found the row changed")
        self._set_lost("renewal found the row changed")
        return False

    def start_heartbeat(self) -> None:
        """Renew every renew_s from a daemon thread with its own connection."""
        self.fence  # raises unless held
        if self._heartbeat is not None and self._heartbeat.is_alive():
            return
        self._heartbeat_stop = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._heartbeat_loop, args=(self._heartbeat_stop,),
            name=f"lease-heartbeat-{self.name}", daemon=True,
        )
        self._heartbeat.start()

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        try:
            conn = connect(self.db_path)
        except IngestError as e:
            self._set_lost(f"heartbeat cannot open the database: {e}")
            return
        last_ok = self.clock.monotonic()
        wait = self.timing.renew_s
        try:
            while not self.clock.sleep(wait, stop):
                try:
                    if not self._renew_on(conn):
                        return
                    last_ok, wait = self.clock.monotonic(), self.timing.renew_s
                except Exception as e:  # busy, I/O, corrupt row: keep trying until the TTL runs out
                    silent = self.clock.monotonic() - last_ok
                    log.warning("lease %s renewal failed (%.1fs since the last one): %s", self.name, silent, e)
                    if silent > self.timing.ttl_s:
                        # others may take it from now on; stop before they do (fenced writes would refuse anyway)
                        self._set_lost(f"could not renew for {silent:.1f}s, longer than the ttl")
                        return
                    wait = self.timing.retry_s
        finally:
            conn.close()

    @contextmanager
    def fenced(self, conn) -> Iterator:
        """A write transaction (BEGIN IMMEDIATE) on the caller's connection that commits only if we
        still hold the lease with our fencing token, checked inside the same transaction."""
        self.check()
        fence = self._fence
        refused = False
        with self._own_transaction(conn):
            row = conn.execute("SELECT holder_nonce, fence FROM leases WHERE name = ?", (self.name,)).fetchone()
            if row is None or row["holder_nonce"] != self.me.nonce or row["fence"] != fence:
                refused = True
            else:
                yield conn
        if refused:  # the transaction was empty; record the loss in one of its own
            with self._own_transaction(conn):
                self._record_lost(conn, fence, "a fenced write was refused")
            self._set_lost("a fenced write was refused")
            raise LeaseLost(f"lease {self.name!r} is held by another process now (our fence {fence}): write refused")

    def _record_lost(self, conn, fence: int, why: str) -> None:
        """Append one 'lost' event per epoch (heartbeat and fenced write may both notice).
        Called inside a write transaction."""
        with self._lost_lock:
            if self._lost_recorded:
                return
            self._lost_recorded = True
        try:
            now = read_lease(conn, self.name)
            why += f"; now {now.holder_label or 'free'} (fence {now.fence})" if now else "; row gone"
        except CorruptLease:
            why += "; row is corrupt"
        add_event(conn, self.name, "lost", fence, self.me.label, self.clock.wall(), why)

    def _set_lost(self, why: str) -> None:
        if not self.lost.is_set():
            log.warning("lease %s lost (fence %s): %s", self.name, self._fence, why)
        self.lost.set()

    # ------------------------------------------------------------ releasing

    def release(self) -> None:
        """Clear the holder so the next contender takes over at once. Idempotent; never raises.

        Safe from a signal handler: if the signal interrupted one of our own transactions on this
        thread, the release runs as soon as that transaction ends (doing it now would wait on our
        own write lock)."""
        if getattr(self._local, "depth", 0) > 0:
            self._release_pending = True
            return
        self._release_pending = False
        fence, self._fence = self._fence, None
        self._stop_heartbeat()
        if fence is None:
            return
        try:
            conn = connect(self.db_path, busy_timeout_ms=RELEASE_BUSY_MS)
            try:
                with transaction(conn, attempts=RELEASE_ATTEMPTS):
                    cleared = conn.execute(
                        "UPDATE leases SET holder_host = NULL, holder_boot = NULL, holder_pidns = NULL,"
                        " holder_pid = NULL, holder_start = NULL, holder_nonce = NULL"
                        " WHERE name = ? AND holder_nonce = ? AND fence = ?",
                        (self.name, self.me.nonce, fence),
                    ).rowcount
                    if cleared:
                        add_event(conn, self.name, "released", fence, self.me.label, self.clock.wall())
            finally:
                conn.close()
            if cleared:
                log.info("lease %s released, fence %d", self.name, fence)
        except Exception as e:  # shutting down: the TTL / dead-holder rule will free it anyway
            log.warning("lease %s could not be released: %s", self.name, e)

    def _stop_heartbeat(self) -> None:
        self._heartbeat_stop.set()
        thread = self._heartbeat
        if thread is not None and thread is not threading.current_thread():
            thread.join(RELEASE_JOIN_S)

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Lease":
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _connection(self):
        if self._conn is None:
            self._conn = open_db(self.db_path)
        return self._conn

    @contextmanager
    def _own_transaction(self, conn):
        """store.transaction, counting depth so a signal-driven release() can tell it must wait."""
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            with transaction(conn):
                yield conn
        finally:
            self._local.depth -= 1
            if self._local.depth == 0 and self._release_pending:
                self.release()
