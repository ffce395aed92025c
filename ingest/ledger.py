"""The token ledger: one row per Keepa account in SQLite, shared by every process that calls Keepa.

Model (docs/tokens.md): the server balance S gains `rate` tokens at each minute tick, capped at
60 x rate; a call runs when S > 0 and may take it negative; at S <= 0 the server answers 429.
The row stores `balance` = S minus `in_flight` (the sum of open reservations), so a reservation
moves tokens from `balance` to `in_flight` and S is unchanged until the server charges.

Every read-then-write is one `BEGIN IMMEDIATE` transaction (store.transaction): two processes can
never both see the same tokens. Open reservations live in the same row (`holds`: per process,
worker and minute, a count, a cost and the newest reservation's time), so a reservation reads and
writes one row, one page. BEGIN is retried by the ledger itself with short jittered sleeps
(store.Spin) on a busy_timeout = 0 connection (ledger_connection): fair under contention. Each server envelope resets S (the server is the authority):
balance = tokensLeft - in_flight of the reservations still open. When another process's call was
already charged but not yet settled, that under-counts the balance by its cost until it settles:
the error is always on the side of waiting, never of a 429.
"""

import itertools
import json
import math
import os
import threading
from dataclasses import dataclass, field

from .clock import SYSTEM_CLOCK
from .config import section
from .errors import ConfigError, IngestError
from .procinfo import start_time
from .store import Spin, open_db, retry_busy, transaction
from .token_costs import estimate_cost, learn_cost, unit_cost

SPIN = Spin(first_s=100e-6, max_s=2e-3)  # bench/ledger.py --spin: fewer wake-ups than 20-500 µs, as fair in p99

TICK_S = 60.0
HUNGRY_S = 65.0  # a worker refused this recently wants more than it gets: tokens are scarce
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
CAP_MINUTES = 60
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


@dataclass(frozen=True)
class WorkerPolicy:
    priority: int = 0       # higher goes first while both are busy
    min_share: float = 0.0  # fraction of recent spend guaranteed while both are busy


def _default_workers():
    return {"upsert": WorkerPolicy(priority=1, min_share=0.0), "backfill": WorkerPolicy(priority=0, min_share=0.30)}


@dataclass(frozen=True)
class LedgerPolicy:
    workers: dict = field(default_factory=_default_workers)
    allow_deficit: bool = False       # admit a call costing more than the balance while it is > 0
    min_wait_s: float = 1.0           # never re-check sooner (no busy loops)
    max_wait_s: float = 45.0          # never sleep longer without re-checking
    tick_margin_s: float = 0.25       # wake this long after a projected tick
    busy_window_s: float = 10.0       # reserved this recently = busy, for sharing
    waiter_stale_s: float = 150.0     # a waiter silent this long (crashed) is ignored
    share_half_life_s: float = 600.0  # decay of the per-worker spend used for shares
    reservation_ttl_s: float = 600.0  # an unsettled reservation (crashed holder) is dropped after
    stale_after_s: float = 600.0      # no envelope for this long: resync with a free /token call
    token_sync_every_s: float = 60.0  # at most one /token call per account per this

    def worker(self, name: str) -> WorkerPolicy:
        return self.workers.get(name, WorkerPolicy())

    @classmethod
    def from_config(cls, config: dict) -> "LedgerPolicy":
        """[ledger] keys mirror the fields; [ledger.workers.NAME] priority / min_share."""
        raw = dict(section(config, "ledger"))
        workers = _default_workers()
        for name, spec in (raw.pop("workers", None) or {}).items():
            if not isinstance(spec, dict):
                raise ConfigError(f"[ledger.workers.{name}] must be a table")
            workers[name] = WorkerPolicy(int(spec.get("priority", 0)), float(spec.get("min_share", 0.0)))
        known = set(cls.__dataclass_fields__) - {"workers"}
        unknown = set(raw) - known - {"call_log_days"}
        if unknown:
            raise ConfigError(f"unknown [ledger] setting(s): {', '.join(sorted(unknown))}")
        values = {k: (bool(v) if k == "allow_deficit" else float(v)) for k, v in raw.items() if k in known}
        return cls(workers=workers, **values)


