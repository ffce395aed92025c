"""The token transitions on Account and Envelope values, no database: envelopes (ticks, cap, late
answers, unblocking), holding and refusing, closing (once), settling, and the 429 block. Every
transition leaves the account it was given as it was."""

import copy

import pytest

from ingest.keepa import Envelope
from ingest.token_model import Account, LedgerPolicy, Refusal, Reservation
from ingest.token_transitions import (CostAboveCap, NotSynced, admit, apply_envelope, blocked_until, close,
                                      expire_holds, rate_limited, refunded, settled, slot_for)

NOW = 1_700_000_000.0
POLICY = LedgerPolicy()
SLOT = slot_for("123.456", "upsert", NOW)


def account(balance=100.0, rate=5.0, next_tick=NOW + 10, **changes) -> Account:
    values = dict(account="a", balance=balance, in_flight=0.0, as_of=NOW, refill_rate=rate, flow_reduction=0.0,
                  next_tick=next_tick, server_ts=None, synced_at=NOW, token_synced_at=None, blocked_until=None,
                  rate_limited=0)
    return Account(**{**values, **changes})


def env(left, refill_in_s=30.0, rate=5, consumed=None, status=200, server_time=None, at=NOW) -> Envelope:
    return Envelope(status=status, tokens_left=left, refill_in_s=refill_in_s, refill_rate=rate,
                    tokens_consumed=consumed, server_time=server_time, received_at=at)


def held(a: Account, cost: float, worker: str = "upsert", slot: str = SLOT, now: float = NOW):
    """Reserve through admit; return the new account and the reservation."""
    admission = admit(a, cost, worker, "deal", slot, now, POLICY)
    assert admission.refusal is None
    return admission.account, Reservation(1, a.account, worker, "deal", cost, 0, slot)


def unchanged(a: Account):
    """A deep copy to compare with after a transition: the input must not change."""
    return copy.deepcopy(a)


# ---------------------------------------------------------------- envelopes

def test_the_first_envelope_starts_the_account_from_the_server():
    a = apply_envelope(None, env(left=250, refill_in_s=12, rate=20), NOW, "acct")
    assert (a.account, a.balance, a.in_flight, a.refill_rate, a.next_tick, a.synced_at) == (
        "acct", 250, 0, 20, NOW + 12, NOW)
    assert a.cap == 1200


def test_no_envelope_and_no_account_is_not_synced_and_an_incomplete_one_changes_nothing():
    with pytest.raises(NotSynced):
        apply_envelope(None, None, NOW, "acct")
    with pytest.raises(NotSynced):
        apply_envelope(None, Envelope(status=500), NOW, "acct")
    a = account(balance=40)
    assert apply_envelope(a, Envelope(status=500), NOW, "a") is a


def test_an_envelope_resets_the_balance_minus_what_is_still_in_flight():
    a, _ = held(account(balance=100), 30)
    before = unchanged(a)
    b = apply_envelope(a, env(left=90), NOW + 1, "a")
    assert (b.server_balance, b.balance, b.in_flight) == (90, 60, 30)
    assert a == before


def test_an_envelope_received_earlier_applies_the_ticks_due_since_capped_at_an_hour():
    # received 125 s ago, next tick 5 s after that: three ticks (+5, +65, +125) are due now
    a = apply_envelope(account(), env(left=10, refill_in_s=5, rate=5, at=NOW - 125), NOW, "a")
    assert (a.balance, a.next_tick) == (25, NOW + 60)
    full = apply_envelope(account(), env(left=298, refill_in_s=5, rate=5, at=NOW - 125), NOW, "a")
    assert full.balance == 300  # 60 x rate


def test_flow_reduction_slows_the_refill():
    a = apply_envelope(account(), Envelope(status=200, tokens_left=0, refill_in_s=10, refill_rate=5,
                                           flow_reduction=2, received_at=NOW), NOW, "a")
    assert a.projected(NOW + 10).balance == 3


def test_an_older_envelope_arriving_late_is_ignored():
    a = apply_envelope(account(), env(left=50, server_time=NOW + 2), NOW + 3, "a")
    assert apply_envelope(a, env(left=90, server_time=NOW + 1), NOW + 4, "a").balance == 50


