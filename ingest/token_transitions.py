"""The token transitions: how one ledger row changes, as pure functions of (account, envelope, now,
policy), with no SQLite in them (docs/tokens.md). Each takes an `Account` and returns a new one;
the argument, its `holds` and its `workers` are never changed in place. ingest/ledger.py runs
each inside one BEGIN IMMEDIATE: load, transition, store.

  apply_envelope  the server is the authority: reset the balance from its envelope
  expire_holds    drop the slots of a crashed holder (counted as charged)
  admit           reserve `cost` for a worker (hold it) or refuse, saying how long to wait
  close           take a reservation off its slot; `refund` gives its tokens back
  settled         a call was made: close its reservation, then apply the envelope
  refunded        a call cost nothing (never sent): close with a refund
  rate_limited    a 429: refund, apply the envelope, block everyone until the balance is positive

A reservation closes only while its process holds it open: the compound transitions take
`held` (the caller's word on that: ingest.ledger.Ledger keeps the ids it handed out and not
yet closed), and change nothing on the slot when it is False (closed twice, or expired).
"""

import math
from dataclasses import dataclass, replace

from .errors import IngestError
from .keepa import Envelope
from .sharing import held_by, mark_refused, record_spend
from .token_model import TICK_S, Account, LedgerPolicy, Refusal, Reservation

SLOT_S = 60.0  # reservations of one process and worker share a slot per minute (bounds a slot's life)


class CostAboveCap(IngestError):
    """One request would cost more than the bucket can ever hold: the caller must split it."""


class NotSynced(IngestError):
    """The ledger has no state for this account yet: sync with the server first."""


@dataclass(frozen=True)
class Admission:
    """What one attempt to reserve did to the account: held the tokens (refusal None) or not."""

    account: Account
    refusal: Refusal | None = None


def slot_for(holder: str, worker: str, now: float) -> str:
    """The holds key of a reservation made by process `holder` for `worker` at `now`."""
    return f"{holder}:{int(now // SLOT_S)}:{worker}"


# ---------------------------------------------------------------- server envelopes

def new_account(name: str, envelope: Envelope, now: float) -> Account:
    """The row before its first envelope is applied (apply_envelope fills it in)."""
    return Account(account=name, balance=0.0, in_flight=0.0, as_of=now, refill_rate=envelope.refill_rate,
                   flow_reduction=0.0, next_tick=now, server_ts=None, synced_at=None, token_synced_at=None,
                   blocked_until=None, rate_limited=0)


def is_late(account: Account | None, envelope: Envelope | None) -> bool:
    """An envelope older than one already applied (a response arriving late)."""
    return bool(envelope is not None and envelope.server_time is not None and account is not None
                and account.server_ts is not None and envelope.server_time < account.server_ts)


def apply_envelope(account: Account | None, envelope: Envelope | None, now: float, name: str) -> Account:
    """Reset S from the envelope: balance = tokensLeft - in_flight (if newer than what we have).
    `name` is the account id, for the first envelope of an account without a row."""
    if envelope is None or not envelope.complete:
        if account is None:
            raise NotSynced("the Keepa response carried no token envelope to start the ledger from")
        return account
    if account is None:
        account = new_account(name, envelope, now)
    if is_late(account, envelope):
        return account  # a newer one was applied already
    # refillIn is relative to the server's answer; counting from our receipt errs late (safe).
    account = replace(
        account,
        balance=envelope.tokens_left - account.in_flight,
        refill_rate=float(envelope.refill_rate),
        flow_reduction=float(envelope.flow_reduction or 0.0),
        next_tick=(envelope.received_at or now) + envelope.refill_in_s,
        as_of=now,
        server_ts=envelope.server_time if envelope.server_time is not None else account.server_ts,
        synced_at=now,
    )
    if account.blocked_until is not None and envelope.status != 429 and envelope.tokens_left > 0:
        account = replace(account, blocked_until=None)
    return account.projected(now)


def expire_holds(account: Account, now: float, policy: LedgerPolicy) -> Account:
    """Drop slots whose newest reservation is older than the TTL (a crashed holder): assume it
    was charged (balance unchanged), stop counting it. in_flight is recomputed from the slots."""
    ttl = policy.reservation_ttl_s
    holds = {slot: h for slot, h in account.holds.items() if now - h[2] <= ttl}
    return replace(account, holds=holds, in_flight=float(sum(h[1] for h in holds.values())))


# ---------------------------------------------------------------- reserving

def refusal(account: Account, cost: float, worker: str, now: float, policy: LedgerPolicy) -> Refusal | None:
    """Why `worker` may not hold `cost` now, and how long to wait; None: it may."""
    if account.blocked_until is not None and now < account.blocked_until:
        return Refusal(account.blocked_until - now + policy.tick_margin_s, "blocked")
    enough = account.balance >= cost or (policy.allow_deficit and account.balance > 0 and cost > 0)
    if not enough:
        wait = account.time_until_available(cost if not policy.allow_deficit else 1e-9, now)
        if wait is None:
            return Refusal(policy.max_wait_s, "unreachable")
        return Refusal(wait + policy.tick_margin_s, "tokens")
    holder = held_by(account.workers, worker, now, cost, account.balance, policy)
    if holder is not None:
        return Refusal(policy.min_wait_s, f"share:{holder}")
    return None


