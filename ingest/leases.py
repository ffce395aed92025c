"""Leases: a named row in the state store (SQLite or PostgreSQL) that one process holds while it
keeps renewing it.

A lease replaces a lock that could outlive its holder (docs/leases.md). This module is the
process side: `LeaseTiming`, and `Lease` (acquire, heartbeat thread, fenced writes, release).
Who may take a lease is decided by `lease_rules.decide_take` (pure: free, dead local holder, or
expired by CLOCK_MONOTONIC / by a TTL of observed silence; never by the wall clock); every
statement on the rows is in `lease_table`.

Every change of holder adds 1 to the fencing token. `fenced(conn)` checks, inside the caller's
write transaction, that we still hold the lease with our token: a paused or partitioned old
holder can never write after a takeover.
"""

import logging
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator

from .backends import open_store, transaction
from .clock import SYSTEM_CLOCK
from .errors import EXIT_LEASE_LOST, ConfigError, DiskFull, IngestError
from .lease_rules import LeaseEvent, Watch, decide_take
from .lease_table import (CorruptLease, add_event, clear_holder, holder_alive, read_lease, still_ours, write_holder,
                          write_renewal)
from .procinfo import Identity
from .settings import parse, setting

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
    used from the worker's thread and its own heartbeat thread.

    A worker calls `check()` between steps (it raises LeaseLost once the loss is noticed) and
    does every data write inside `fenced(conn)`. `lost` is the threading.Event behind `check()`;
    `wait_lost()` blocks on it."""

    def __init__(self, db, name: str, timing: LeaseTiming = LeaseTiming(), clock=SYSTEM_CLOCK,
                 *, identity: Identity | None = None):
        """`db`: what open_store takes (an SQLite path, a PostgreSQL URL) or a Store."""
        if not isinstance(name, str) or not name:
            raise ConfigError("a lease name must be non-empty text")
        self.store = open_store(db)
        self.name = name
        self.timing = timing
        self.clock = clock
        self.me = identity or Identity.current()  # tests pass a foreign identity
        self.lost = threading.Event()
        self._fence: int | None = None           # set while we believe we hold the lease
        self._conn = None
        self._watch: Watch | None = None         # a remote holder's row we are watching
        self._lost_recorded = False
        self._lost_lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_stop = threading.Event()

    def __repr__(self):
        return f"<Lease {self.name!r} fence={self._fence} holder={self.me.label}>"

    # ------------------------------------------------------------ acquiring

    def try_acquire(self) -> bool:
        """One attempt, never waits for the lease. True when we hold it afterwards."""
        if self.held:
            return True
        conn = self._connection()
        with transaction(conn):
            row = read_lease(conn, self.name)
            decision = decide_take(row, self.me, holder_alive(row, self.me), self._watch, self.clock.monotonic())
            self._watch = decision.watch
            if not decision.take:
                return False
            wall = self.clock.wall()
            fence = write_holder(conn, self.name, row, self.me, self.timing.ttl_s, wall, self.clock.monotonic())
            add_event(conn, self.name, decision.event, fence, self.me.label, wall, decision.detail)
        with self._lost_lock:
            self._lost_recorded = False
            self.lost.clear()
        self._fence = fence
        log.info("lease %s %s, fence %d%s", self.name, decision.event, fence,
                 f" ({decision.detail})" if decision.detail else "")
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
        """Raise LeaseLost once the loss is noticed, or when the lease is not held (workers call
        it between steps)."""
        if self.lost.is_set():
            raise LeaseLost(f"lease {self.name!r} was lost (fence {self._fence}): another process holds it now")
        if self._fence is None:
            raise LeaseLost(f"lease {self.name!r} is not held by this process")

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Block until the loss is noticed (True) or `timeout` passes (False)."""
        return self.lost.wait(timeout)

    def renew(self) -> bool:
        """Renew once on our own connection. False (and `lost` set) when the row is not ours."""
        return self._renew_on(self._connection())

    def _renew_on(self, conn) -> bool:
        fence = self._fence
        if fence is None or self.lost.is_set():
            return False
        with transaction(conn):
            if still_ours(conn, self.name, self.me.nonce, fence):
                write_renewal(conn, self.name, self.timing.ttl_s, self.clock.wall(), self.clock.monotonic())
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
            conn = self.store.connect()
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
                    # a full disk is the worker's to report, once per episode (its disk-full wait);
                    # a line per retry here would repeat it
                    level = logging.DEBUG if isinstance(e, DiskFull) else logging.WARNING
                    log.log(level, "lease %s renewal failed (%.1fs since the last one): %s", self.name, silent, e)
                    if silent > self.timing.ttl_s:
                        # others may take it from now on; stop before they do (fenced writes would refuse anyway)
                        why = f"could not renew for {silent:.1f}s, longer than the ttl"
                        self._record_lost_apart(why)
                        self._set_lost(why)
                        return
                    wait = self.timing.retry_s
        finally:
            conn.close()

    @contextmanager
    def fenced(self, conn) -> Iterator:
        """A write transaction on the caller's connection that commits only if we still hold the
        lease with our fencing token, checked inside the same transaction (SQLite: BEGIN
        IMMEDIATE; PostgreSQL: the lease row locked until the commit, so no takeover commits
        between the check and our writes)."""
        self.check()
        fence = self._fence
        refused = False
        with transaction(conn):
            if still_ours(conn, self.name, self.me.nonce, fence):
                yield conn
            else:
                refused = True
        if refused:  # the transaction was empty; record the loss in one of its own
            with transaction(conn):
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
        add_event(conn, self.name, LeaseEvent.LOST, fence, self.me.label, self.clock.wall(), why)

    def _record_lost_apart(self, why: str) -> None:
        """Best effort: the 'lost' event on a connection of its own (the heartbeat's may be the
        one that failed: a server that closed it, a busy or full file). Never raises."""
        fence = self._fence
        if fence is None:
            return
        try:
            conn = self.store.connect(busy_timeout_ms=RELEASE_BUSY_MS)
            try:
                with transaction(conn, attempts=RELEASE_ATTEMPTS):
                    self._record_lost(conn, fence, why)
            finally:
                conn.close()
        except Exception as e:
            log.debug("lease %s: could not record the loss: %s", self.name, e)

    def _set_lost(self, why: str) -> None:
        if not self.lost.is_set():
            log.warning("lease %s lost (fence %s): %s", self.name, self._fence, why)
        self.lost.set()

    # ------------------------------------------------------------ releasing

    def release(self) -> None:
        """Clear the holder so the next contender takes over at once. Idempotent; never raises.

        Call it on the way out, not from a signal handler: a handler that interrupted a write
        transaction on this thread would wait on that transaction's own lock (it gives up after
        ~2 s and leaves the row to the dead-holder rule)."""
        fence, self._fence = self._fence, None
        self._stop_heartbeat()
        if fence is None:
            return
        try:
            conn = self.store.connect(busy_timeout_ms=RELEASE_BUSY_MS)
            try:
                with transaction(conn, attempts=RELEASE_ATTEMPTS):
                    cleared = clear_holder(conn, self.name, self.me.nonce, fence)
                    if cleared:
                        add_event(conn, self.name, LeaseEvent.RELEASED, fence, self.me.label, self.clock.wall())
            finally:
                conn.close()
            if cleared:
                log.info("lease %s released, fence %d", self.name, fence)
        except Exception as e:  # shutting down: the TTL / dead-holder rule will free it anyway
            log.warning("lease %s could not be released: %s", self.name, e)

    def abandon(self) -> None:
        """Stop heartbeating and forget the fence, writing nothing: for a process whose database
        path no longer names the file it opened (a release would write into another file, or
        create one). The TTL frees the row in the file that is at the path, if it is ours."""
        self._fence = None
        self._stop_heartbeat()

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
            self._conn = self.store.open()
        return self._conn