def test_a_block_is_lifted_by_a_200_with_tokens_not_by_another_429():
    blocked = account(blocked_until=NOW + 100)
    assert apply_envelope(blocked, env(left=-3, status=429), NOW, "a").blocked_until == NOW + 100
    assert apply_envelope(blocked, env(left=0), NOW, "a").blocked_until == NOW + 100
    assert apply_envelope(blocked, env(left=4), NOW, "a").blocked_until is None


def test_expired_holds_are_dropped_and_counted_as_charged():
    a, _ = held(account(balance=100), 10, slot="old:1:upsert")
    a, _ = held(a, 5, slot="new:2:upsert", now=NOW + 500)
    before = unchanged(a)
    b = expire_holds(a, NOW + 700, POLICY)
    assert (b.balance, b.in_flight, list(b.holds)) == (85, 5, ["new:2:upsert"])
    assert a == before


# ---------------------------------------------------------------- holding and refusing

def test_admit_holds_the_cost_in_the_slot_and_leaves_the_input_alone():
    a = account(balance=20)
    before = unchanged(a)
    b, _ = held(a, 5)
    b, _ = held(b, 3)
    assert (b.balance, b.in_flight, b.server_balance) == (12, 8, 20)
    assert b.holds[SLOT][:2] == [2, 8]
    assert b.workers["upsert"]["last_cost"] == 3
    assert a == before


def test_short_of_tokens_it_refuses_until_the_tick_that_pays_and_remembers_the_refusal():
    a = account(balance=3, next_tick=NOW + 20)
    admission = admit(a, 12, "upsert", "deal", SLOT, NOW, POLICY, waiting=True)
    # 3 + 5 + 5 = 13 >= 12 at the second tick: +20 s, +80 s
    assert admission.refusal == Refusal(80 + POLICY.tick_margin_s, "tokens")
    assert admission.account.balance == 3 and admission.account.holds == {}
    w = admission.account.workers["upsert"]
    assert (w["refused"], w["waiting"], w["cost"]) == (NOW, NOW, 12)
    assert a.workers == {}


def test_no_deficit_by_default_deficit_while_positive_when_allowed():
    a = account(balance=3)
    assert admit(a, 5, "u", "deal", SLOT, NOW, POLICY).refusal is not None
    lenient = LedgerPolicy(allow_deficit=True)
    b = admit(a, 5, "u", "deal", SLOT, NOW, lenient).account
    assert b.balance == -2
    assert admit(b, 1, "u", "deal", SLOT, NOW, lenient).refusal.reason == "tokens"


def test_blocked_refuses_everyone_until_the_block_ends():
    a = account(balance=100, blocked_until=NOW + 30)
    assert admit(a, 1, "u", "deal", SLOT, NOW, POLICY).refusal == Refusal(30 + POLICY.tick_margin_s, "blocked")
    assert admit(a, 1, "u", "deal", SLOT, NOW + 30, POLICY).refusal is None


def test_a_cost_above_the_cap_raises_and_no_refill_is_unreachable():
    with pytest.raises(CostAboveCap, match="exceeds the bucket's cap of 300"):
        admit(account(balance=0), 301, "u", "product", SLOT, NOW, POLICY)
    with pytest.raises(NotSynced):
        admit(None, 1, "u", "deal", SLOT, NOW, POLICY)
    dry = account(balance=0, rate=5, flow_reduction=5)
    assert admit(dry, 1, "u", "deal", SLOT, NOW, POLICY).refusal == Refusal(POLICY.max_wait_s, "unreachable")


def test_sharing_refuses_a_lower_priority_worker_while_tokens_are_scarce():
    a, _ = held(account(balance=30), 10, worker="upsert")
    a = admit(a, 25, "upsert", "deal", SLOT, NOW, POLICY, waiting=True).account  # upsert is hungry
    a, _ = held(a, 10, worker="backfill", slot="p:1:backfill")  # below its 30% minimum: goes anyway
    refused = admit(a, 5, "backfill", "deal", "p:1:backfill", NOW, POLICY)
    assert refused.refusal == Refusal(POLICY.min_wait_s, "share:upsert")