def hold(account: Account, worker: str, cost: float, slot: str, now: float, policy: LedgerPolicy) -> Account:
    """Move `cost` from balance to in_flight, held in `slot`; the worker's spend counts it."""
    held = account.holds.get(slot)
    holds = {**account.holds, slot: [held[0] + 1, held[1] + cost, now] if held else [1, cost, now]}
    return replace(account, balance=account.balance - cost, in_flight=account.in_flight + cost, holds=holds,
                   workers=record_spend(account.workers, worker, cost, now, policy, reserved=True))


def refuse(account: Account, worker: str, cost: float, now: float, waiting: bool) -> Account:
    """Remember the refusal in the sharing state (and, `waiting`, that the worker waits)."""
    return replace(account, workers=mark_refused(account.workers, worker, cost, now, waiting))


def admit(account: Account | None, cost: float, worker: str, kind: str, slot: str, now: float,
          policy: LedgerPolicy, *, waiting: bool = False) -> Admission:
    """One attempt to reserve `cost` for `worker` in `slot`: held, or refused with a wait."""
    if account is None:
        raise NotSynced("the token ledger has no state for this account yet (sync first)")
    if cost > account.cap:
        raise CostAboveCap(
            f"a {kind} call estimated at {cost:g} tokens exceeds the bucket's cap of {account.cap:g}"
            f" (60 x {account.refill_rate:g}/min): split it into smaller calls"
        )
    why = refusal(account, cost, worker, now, policy)
    if why is not None:
        return Admission(refuse(account, worker, cost, now, waiting), why)
    return Admission(hold(account, worker, cost, slot, now, policy))


# ---------------------------------------------------------------- closing

def close(account: Account, reservation: Reservation, *, refund: bool = False) -> Account:
    """Take the reservation off its slot (`refund`: its tokens go back to the balance). One whose
    slot was dropped (expired) changes nothing."""
    held = account.holds.get(reservation.slot)
    if held is None:
        return account
    holds = dict(account.holds)
    count, cost = held[0] - 1, held[1] - reservation.cost
    if count <= 0:
        del holds[reservation.slot]
    else:
        holds[reservation.slot] = [count, max(cost, 0.0), held[2]]
    balance = account.balance + reservation.cost if refund else account.balance
    return replace(account, holds=holds, in_flight=max(account.in_flight - reservation.cost, 0.0), balance=balance)


def _close_if_held(account: Account | None, reservation: Reservation, held: bool, refund: bool) -> Account:
    if account is None:
        raise NotSynced("the token ledger lost its account row")
    return close(account, reservation, refund=refund) if held else account


def settled(account: Account | None, reservation: Reservation, envelope: Envelope | None, now: float,
            policy: LedgerPolicy, *, held: bool) -> Account:
    """The call was made: replace the estimate by what the server charged and resync from its
    envelope. Without an envelope (network failure) the estimate stays spent: we cannot know
    whether the server charged it, and assuming it did errs on the side of waiting."""
    # An envelope older than one already applied arrives late: that newer balance already
    # included this call's charge, so closing the reservation must not deduct it again.
    account = _close_if_held(account, reservation, held, refund=is_late(account, envelope))
    consumed = envelope.tokens_consumed if envelope is not None else None
    if consumed is not None and not envelope.complete:
        account = replace(account, balance=account.balance + reservation.cost - consumed)
    account = apply_envelope(account, envelope, now, account.account)
    if consumed is not None:
        account = replace(account, workers=record_spend(account.workers, reservation.worker,
                                                        consumed - reservation.cost, now, policy))
    return account


def refunded(account: Account | None, reservation: Reservation, now: float, policy: LedgerPolicy, *,
             held: bool) -> Account:
    """Close a reservation whose call cost nothing: its tokens go back, and out of its worker's
    spend."""
    account = _close_if_held(account, reservation, held, refund=True)
    return replace(account, workers=record_spend(account.workers, reservation.worker, -reservation.cost, now, policy))


def blocked_until(account: Account, envelope: Envelope | None, now: float, policy: LedgerPolicy) -> float:
    """After a 429: the tick at which the server balance is positive again (Keepa's refill from
    the envelope's tokensLeft), at least min_wait_s away; one tick without a usable envelope."""
    rate = account.effective_rate
    if envelope is not None and envelope.complete and rate > 0:
        ticks = max(math.floor(-envelope.tokens_left / rate) + 1, 1)
        until = account.next_tick + (ticks - 1) * TICK_S + policy.tick_margin_s
    else:
        until = now + TICK_S
    return max(until, now + policy.min_wait_s)


def rate_limited(account: Account | None, reservation: Reservation, envelope: Envelope | None, now: float,
                 policy: LedgerPolicy, *, held: bool) -> Account:
    """A 429: it cost nothing. Take the server's balance and hold everyone until the projected
    balance is positive again; count it."""
    account = refunded(account, reservation, now, policy, held=held)
    account = apply_envelope(account, envelope, now, account.account)
    return replace(account, blocked_until=blocked_until(account, envelope, now, policy),
                   rate_limited=account.rate_limited + 1)
