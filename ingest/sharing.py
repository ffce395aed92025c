"""Sharing the tokens between workers (docs/tokens.md, "Sharing"): pure functions over an account's
per-worker state, `Account.workers` = {worker: {spent, at, last, last_cost, refused, waiting, seen,
cost}}, stored in the ledger row as JSON.

  spent, at       decayed spend (half-life policy.share_half_life_s) and when it was last decayed
  last, last_cost the newest reservation: when, and what it cost (what it likely asks for next)
  refused         the newest refusal: a worker refused within HUNGRY_S wants more than it gets
  waiting, seen,  set while reserve() waits: since when, the latest attempt, and for how much
  cost

Pure: the functions that change the state return a new dict, and never change the one they are
given (nor its per-worker dicts).
"""

from .token_model import LedgerPolicy

HUNGRY_S = 65.0  # a worker refused this recently wants more than it gets: tokens are scarce
WAITING_KEYS = ("waiting", "seen", "cost")


def held_by(workers: dict, worker: str, now: float, cost: float, balance: float, policy: LedgerPolicy) -> str | None:
    """Which busy worker should get the tokens before `worker` (about to reserve `cost` out of
    `balance`), if any.

    While several workers are busy (waiting, or reserved within busy_window_s), a worker below
    its minimum share of the recent (decayed) spend goes first, then higher priority. An idle
    worker holds nobody back, so its share flows to the others.
    """
    if not may_be_held(workers, worker, policy):
        return None
    busy = {}
    for name, w in workers.items():
        waiting = w.get("waiting") is not None and now - (w.get("seen") or 0) < policy.waiter_stale_s
        recent = w.get("last") is not None and now - w["last"] < policy.busy_window_s
        if name == worker or waiting or recent:
            busy[name] = decayed(w.get("spent", 0.0), w.get("at", now), now, policy)
    busy.setdefault(worker, 0.0)
    if len(busy) < 2:
        return None
    # Sharing orders who goes first only while tokens are scarce: when another busy worker
    # was refused within the last minute (it wants more than it gets). Otherwise, if what is
    # left still covers the others' next calls, holding this one back would only leave
    # tokens idle (backfill once waited 74 s behind a lightly loaded upsert with thousands
    # of tokens in the bucket).
    others = [workers[name] for name in busy if name != worker]
    hungry = any(now - (w.get("refused") or float("-inf")) < HUNGRY_S for w in others)
    if not hungry and balance - cost >= sum(next_cost(w) for w in others):
        return None
    total = sum(busy.values())
    share = {name: (spent / total if total > 0 else 0.0) for name, spent in busy.items()}
    mine = policy.worker(worker)
    if share[worker] < mine.min_share:
        return None  # owed: nobody holds it back
    for other in sorted(busy):
        if other == worker:
            continue
        theirs = policy.worker(other)
        if share[other] < theirs.min_share or theirs.priority > mine.priority:
            return other
    return None


def may_be_held(workers: dict, worker: str, policy: LedgerPolicy) -> bool:
    """Only a worker with a minimum share or a higher priority can hold `worker` back; with
    none among the others, the shares need not be computed (the common case, and hot)."""
    mine = policy.worker(worker).priority
    for name in workers:
        if name != worker:
            other = policy.worker(name)
            if other.min_share > 0 or other.priority > mine:
                return True
    return False


def decayed(spent: float, spent_at: float, now: float, policy: LedgerPolicy) -> float:
    return spent * 0.5 ** (max(now - spent_at, 0.0) / policy.share_half_life_s)


def next_cost(state: dict) -> float:
    """A busy worker's next call: what it waits for, else what it reserved last."""
    return float(state.get("cost") or state.get("last_cost") or 0.0)


def record_spend(workers: dict, worker: str, amount: float, now: float, policy: LedgerPolicy, *,
                 reserved: bool = False) -> dict:
    """Add `amount` (negative: given back) to the worker's decayed spend; `reserved`: a new
    reservation, which also makes the worker busy."""
    old = workers.get(worker)
    spent = decayed(old.get("spent", 0.0), old.get("at", now), now, policy) if old else 0.0
    if reserved:  # last_cost: what it is likely to ask for next; refused: when (see held_by)
        w = {"spent": max(spent + amount, 0.0), "at": now, "last": now, "last_cost": amount}
        if old and old.get("refused") is not None:
            w["refused"] = old["refused"]
    else:
        w = {**(old or {}), "spent": max(spent + amount, 0.0), "at": now}
    return {**workers, worker: w}


def mark_refused(workers: dict, worker: str, cost: float, now: float, waiting: bool) -> dict:
    """Remember the refusal (a refused worker is hungry: see held_by) and, for reserve(), that
    the worker waits for `cost`."""
    w = dict(workers.get(worker) or {"spent": 0.0, "at": now})
    w["refused"] = now
    if waiting:
        if w.get("waiting") is None:
            w["waiting"] = now
        w["seen"] = now
        w["cost"] = cost
    return {**workers, worker: w}


def clear_waiting(workers: dict, worker: str) -> dict:
    """reserve() stopped waiting (admitted, stopped or failed): the worker is no longer waiting."""
    if worker not in workers:
        return workers
    return {**workers, worker: {k: v for k, v in workers[worker].items() if k not in WAITING_KEYS}}
