"""The token ledger: one row per Keepa account in the state store, shared by every process that
calls Keepa.

The model (Keepa's bucket, the `Account` row and its projection, the policy, the records) is
ingest/token_model.py; how the row changes is ingest/token_transitions.py (pure functions); who
goes first while tokens are scarce is ingest/sharing.py. This module is the row's I/O: each
operation (reserve / try_reserve, settle, release, rate_limited, sync) is one write transaction:
load (locked), transition, store. A reservation moves tokens from `balance` to `in_flight`; the
server balance S is unchanged until the server charges.

Every read-then-write is one write transaction that reads the account row with
backends.locked_row (SQLite: inside BEGIN IMMEDIATE; PostgreSQL: the row locked FOR UPDATE): two
processes can never both see the same tokens. Open reservations live in the same row (`holds`:
per process, worker and minute, a count, a cost and the newest reservation's time), so a
reservation reads and writes one row, one page. On SQLite, BEGIN is retried by the ledger itself
with short jittered sleeps (store.Spin) on a busy_timeout = 0 connection (ledger_connection):
fair under contention; PostgreSQL grants row locks in order of arrival.
Each server envelope resets S (the server is the authority):
balance = tokensLeft - in_flight of the reservations still open. When another process's call was
already charged but not yet settled, that under-counts the balance by its cost until it settles:
the error is always on the side of waiting, never of a 429.
"""

import itertools
import json
import os
import threading
from dataclasses import replace

from .backends import backend_of, open_store
from .clock import SYSTEM_CLOCK
from .procinfo import start_time
from .sharing import clear_waiting
from .store import Spin
from .token_costs import estimate_cost, learn_cost, unit_cost
from .token_model import Account, LedgerPolicy, Refusal, Reservation
from .token_transitions import admit, apply_envelope, expire_holds, rate_limited, refunded, settled, slot_for

SPIN = Spin(first_s=100e-6, max_s=2e-3)  # bench/ledger.py --spin: fewer wake-ups than 20-500 µs, as fair in p99
PURGE_EVERY_S = 5.0
CHECKPOINT_EVERY = 1000  # commits, on an SQLite connection without autocheckpoint (ledger_connection)
_IDS = itertools.count(1)  # reservation ids, unique in the process


class Stopped(Exception):
    """The stop event was set while waiting for tokens (SIGTERM): leave quietly."""


_json = json.JSONEncoder(separators=(",", ":")).encode  # compact; built once (json.dumps builds one per call)


def ledger_connection(db):
    """A migrated connection for a Ledger of its own (what open_keepa uses), tuned by the store's
    backend: on SQLite busy_timeout = 0 (SPIN waits) and no automatic checkpoint (the Ledger
    checkpoints every CHECKPOINT_EVERY commits); see ingest/backends/sqlite.py for why."""
    return open_store(db).ledger_connection()


def _holder() -> str:
    pid = os.getpid()
    return f"{pid}.{start_time(pid) or 0}"  # the start time tells a reused pid from the old process


