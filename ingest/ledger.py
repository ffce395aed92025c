"""The token ledger: one row per Keepa account in SQLite, shared by every process that calls Keepa.

The model (Keepa's bucket, the `Account` row and its projection, the policy, the records) is
ingest/token_model.py; who goes first while tokens are scarce is ingest/sharing.py. This module
is the row's I/O and the operations on it: reserve / try_reserve, settle, release, rate_limited,
sync. A reservation moves tokens from `balance` to `in_flight`; the server balance S is
unchanged until the server charges.

Every read-then-write is one `BEGIN IMMEDIATE` transaction (store.transaction): two processes can
never both see the same tokens. Open reservations live in the same row (`holds`: per process,
worker and minute, a count, a cost and the newest reservation's time), so a reservation reads and
writes one row, one page. BEGIN is retried by the ledger itself with short jittered sleeps
(store.Spin) on a busy_timeout = 0 connection (ledger_connection): fair under contention.
Each server envelope resets S (the server is the authority):
balance = tokensLeft - in_flight of the reservations still open. When another process's call was
already charged but not yet settled, that under-counts the balance by its cost until it settles:
the error is always on the side of waiting, never of a 429.
"""

import itertools
import json
import math
import os
import threading

from .clock import SYSTEM_CLOCK
from .errors import IngestError
from .procinfo import start_time
from .sharing import HUNGRY_S, clear_waiting, held_by, mark_refused, record_spend  # noqa: F401
from .store import Spin, open_db, retry_busy, transaction
from .token_costs import estimate_cost, learn_cost, unit_cost
# The model, re-exported: callers import it from ingest.ledger.
from .token_model import (CAP_MINUTES, TICK_S, Account, LedgerPolicy, Refusal, Reservation,  # noqa: F401
                          WorkerPolicy, account_id, open_reservations, updated)

SPIN = Spin(first_s=100e-6, max_s=2e-3)  # bench/ledger.py --spin: fewer wake-ups than 20-500 µs, as fair in p99

_JSON = json.JSONEncoder(separators=(",", ":"))