# ---------------------------------------------------------------- closing and settling

def test_closing_takes_one_reservation_off_its_slot_and_a_refund_gives_it_back():
    a, r = held(account(balance=20), 5)
    a, _ = held(a, 3)
    before = unchanged(a)
    kept = close(a, r)
    assert (kept.balance, kept.in_flight, kept.holds[SLOT][:2]) == (12, 3, [1, 3])
    back = close(a, r, refund=True)
    assert (back.balance, back.in_flight) == (17, 3)
    assert a == before


def test_a_reservation_no_longer_held_closes_nothing_but_its_spend_is_still_given_back():
    a, r = held(account(balance=20), 5)
    a, _ = held(a, 3)
    once = refunded(a, r, NOW, POLICY, held=True)
    twice = refunded(once, r, NOW, POLICY, held=False)
    assert (twice.balance, twice.in_flight, twice.holds[SLOT][:2]) == (17, 3, [1, 3])
    expired = close(expire_holds(a, NOW + 601, POLICY), r)
    assert expired.holds == {} and expired.in_flight == 0


def test_settling_replaces_the_estimate_by_what_the_server_charged():
    a, r = held(account(balance=100), 12)
    s = settled(a, r, env(left=95, consumed=5, at=NOW + 1), NOW + 1, POLICY, held=True)
    assert (s.balance, s.in_flight, s.holds) == (95, 0, {})
    assert s.workers["upsert"]["spent"] == pytest.approx(5, abs=0.05)  # 12 reserved (decayed 1 s), 7 given back


def test_settling_without_an_envelope_keeps_the_estimate_spent():
    a, r = held(account(balance=100), 12)
    s = settled(a, r, None, NOW + 1, POLICY, held=True)
    assert (s.balance, s.in_flight) == (88, 0)
    with pytest.raises(NotSynced):
        settled(None, r, None, NOW, POLICY, held=True)


def test_an_incomplete_envelope_with_a_charge_corrects_the_estimate_by_it():
    a, r = held(account(balance=100), 12)
    s = settled(a, r, Envelope(status=500, tokens_consumed=2), NOW + 1, POLICY, held=True)
    assert s.balance == 98


def test_a_late_envelope_refunds_the_reservation_its_newer_balance_already_charged():
    a, r = held(account(balance=100), 5)
    a, r2 = held(a, 5)
    a = settled(a, r2, env(left=50, consumed=5, server_time=NOW + 2), NOW + 2, POLICY, held=True)
    s = settled(a, r, env(left=90, consumed=5, server_time=NOW + 1), NOW + 3, POLICY, held=True)
    assert (s.balance, s.in_flight) == (50, 0)


# ---------------------------------------------------------------- the 429 block

def test_a_429_refunds_and_blocks_until_the_tick_that_makes_the_balance_positive():
    a, r = held(account(balance=10), 5)
    before = unchanged(a)
    b = rate_limited(a, r, env(left=-12, refill_in_s=20, rate=5, status=429), NOW, POLICY, held=True)
    # -12 + 5 x 3 = 3 > 0 at the third tick: +20, +80, +140 s
    assert b.blocked_until == NOW + 140 + POLICY.tick_margin_s
    assert (b.balance, b.in_flight, b.rate_limited) == (-12, 0, 1)
    assert a == before


def test_a_429_at_exactly_zero_waits_one_tick_and_never_less_than_min_wait():
    a = apply_envelope(account(), env(left=0, refill_in_s=0.1, status=429), NOW, "a")
    assert blocked_until(a, env(left=0, refill_in_s=0.1, status=429), NOW, POLICY) == NOW + POLICY.min_wait_s
    b = apply_envelope(account(), env(left=0, refill_in_s=30, status=429), NOW, "a")
    assert blocked_until(b, env(left=0, refill_in_s=30, status=429), NOW, POLICY) == NOW + 30 + POLICY.tick_margin_s


def test_a_429_without_a_usable_envelope_blocks_for_one_minute():
    a, r = held(account(balance=10), 5)
    b = rate_limited(a, r, None, NOW, POLICY, held=True)
    assert (b.blocked_until, b.balance, b.rate_limited) == (NOW + 60, 10, 1)