class Ledger:
    """One account's row, for one process. It closes only the reservations it handed out, once
    each (`_open`): closing one twice, or one from another Ledger, changes no slot."""

    def __init__(self, conn, account: str, policy: LedgerPolicy | None = None, clock=SYSTEM_CLOCK):
        self.conn = conn
        self.account = account
        self.policy = policy or LedgerPolicy()
        self.clock = clock
        self._next_purge = float("-inf")
        self._holder = _holder()
        self._open: set[int] = set()  # ids of the reservations this Ledger made and has not closed
        self._db = backend_of(conn)
        self._key = f"token_accounts:{account}"  # what locks the row before it exists
        self._commits_left = self._db.checkpoint_every(conn, CHECKPOINT_EVERY)  # None: the store checkpoints

    def _committed(self) -> None:
        """After each write transaction: a checkpoint every CHECKPOINT_EVERY commits when the
        connection does not checkpoint automatically (SQLite's passive one never waits)."""
        if self._commits_left is None:
            return
        self._commits_left -= 1
        if self._commits_left <= 0:
            self._commits_left = CHECKPOINT_EVERY
            self._db.checkpoint(self.conn)

    # ------------------------------------------------------------------ reading

    def load(self) -> Account | None:
        """The row as stored (not projected); locked until the commit inside a write transaction."""
        if self.conn.in_transaction:
            row = self._db.locked_row(self.conn, self._SELECT, (self.account,), self._key)
        else:
            row = self._db.read(self.conn, SPIN, lambda: self.conn.execute(self._SELECT, (self.account,)).fetchone())
        return Account.from_row(row) if row is not None else None

    def state(self) -> Account | None:
        """The row projected to now."""
        account = self.load()
        return account.projected(self.clock.wall()) if account else None

    def needs_sync(self) -> bool:
        account = self.load()
        return account is None or account.synced_at is None or (
            self.clock.wall() - account.synced_at > self.policy.stale_after_s
        )

    def estimate(self, kind: str, units: int) -> float:
        return self._db.read(self.conn, SPIN, estimate_cost, self.conn, self.account, kind, units)

    def unit_cost(self, kind: str) -> float:
        """The learned cost of one unit (page, ASIN) of `kind`."""
        return self._db.read(self.conn, SPIN, unit_cost, self.conn, self.account, kind)

    # ------------------------------------------------------------------ server envelopes

    def claim_token_sync(self, force: bool = False) -> bool:
        """Take the right to make the free /token call: at most one per account per minute."""
        now = self.clock.wall()
        with self._db.transaction(self.conn, spin=SPIN):
            row = self._db.locked_row(self.conn, "SELECT token_synced_at FROM token_accounts WHERE account = ?",
                                      (self.account,), self._key)
            if row and row[0] is not None and now - row[0] < self.policy.token_sync_every_s and not force:
                return False
            if row:
                self.conn.execute(
                    "UPDATE token_accounts SET token_synced_at = ? WHERE account = ?", (now, self.account)
                )
        return True

    def sync(self, envelope, *, from_token_call: bool = False) -> Account:
        """Apply an envelope that settles no reservation (a /token call)."""
        now = self.clock.wall()
        with self._db.transaction(self.conn, spin=SPIN):
            account = apply_envelope(self._load_for_update(now), envelope, now, self.account)
            if from_token_call:
                account = replace(account, token_synced_at=now)
            self._store(account)
        return account

    def _load_for_update(self, now: float) -> Account | None:
        """The row projected to `now`, inside the caller's transaction; a crashed holder's
        reservations are looked for every few seconds."""
        account = self.load()
        if account is None:
            return None
        if now >= self._next_purge:
            self._next_purge = now + PURGE_EVERY_S
            account = expire_holds(account, now, self.policy)
        return account.projected(now)

    _COLUMNS = ("balance", "in_flight", "as_of", "refill_rate", "flow_reduction", "next_tick", "server_ts",
                "synced_at", "token_synced_at", "blocked_until", "rate_limited", "workers", "holds")
    _SELECT = f"SELECT account, {', '.join(_COLUMNS)} FROM token_accounts WHERE account = ?"
    _UPDATE = f"UPDATE token_accounts SET {', '.join(c + ' = ?' for c in _COLUMNS)} WHERE account = ?"
    _INSERT = f"INSERT INTO token_accounts (account, {', '.join(_COLUMNS)}) VALUES (?{', ?' * len(_COLUMNS)})"
    # what a reservation (or a refusal) can change: the hot path writes only these
    _UPDATE_HOT = ("UPDATE token_accounts SET balance = ?, in_flight = ?, as_of = ?, next_tick = ?, workers = ?,"
                   " holds = ? WHERE account = ?")

    def _store(self, a: Account) -> None:
        # A plain UPDATE of unindexed columns dirties one page (an upsert also touches the key index).
        values = [getattr(a, c) for c in self._COLUMNS[:-2]] + [_json(a.workers), _json(a.holds)]
        if self.conn.execute(self._UPDATE, (*values, a.account)).rowcount == 0:
            self.conn.execute(self._INSERT, (a.account, *values))

    def _store_hot(self, a: Account) -> None:
        self.conn.execute(self._UPDATE_HOT, (a.balance, a.in_flight, a.as_of, a.next_tick,
                                             _json(a.workers), _json(a.holds), a.account))

    # ------------------------------------------------------------------ reserving

    def reserve(self, cost: float, worker: str, kind: str = "call", *, units: int = 0,
                stop: threading.Event | None = None) -> Reservation:
        """Wait (interruptibly) until the ledger admits `cost` for `worker`, then hold it."""
        try:
            while True:
                outcome = self.try_reserve(cost, worker, kind, units=units, waiting=True)
                if isinstance(outcome, Reservation):
                    return outcome
                wait = min(max(outcome.wait_s, self.policy.min_wait_s), self.policy.max_wait_s)
                if (stop is not None and stop.is_set()) or self.clock.sleep(wait, stop):
                    raise Stopped(f"stopped while waiting for {cost:g} tokens ({outcome.reason})")
        except BaseException:
            self._clear_waiting(worker)
            raise

    def try_reserve(self, cost: float, worker: str, kind: str = "call", *, units: int = 0,
                    waiting: bool = False) -> "Reservation | Refusal":
        """One atomic attempt: a Reservation, or a Refusal saying how long to wait and why.
        `waiting=True` (what reserve() passes) marks the worker as waiting, so sharing counts it
        as busy until it is admitted or stops."""
        now = self.clock.wall()
        slot = slot_for(self._holder, worker, now)
        with self._db.transaction(self.conn, spin=SPIN):
            admission = admit(self._load_for_update(now), cost, worker, kind, slot, now, self.policy,
                              waiting=waiting)
            self._store_hot(admission.account)
        self._committed()
        if admission.refusal is not None:
            return admission.refusal
        reservation = Reservation(next(_IDS), self.account, worker, kind, cost, units, slot)
        self._open.add(reservation.id)
        return reservation

    def _clear_waiting(self, worker: str) -> None:
        try:
            with self._db.transaction(self.conn, spin=SPIN):
                account = self.load()
                if account is not None and worker in account.workers:
                    self._store(replace(account, workers=clear_waiting(account.workers, worker)))
        except Exception:  # best effort: a stale waiter is ignored after waiter_stale_s anyway
            pass

    # ------------------------------------------------------------------ settling

    def settle(self, reservation: Reservation, envelope=None, *, call=None) -> Account:
        """The call was made: replace the estimate by what the server charged and resync from its
        envelope (token_transitions.settled); learn the cost per unit; log the call."""
        now = self.clock.wall()
        with self._db.transaction(self.conn, spin=SPIN):
            account = settled(self._load_for_update(now), reservation, envelope, now, self.policy,
                              held=reservation.id in self._open)
            consumed = envelope.tokens_consumed if envelope is not None else None
            if consumed is not None and reservation.units and envelope.status == 200:
                learn_cost(self.conn, self.account, reservation.kind, consumed / reservation.units, now)
            self._store(account)
            if call is not None:
                call.insert(self.conn, self.account)
        self._open.discard(reservation.id)
        self._committed()
        return account

    def release(self, reservation: Reservation) -> None:
        """The call was never made (stopped before sending): give the tokens back."""
        now = self.clock.wall()
        with self._db.transaction(self.conn, spin=SPIN):
            self._store(refunded(self._load_for_update(now), reservation, now, self.policy,
                                 held=reservation.id in self._open))
        self._open.discard(reservation.id)
        self._committed()

    def rate_limited(self, reservation: Reservation, envelope, *, call=None) -> Account:
        """A 429: it cost nothing. Store the server's balance and hold everyone until the
        projected balance is positive again (token_transitions.rate_limited)."""
        now = self.clock.wall()
        with self._db.transaction(self.conn, spin=SPIN):
            account = rate_limited(self._load_for_update(now), reservation, envelope, now, self.policy,
                                   held=reservation.id in self._open)
            self._store(account)
            if call is not None:
                call.insert(self.conn, self.account)
        self._open.discard(reservation.id)
        self._committed()
        return account

    # ------------------------------------------------------------------ test and bench helpers

    def set_state(self, *, balance: float, refill_rate: float, next_tick: float, synced_at: float | None = None,
                  blocked_until: float | None = None, flow_reduction: float = 0.0) -> None:
        """Write the row directly (tests, benches, `ingest tokens` never)."""
        now = self.clock.wall()
        with self._db.transaction(self.conn, spin=SPIN):
            old = self.load()  # open reservations are dropped with the rest
            self._store(Account(
                account=self.account, balance=balance, in_flight=0.0, as_of=now, refill_rate=refill_rate,
                flow_reduction=flow_reduction, next_tick=next_tick, server_ts=None,
                synced_at=now if synced_at is None else synced_at,
                token_synced_at=old.token_synced_at if old else None, blocked_until=blocked_until,
                rate_limited=old.rate_limited if old else 0))