def _compact_encoder():
    """dict -> compact JSON text. JSONEncoder.encode builds a C encoder on every call; build it once
    (json.encoder.c_make_encoder, CPython's accelerator), else fall back to the public API."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _JSON.encode
    c_encode = make(None, _JSON.default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
    return lambda value: "".join(c_encode(value, 0))


_encode = _compact_encoder()
PURGE_EVERY_S = 5.0
CHECKPOINT_EVERY = 1000  # commits, on a connection without autocheckpoint (ledger_connection)
SLOT_S = 60.0  # reservations of one process and worker share a slot per minute (bounds a slot's life)
_IDS = itertools.count(1)
_OPEN: set[int] = set()  # ids of this process's open reservations: closing one twice is a no-op


class Stopped(Exception):
    """The stop event was set while waiting for tokens (SIGTERM): leave quietly."""


class CostAboveCap(IngestError):
    """One request would cost more than the bucket can ever hold: the caller must split it."""


class NotSynced(IngestError):
    """The ledger has no state for this account yet: sync with the server first."""


class _JsonCache:
    """The last JSON text this ledger read or wrote and its value: most reads find the text we
    wrote (decoding is a third of a reservation's Python time). Callers copy-on-write the inner
    values (never mutate them in place), so a shallow copy per read is enough."""

    __slots__ = ("text", "value")

    def __init__(self):
        self.text, self.value = None, None

    def decode(self, text: str) -> dict:
        if text != self.text:
            self.text, self.value = text, json.loads(text or "{}")
        return dict(self.value)

    def encode(self, value: dict) -> str:
        text = _encode(value)
        self.text, self.value = text, dict(value)
        return text


def ledger_connection(db_path):
    """A connection for a Ledger of its own (what open_keepa uses): migrated, busy_timeout = 0,
    so the ledger's own retries (SPIN) decide how long and how fairly to wait for the lock; and
    no automatic checkpoint: the Ledger checkpoints every CHECKPOINT_EVERY commits itself.

    Why: once the WAL passes wal_autocheckpoint pages, SQLite checkpoints after *every* commit
    until a writer manages to restart the WAL, which another process's BEGIN attempt (holding a
    read mark for a moment) keeps preventing under contention: each of those commits paid two
    fsyncs (0.3-8 ms). Measured with 2 processes: 40k reservations in 2.8 s, 1.9 s without."""
    conn = open_db(db_path)
    conn.execute("PRAGMA busy_timeout = 0")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


def _holder() -> str:
    pid = os.getpid()
    return f"{pid}.{start_time(pid) or 0}"  # the start time tells a reused pid from the old process


class Ledger:
    def __init__(self, conn, account: str, policy: LedgerPolicy | None = None, clock=SYSTEM_CLOCK):
        self.conn = conn
        self.account = account
        self.policy = policy or LedgerPolicy()
        self.clock = clock
        self._next_purge = float("-inf")
        self._holder = _holder()
        self._workers_json, self._holds_json = _JsonCache(), _JsonCache()
        autocheckpoint = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        self._commits_left = CHECKPOINT_EVERY if autocheckpoint <= 0 else None  # None: SQLite checkpoints

    def _committed(self) -> None:
        """After each write transaction: a passive checkpoint every CHECKPOINT_EVERY commits when
        the connection does not checkpoint automatically (it never waits, never fails for busy)."""
        if self._commits_left is None:
            return
        self._commits_left -= 1
        if self._commits_left <= 0:
            self._commits_left = CHECKPOINT_EVERY
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # ------------------------------------------------------------------ reading

    def load(self) -> Account | None:
        """The row as stored (not projected)."""
        if self.conn.in_transaction:
            row = self.conn.execute(self._SELECT, (self.account,)).fetchone()
        else:  # on a busy_timeout = 0 connection a read may be refused for a moment
            row = retry_busy(SPIN, lambda: self.conn.execute(self._SELECT, (self.account,)).fetchone())
        if row is None:
            return None
        return Account(*row[:-2], self._workers_json.decode(row[-2]), self._holds_json.decode(row[-1]))

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
        return retry_busy(SPIN, estimate_cost, self.conn, self.account, kind, units)

    def unit_cost(self, kind: str) -> float:
        """The learned cost of one unit (page, ASIN) of `kind`."""
        return retry_busy(SPIN, unit_cost, self.conn, self.account, kind)

    # ------------------------------------------------------------------ server envelopes

    def claim_token_sync(self, force: bool = False) -> bool:
        """Take the right to make the free /token call: at most one per account per minute."""
        now = self.clock.wall()
        with transaction(self.conn, spin=SPIN):
            row = self.conn.execute(
                "SELECT token_synced_at FROM token_accounts WHERE account = ?", (self.account,)
            ).fetchone()
            if row and row[0] is not None and now - row[0] < self.policy.token_sync_every_s and not force:
                return False
            if row:
                self.conn.execute(
                    "UPDATE token_accounts SET token_synced_at = ? WHERE account = ?", (now, self.account)
                )
        return True

    def sync(self, envelope, *, from_token_call: bool = False) -> Account:
        """Apply an envelope that settles no reservation (a /token call)."""
        with transaction(self.conn, spin=SPIN):
            account = self._apply(self._load_for_update(), envelope)
            if from_token_call:
                account = updated(account, token_synced_at=self.clock.wall())
            self._store(account)
        return account

    def _load_for_update(self, now: float | None = None) -> Account | None:
        account = self.load()
        if now is None:
            now = self.clock.wall()
        if account is None:
            return None
        if now >= self._next_purge:  # a crashed holder's reservations: looked for every few seconds
            self._next_purge = now + PURGE_EVERY_S
            self._expire_holds(account, now)
        return account.projected(now)

    def _expire_holds(self, account: Account, now: float) -> None:
        """Drop slots whose newest reservation is older than the TTL (a crashed holder): assume it
        was charged (balance unchanged), stop counting it. in_flight is recomputed from the slots."""
        ttl = self.policy.reservation_ttl_s
        account.holds = {slot: h for slot, h in account.holds.items() if now - h[2] <= ttl}
        account.in_flight = float(sum(h[1] for h in account.holds.values()))

    def _apply(self, account: Account | None, envelope) -> Account:
        """The server is the authority: reset S from the envelope (if newer than what we have)."""
        now = self.clock.wall()
        if envelope is None or not envelope.complete:
            if account is None:
                raise NotSynced("the Keepa response carried no token envelope to start the ledger from")
            return account
        if account is None:
            account = Account(self.account, 0.0, 0.0, now, envelope.refill_rate, 0.0, now, None, None, None, None, 0)
        if account.server_ts is not None and envelope.server_time is not None and envelope.server_time < account.server_ts:
            return account  # an older response arriving late: a newer one was applied already
        # refillIn is relative to the server's answer; counting from our receipt errs late (safe).
        next_tick = (envelope.received_at or now) + envelope.refill_in_s
        account = updated(
            account,
            balance=envelope.tokens_left - account.in_flight,
            refill_rate=float(envelope.refill_rate),
            flow_reduction=float(envelope.flow_reduction or 0.0),
            next_tick=next_tick,
            as_of=now,
            server_ts=envelope.server_time if envelope.server_time is not None else account.server_ts,
            synced_at=now,
        )
        if account.blocked_until is not None and envelope.status != 429 and envelope.tokens_left > 0:
            account = updated(account, blocked_until=None)
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
        values = [getattr(a, c) for c in self._COLUMNS[:-2]]
        values += [self._workers_json.encode(a.workers), self._holds_json.encode(a.holds)]
        if self.conn.execute(self._UPDATE, (*values, a.account)).rowcount == 0:
            self.conn.execute(self._INSERT, (a.account, *values))

    def _store_hot(self, a: Account) -> None:
        self.conn.execute(self._UPDATE_HOT, (a.balance, a.in_flight, a.as_of, a.next_tick,
                                             self._workers_json.encode(a.workers),
                                             self._holds_json.encode(a.holds), a.account))

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
        with transaction(self.conn, spin=SPIN):
            account = self._load_for_update(now)
            if account is None:
                raise NotSynced("the token ledger has no state for this account yet (sync first)")
            if cost > account.cap:
                raise CostAboveCap(
                    f"a {kind} call estimated at {cost:g} tokens exceeds the bucket's cap of {account.cap:g}"
                    f" (60 x {account.refill_rate:g}/min): split it into smaller calls"
                )
            refusal = self._refusal(account, cost, worker, now)
            if refusal is None:
                slot = self._hold(account, worker, cost, now)
            else:
                mark_refused(account.workers, worker, cost, now, waiting)
            self._store_hot(account)
        self._committed()
        if refusal is not None:
            return refusal
        reservation = Reservation(next(_IDS), self.account, worker, kind, cost, units, slot)
        _OPEN.add(reservation.id)
        return reservation

    def _hold(self, account: Account, worker: str, cost: float, now: float) -> str:
        """Move `cost` from balance to in_flight, held in this process's slot for the minute."""
        account.balance -= cost  # a fresh object from _load_for_update: ours to change
        account.in_flight += cost
        slot = f"{self._holder}:{int(now // SLOT_S)}:{worker}"
        held = account.holds.get(slot)
        account.holds[slot] = [held[0] + 1, held[1] + cost, now] if held else [1, cost, now]
        record_spend(account.workers, worker, cost, now, self.policy, reserved=True)
        return slot

    def _refusal(self, account: Account, cost: float, worker: str, now: float) -> Refusal | None:
        if account.blocked_until is not None and now < account.blocked_until:
            return Refusal(account.blocked_until - now + self.policy.tick_margin_s, "blocked")
        enough = account.balance >= cost or (self.policy.allow_deficit and account.balance > 0 and cost > 0)
        if not enough:
            wait = account.time_until_available(cost if not self.policy.allow_deficit else 1e-9, now)
            if wait is None:
                return Refusal(self.policy.max_wait_s, "unreachable")
            return Refusal(wait + self.policy.tick_margin_s, "tokens")
        holder = held_by(account.workers, worker, now, cost, account.balance, self.policy)
        if holder is not None:
            return Refusal(self.policy.min_wait_s, f"share:{holder}")
        return None

    def _clear_waiting(self, worker: str) -> None:
        try:
            with transaction(self.conn, spin=SPIN):
                account = self.load()
                if account is not None and clear_waiting(account.workers, worker):
                    self._store(account)
        except Exception:  # best effort: a stale waiter is ignored after waiter_stale_s anyway
            pass

    # ------------------------------------------------------------------ settling

    def settle(self, reservation: Reservation, envelope=None, *, call=None) -> Account:
        """The call was made: replace the estimate by what the server charged and resync from its
        envelope. Without an envelope (network failure) the estimate stays spent: we cannot know
        whether the server charged it, and assuming it did errs on the side of waiting."""
        now = self.clock.wall()
        with transaction(self.conn, spin=SPIN):
            account = self._load_for_update(now)
            # An envelope older than one already applied arrives late: that newer balance already
            # included this call's charge, so closing the reservation must not deduct it again.
            late = bool(envelope is not None and envelope.server_time is not None and account is not None
                        and account.server_ts is not None and envelope.server_time < account.server_ts)
            account = self._close(account, reservation, refund=late)
            consumed = envelope.tokens_consumed if envelope is not None else None
            if consumed is not None and not (envelope and envelope.complete):
                account = updated(account, balance=account.balance + reservation.cost - consumed)
            account = self._apply(account, envelope)
            if consumed is not None:
                record_spend(account.workers, reservation.worker, consumed - reservation.cost, now, self.policy)
                if reservation.units and envelope.status == 200:
                    learn_cost(self.conn, self.account, reservation.kind, consumed / reservation.units, now)
            self._store(account)
            if call is not None:
                call.insert(self.conn, self.account)
        _OPEN.discard(reservation.id)
        self._committed()
        return account

    def release(self, reservation: Reservation) -> None:
        """The call was never made (stopped before sending): give the tokens back."""
        with transaction(self.conn, spin=SPIN):
            account = self._refund(reservation, self.clock.wall())
            self._store(account)
        _OPEN.discard(reservation.id)
        self._committed()

    def rate_limited(self, reservation: Reservation, envelope, *, call=None) -> Account:
        """A 429: it cost nothing. Store the server's balance and hold everyone until the
        projected balance is positive again."""
        now = self.clock.wall()
        with transaction(self.conn, spin=SPIN):
            account = self._refund(reservation, now)
            account = self._apply(account, envelope)
            left = envelope.tokens_left if envelope is not None and envelope.complete else min(account.server_balance, 0)
            rate = account.effective_rate
            if envelope is not None and envelope.complete and rate > 0:
                ticks = max(math.floor(-left / rate) + 1, 1)
                until = account.next_tick + (ticks - 1) * TICK_S + self.policy.tick_margin_s
            else:
                until = now + TICK_S
            account = updated(account, blocked_until=max(until, now + self.policy.min_wait_s),
                               rate_limited=account.rate_limited + 1)
            self._store(account)
            if call is not None:
                call.insert(self.conn, self.account)
        _OPEN.discard(reservation.id)
        self._committed()
        return account

    def _refund(self, reservation: Reservation, now: float) -> Account:
        """Close a reservation whose call cost nothing: its tokens go back, and out of its
        worker's spend. Inside the caller's transaction."""
        account = self._close(self._load_for_update(now), reservation, refund=True)
        record_spend(account.workers, reservation.worker, -reservation.cost, now, self.policy)
        return account

    def _close(self, account: Account | None, reservation: Reservation, refund: bool = False) -> Account:
        """Take the reservation off its slot. One that expired (its slot was dropped) or was
        closed already changes nothing, as a deleted reservation row did."""
        if account is None:
            raise NotSynced("the token ledger lost its account row")
        held = account.holds.get(reservation.slot) if reservation.id in _OPEN else None
        if held is not None:
            count, cost = held[0] - 1, held[1] - reservation.cost
            if count <= 0:
                del account.holds[reservation.slot]
            else:
                account.holds[reservation.slot] = [count, max(cost, 0.0), held[2]]
            account = updated(account, in_flight=max(account.in_flight - reservation.cost, 0.0))
            if refund:
                account = updated(account, balance=account.balance + reservation.cost)
        return account

    # ------------------------------------------------------------------ test and bench helpers

    def set_state(self, *, balance: float, refill_rate: float, next_tick: float, synced_at: float | None = None,
                  blocked_until: float | None = None, flow_reduction: float = 0.0) -> None:
        """Write the row directly (tests, benches, `ingest tokens` never)."""
        now = self.clock.wall()
        with transaction(self.conn, spin=SPIN):
            old = self.load()  # open reservations are dropped with the rest
            self._store(Account(self.account, balance, 0.0, now, refill_rate, flow_reduction, next_tick, None,
                                now if synced_at is None else synced_at, old.token_synced_at if old else None,
                                blocked_until, old.rate_limited if old else 0))


