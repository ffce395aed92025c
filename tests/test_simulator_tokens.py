"""The simulator's token bucket: Keepa's documented rules, on a FakeClock (no sleeping)."""

import pytest

from ingest.clock import FakeClock
from ingest.simulator.tokens import TokenBucket


@pytest.fixture
def clock():
    return FakeClock()


def test_starts_at_the_cap_by_default(clock):
    bucket = TokenBucket(5, clock=clock)
    assert bucket.state().balance == 300 == bucket.cap


def test_refill_ticks_once_a_minute_and_refill_in_counts_down(clock):
    bucket = TokenBucket(5, start_tokens=0, clock=clock)
    assert bucket.state().refill_in_ms == 60_000
    clock.advance(59.5)
    state = bucket.state()
    assert state.balance == 0 and state.refill_in_ms == 500
    clock.advance(0.5)
    state = bucket.state()
    assert state.balance == 5 and state.refill_in_ms == 60_000
    clock.advance(60 * 3 + 10)
    assert bucket.state().balance == 20
    assert bucket.refilled == 20


def test_balance_never_exceeds_sixty_times_the_rate(clock):
    bucket = TokenBucket(5, start_tokens=290, clock=clock)
    clock.advance(60)
    assert bucket.state().balance == 295
    clock.advance(60 * 10)
    assert bucket.state().balance == 300
    assert bucket.refilled == 10  # only what actually fitted


def test_a_positive_balance_admits_a_call_that_drives_it_negative(clock):
    bucket = TokenBucket(5, start_tokens=3, clock=clock)
    assert bucket.admit()
    bucket.charge(50)
    assert bucket.state().balance == -47
    assert not bucket.admit()
    assert bucket.consumed == 50


def test_zero_or_negative_balance_refuses_until_refilled_past_zero(clock):
    bucket = TokenBucket(5, start_tokens=-12, clock=clock)
    assert not bucket.admit()
    clock.advance(120)
    assert bucket.state().balance == -2 and not bucket.admit()
    clock.advance(60)
    assert bucket.state().balance == 3 and bucket.admit()
    zero = TokenBucket(5, start_tokens=0, clock=clock)
    assert not zero.admit()


def test_a_scheduled_rate_change_applies_from_its_instant(clock):
    bucket = TokenBucket(5, start_tokens=0, clock=clock)
    bucket.schedule_rate(90, 20)  # ticks at 60 (old rate) then 120, 180 (new rate)
    clock.advance(200)
    state = bucket.state()
    assert state.balance == 5 + 20 + 20
    assert state.rate == 20 and state.cap == 1200


def test_lowering_the_rate_drops_tokens_above_the_new_cap(clock):
    bucket = TokenBucket(20, clock=clock)
    bucket.set_rate(5)
    assert bucket.state().balance == 300


def test_set_balance_for_admin(clock):
    bucket = TokenBucket(5, clock=clock)
    bucket.set_balance(-30)
    assert bucket.state().balance == -30