@dataclass
class Account:
    """One ledger row, projected to `as_of`."""

    account: str
    balance: float          # server balance minus in_flight
    in_flight: float
    as_of: float
    refill_rate: float
    flow_reduction: float
    next_tick: float
    server_ts: float | None
    synced_at: float | None
    token_synced_at: float | None
    blocked_until: float | None
    rate_limited: int
    workers: dict = field(default_factory=dict)  # sharing state: {worker: {spent, at, last, waiting, seen, cost}}
    holds: dict = field(default_factory=dict)    # open reservations: {slot: [count, cost, newest at]}

    def __post_init__(self):
        if isinstance(self.workers, str):  # as stored
            self.workers = json.loads(self.workers or "{}")
        if isinstance(self.holds, str):
            self.holds = json.loads(self.holds or "{}")

    @property
    def cap(self) -> float:
        return CAP_MINUTES * self.refill_rate

    @property
    def server_balance(self) -> float:
        return self.balance + self.in_flight

    @property
    def effective_rate(self) -> float:
        return max(self.refill_rate - self.flow_reduction, 0.0)

    def projected(self, now: float) -> "Account":
        """Apply the refill ticks due by `now` (Keepa's model: + rate per tick, capped)."""
        if now < self.next_tick:
            return self
        ticks = int((now - self.next_tick) // TICK_S) + 1
        server = min(self.server_balance + ticks * self.effective_rate, max(self.cap, 0.0))
        return _replace(self, balance=server - self.in_flight, next_tick=self.next_tick + ticks * TICK_S, as_of=now)

    def time_until_available(self, amount: float, now: float) -> float | None:
        """Seconds until `balance` >= amount with no further spending; None if never (no refill,
        or the cap with today's in-flight is too small)."""
        if self.balance >= amount:
            return 0.0
        rate = self.effective_rate
        if rate <= 0 or amount + self.in_flight > self.cap:
            return None
        ticks = math.ceil((amount - self.balance) / rate)
        return max(self.next_tick + (ticks - 1) * TICK_S - now, 0.0)


def _replace(account: Account, **changes) -> Account:
    # the workers and holds dicts are shared on purpose: one Account's life is one transaction
    return Account(**{**account.__dict__, **changes})


def open_reservations(account: Account, ttl_s: float) -> list[dict]:
    """The open reservations, one entry per slot (process, worker, minute), oldest slot first."""
    out = []
    for slot, (count, cost, newest) in sorted(account.holds.items(), key=lambda kv: kv[1][2]):
        holder, _, worker = slot.split(":", 2)
        out.append({"worker": worker, "pid": int(holder.split(".")[0]), "count": count, "cost": cost,
                    "last_at": newest, "expires_at": newest + ttl_s})
    return out


@dataclass(frozen=True)
class Reservation:
    id: int
    account: str
    worker: str
    kind: str
    cost: float
    units: int = 0
    slot: str = ""  # its entry in the account's holds


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


@dataclass(frozen=True)
class Refusal:
    wait_s: float
    reason: str   # blocked | tokens | share | unreachable


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


def account_id(api_key: str) -> str:
    """A fingerprint of the key: identifies the account without storing the key."""
    import hashlib

    return "k" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


class Ledger:
    def __init__(self, conn, account: str, policy: LedgerPolicy | None = None, clock=SYSTEM_CLOCK):
        self.conn = conn
        self.account = account
        self.policy = policy or LedgerPolicy()
        self.clock = clock
        self._next_purge = float("-inf")
        self._holder = _holder()
        self._workers_json, self._holds_json = _JsonCache(), _JsonCache()
        self._policies = {}
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
                account = _replace(account, token_synced_at=self.clock.wall())
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
        account = _replace(
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
            account = _replace(account, blocked_until=None)
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
                self._mark_refused(account, worker, cost, now, waiting)
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
        self._record_spend(account, worker, cost, now, reserved=True)
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
        holder = self._held_by(account, worker, now, cost)
        if holder is not None:
            return Refusal(self.policy.min_wait_s, f"share:{holder}")
        return None

    # ------------------------------------------------------------------ sharing

    def _held_by(self, account: Account, worker: str, now: float, cost: float = 0.0) -> str | None:
        """Which busy worker should get the tokens before `worker`, if any.

        While several workers are busy (waiting, or reserved within busy_window_s), a worker below
        its minimum share of the recent (decayed) spend goes first, then higher priority. An idle
        worker holds nobody back, so its share flows to the others.
        """
        if not self._may_be_held(account, worker):
            return None
        busy = {}
        for name, w in account.workers.items():
            waiting = w.get("waiting") is not None and now - (w.get("seen") or 0) < self.policy.waiter_stale_s
            recent = w.get("last") is not None and now - w["last"] < self.policy.busy_window_s
            if name == worker or waiting or recent:
                busy[name] = self._decayed(w.get("spent", 0.0), w.get("at", now), now)
        busy.setdefault(worker, 0.0)
        if len(busy) < 2:
            return None
        # Sharing orders who goes first only while tokens are scarce: when another busy worker
        # was refused within the last minute (it wants more than it gets). Otherwise, if what is
        # left still covers the others' next calls, holding this one back would only leave
        # tokens idle (backfill once waited 74 s behind a lightly loaded upsert with thousands
        # of tokens in the bucket).
        others = [account.workers[name] for name in busy if name != worker]
        hungry = any(now - (w.get("refused") or float("-inf")) < HUNGRY_S for w in others)
        if not hungry and account.balance - cost >= sum(_next_cost(w) for w in others):
            return None
        total = sum(busy.values())
        share = {name: (spent / total if total > 0 else 0.0) for name, spent in busy.items()}
        policy = self.policy.worker(worker)
        if share[worker] < policy.min_share:
            return None  # owed: nobody holds it back
        for other in sorted(busy):
            if other == worker:
                continue
            theirs = self.policy.worker(other)
            if share[other] < theirs.min_share or theirs.priority > policy.priority:
                return other
        return None

    def _policy(self, worker: str) -> WorkerPolicy:
        policy = self._policies.get(worker)
        if policy is None:
            policy = self._policies[worker] = self.policy.worker(worker)
        return policy

    def _may_be_held(self, account: Account, worker: str) -> bool:
        """Only a worker with a minimum share or a higher priority can hold `worker` back; with
        none among the others, the shares need not be computed (the common case, and hot)."""
        mine = self._policy(worker).priority
        for name in account.workers:
            if name != worker:
                other = self._policy(name)
                if other.min_share > 0 or other.priority > mine:
                    return True
        return False

    def _decayed(self, spent: float, spent_at: float, now: float) -> float:
        return spent * 0.5 ** (max(now - spent_at, 0.0) / self.policy.share_half_life_s)

    # The per-worker dicts are replaced, never changed in place: _JsonCache shares them.

    def _record_spend(self, account: Account, worker: str, amount: float, now: float, *, reserved: bool = False) -> None:
        old = account.workers.get(worker)
        spent = self._decayed(old.get("spent", 0.0), old.get("at", now), now) if old else 0.0
        if reserved:  # last_cost: what it is likely to ask for next; refused: when (see _held_by)
            account.workers[worker] = {"spent": max(spent + amount, 0.0), "at": now, "last": now,
                                       "last_cost": amount}
            if old and old.get("refused") is not None:
                account.workers[worker]["refused"] = old["refused"]
        else:
            account.workers[worker] = {**(old or {}), "spent": max(spent + amount, 0.0), "at": now}

    def _mark_refused(self, account: Account, worker: str, cost: float, now: float, waiting: bool) -> None:
        """Remember the refusal (a refused worker is hungry: see _held_by) and, for reserve(),
        that the worker waits for `cost`."""
        w = dict(account.workers.get(worker) or {"spent": 0.0, "at": now})
        w["refused"] = now
        if waiting:
            if w.get("waiting") is None:
                w["waiting"] = now
            w["seen"] = now
            w["cost"] = cost
        account.workers[worker] = w

    def _clear_waiting(self, worker: str) -> None:
        try:
            with transaction(self.conn, spin=SPIN):
                account = self.load()
                if account is not None and worker in account.workers:
                    account.workers[worker] = {k: v for k, v in account.workers[worker].items()
                                               if k not in ("waiting", "seen", "cost")}
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
                account = _replace(account, balance=account.balance + reservation.cost - consumed)
            account = self._apply(account, envelope)
            if consumed is not None:
                self._record_spend(account, reservation.worker, consumed - reservation.cost, now)
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
            account = self._close(self._load_for_update(), reservation, refund=True)
            self._record_spend(account, reservation.worker, -reservation.cost, self.clock.wall())
            self._store(account)
        _OPEN.discard(reservation.id)
        self._committed()

    def rate_limited(self, reservation: Reservation, envelope, *, call=None) -> Account:
        """A 429: it cost nothing. Store the server's balance and hold everyone until the
        projected balance is positive again."""
        now = self.clock.wall()
        with transaction(self.conn, spin=SPIN):
            account = self._close(self._load_for_update(now), reservation, refund=True)
            self._record_spend(account, reservation.worker, -reservation.cost, now)
            account = self._apply(account, envelope)
            left = envelope.tokens_left if envelope is not None and envelope.complete else min(account.server_balance, 0)
            rate = account.effective_rate
            if envelope is not None and envelope.complete and rate > 0:
                ticks = max(math.floor(-left / rate) + 1, 1)
                until = account.next_tick + (ticks - 1) * TICK_S + self.policy.tick_margin_s
            else:
                until = now + TICK_S
            account = _replace(account, blocked_until=max(until, now + self.policy.min_wait_s),
                               rate_limited=account.rate_limited + 1)
            self._store(account)
            if call is not None:
                call.insert(self.conn, self.account)
        _OPEN.discard(reservation.id)
        self._committed()
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
            account = _replace(account, in_flight=max(account.in_flight - reservation.cost, 0.0))
            if refund:
                account = _replace(account, balance=account.balance + reservation.cost)
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


def _next_cost(state: dict) -> float:
    """A busy worker's next call: what it waits for, else what it reserved last."""
    return float(state.get("cost") or state.get("last_cost") or 0.0)
