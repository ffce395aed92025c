"""The token model: what the ledger stores and projects, with no SQLite in it (docs/tokens.md).

Keepa's bucket: the server balance S gains `rate` tokens at each minute tick, capped at 60 x rate;
a call runs when S > 0 and may take it negative; at S <= 0 the server answers 429. An `Account`
is one ledger row: `balance` = S minus `in_flight` (the sum of open reservations), projected to a
time by `projected()`. `LedgerPolicy` holds the ledger's settings ([ledger] in the config),
`Reservation` and `Refusal` are what an attempt to reserve returns. How a row changes (envelopes,
holds, refusals, closing, the 429 block) is ingest/token_transitions.py; who goes first while
tokens are scarce is ingest/sharing.py; the row's I/O in transactions is ingest/ledger.py.
"""

import hashlib
import json
import math
from dataclasses import dataclass, field, fields, replace

from .errors import ConfigError
from .settings import Rule, parse, setting

TICK_S = 60.0
CAP_MINUTES = 60


@dataclass(frozen=True)
class WorkerPolicy:
    """[ledger.workers.NAME]: how one worker shares tokens while both are busy."""

    priority: int = setting(0, "higher goes first while both are busy", min=-100, max=100)
    min_share: float = setting(0.0, "fraction of recent spend guaranteed while both are busy", min=0, max=1)


_NO_POLICY = WorkerPolicy()  # an unnamed worker's: shared (frozen), not built per lookup


def _default_workers():
    return {"upsert": WorkerPolicy(priority=1, min_share=0.0), "backfill": WorkerPolicy(priority=0, min_share=0.30)}


@dataclass(frozen=True)
class LedgerPolicy:
    workers: dict = field(default_factory=_default_workers, metadata={"rule": Rule(dict, "[ledger.workers.NAME] tables")})
    allow_deficit: bool = setting(False, "admit a call costing more than the balance while it is > 0")
    min_wait_s: float = setting(1.0, "never re-check sooner (no busy loops)", above=0, max=60)
    max_wait_s: float = setting(45.0, "never sleep longer without re-checking", above=0, max=600)
    tick_margin_s: float = setting(0.25, "wake this long after a projected tick", min=0, max=10)
    busy_window_s: float = setting(10.0, "reserved this recently = busy, for sharing", above=0, max=3600)
    waiter_stale_s: float = setting(150.0, "a waiter silent this long (crashed) is ignored", above=0, max=86400)
    share_half_life_s: float = setting(600.0, "decay of the per-worker spend used for shares", above=0, max=7 * 86400)
    reservation_ttl_s: float = setting(600.0, "an unsettled reservation (crashed holder) is dropped after", min=1, max=86400)
    stale_after_s: float = setting(600.0, "no envelope for this long: resync with a free /token call", min=1, max=86400)
    token_sync_every_s: float = setting(60.0, "at most one /token call per account per this", min=1, max=3600)
    call_log_days: float = setting(30.0, "keep the keepa_calls log this many days", above=0, max=3650)

    def __post_init__(self):
        if self.min_wait_s > self.max_wait_s:
            raise ConfigError(f"min_wait_s ({self.min_wait_s:g}) must be at most max_wait_s ({self.max_wait_s:g})")
        workers = _default_workers()
        for name, spec in self.workers.items():
            if isinstance(spec, WorkerPolicy):
                workers[name] = spec
            elif isinstance(spec, dict):
                workers[name] = parse(WorkerPolicy, spec, f"ledger.workers.{name}")
            else:
                raise ConfigError(f"[ledger.workers.{name}] must be a table")
        if sum(w.min_share for w in workers.values()) > 1:
            raise ConfigError("the workers' min_share values must add up to at most 1")
        object.__setattr__(self, "workers", workers)

    def worker(self, name: str) -> WorkerPolicy:
        return self.workers.get(name, _NO_POLICY)

    @classmethod
    def from_config(cls, config: dict) -> "LedgerPolicy":
        """[ledger] keys mirror the fields; [ledger.workers.NAME] priority / min_share."""
        return parse(cls, config.get("ledger"), "ledger")


@dataclass(frozen=True)
class Account:
    """One ledger row, projected to `as_of`. A value: ingest/token_transitions.py makes new ones
    (its dicts are replaced, never changed in place)."""

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

    @classmethod
    def from_row(cls, row) -> "Account":
        """From a token_accounts row (sqlite3.Row or a mapping of its columns): workers and holds
        are stored as JSON."""
        values = {name: row[name] for name in _ACCOUNT_FIELDS}
        values["workers"] = json.loads(values["workers"] or "{}")
        values["holds"] = json.loads(values["holds"] or "{}")
        return cls(**values)

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
        return replace(self, balance=server - self.in_flight, next_tick=self.next_tick + ticks * TICK_S, as_of=now)

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


_ACCOUNT_FIELDS = tuple(f.name for f in fields(Account))  # = the token_accounts columns


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


@dataclass(frozen=True)
class Refusal:
    wait_s: float
    reason: str   # blocked | tokens | share:{holder} | unreachable


def account_id(api_key: str) -> str:
    """A fingerprint of the key: identifies the account without storing the key."""
    return "k" + hashlib.sha256(api_key.encode()).hexdigest()[:12]
