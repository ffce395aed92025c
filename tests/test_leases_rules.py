"""The lease rules as pure functions (ingest.lease_rules): who may take a lease and what state a
holder is in, from a row, an identity, an observed liveness and a monotonic reading. No SQLite."""

import dataclasses

from hypothesis import given
from hypothesis import strategies as st

from ingest.lease_rules import Basis, LeaseEvent, LeaseState, Watch, decide_take, holder_status
from ingest.lease_table import LeaseRow
from ingest.procinfo import UNKNOWN_BOOT, Identity

ME = Identity(host="here", boot="boot-1", pidns="pid:[1]", pid=100, start="500", nonce="me")
TTL = 30.0
NOW = 1_000.0  # our CLOCK_MONOTONIC


def held_by(who: Identity, *, renewed_mono=NOW, renewals=0, fence=3, renewed_at=1_750_000_000.0) -> LeaseRow:
    return LeaseRow(name="job", host=who.host, boot=who.boot, pidns=who.pidns, pid=who.pid, start=who.start,
                    nonce=who.nonce, fence=fence, ttl_s=TTL, acquired_at=renewed_at, renewed_at=renewed_at,
                    expires_at=renewed_at + TTL, renewed_mono=renewed_mono, renewals=renewals, transitions=fence)


FREE = LeaseRow(name="job", host=None, boot=None, pidns=None, pid=None, start=None, nonce=None, fence=3,
                ttl_s=TTL, acquired_at=None, renewed_at=None, expires_at=None, renewed_mono=None, renewals=0,
                transitions=3)
NEIGHBOUR = dataclasses.replace(ME, pid=200, start="600", nonce="neighbour")   # same host and boot
REMOTE = Identity(host="elsewhere", boot="boot-9", pidns="pid:[1]", pid=100, start="500", nonce="remote")


# ---------------------------------------------------------------- decide_take


def test_no_row_or_a_free_row_is_taken():
    for row in (None, FREE):
        d = decide_take(row, ME, None, None, NOW)
        assert (d.take, d.event, d.watch) == (True, LeaseEvent.ACQUIRED, None)


def test_our_own_stale_row_starts_a_new_epoch():
    d = decide_take(held_by(ME), ME, True, None, NOW)
    assert (d.event, d.detail) == (LeaseEvent.ACQUIRED, "own stale row")


def test_dead_local_holder_is_taken_at_once_naming_it():
    d = decide_take(held_by(NEIGHBOUR, renewed_mono=NOW), ME, False, None, NOW)
    assert d.event == LeaseEvent.TAKEN_OVER_DEAD
    assert d.detail.startswith("from here:200:neighb (fence 3): pid 200 is not running")


def test_live_local_holder_expires_after_its_ttl_on_the_monotonic_clock():
    row = held_by(NEIGHBOUR, renewed_mono=NOW)
    assert not decide_take(row, ME, True, None, NOW + TTL).take          # exactly one TTL: still held
    d = decide_take(row, ME, True, None, NOW + TTL + 0.1)
    assert d.event == LeaseEvent.TAKEN_OVER_EXPIRED and "(monotonic)" in d.detail


def test_local_reading_from_the_future_falls_back_to_watching_the_row():
    row = held_by(NEIGHBOUR, renewed_mono=NOW + 3_600)   # not our boot's clock, whatever the row says
    first = decide_take(row, ME, True, None, NOW)
    assert not first.take and first.watch == Watch(row.observed_key, NOW)
    assert not decide_take(row, ME, True, first.watch, NOW + TTL).take
    assert decide_take(row, ME, True, first.watch, NOW + TTL + 0.1).event == LeaseEvent.TAKEN_OVER_EXPIRED
    # up to a second ahead is clock granularity, not the future: the holder is fresh
    assert decide_take(held_by(NEIGHBOUR, renewed_mono=NOW + 1), ME, True, None, NOW).watch is None


def test_remote_holder_is_taken_only_after_a_ttl_of_observed_silence():
    row = held_by(REMOTE, renewed_mono=-5e9)  # its monotonic reading means nothing here
    first = decide_take(row, ME, None, None, NOW)
    assert not first.take and first.watch == Watch(row.observed_key, NOW)
    assert not decide_take(row, ME, None, first.watch, NOW + TTL).take
    d = decide_take(row, ME, None, first.watch, NOW + TTL + 0.1)
    assert d.event == LeaseEvent.TAKEN_OVER_EXPIRED and "(observed)" in d.detail and d.watch is None


def test_a_remote_renewal_restarts_the_watch():
    watch = decide_take(held_by(REMOTE), ME, None, None, NOW).watch
    renewed = held_by(REMOTE, renewals=1)
    d = decide_take(renewed, ME, None, watch, NOW + TTL + 5)
    assert not d.take and d.watch == Watch(renewed.observed_key, NOW + TTL + 5)


def test_without_a_boot_id_every_holder_is_remote():
    blind = dataclasses.replace(ME, boot=UNKNOWN_BOOT)
    d = decide_take(held_by(dataclasses.replace(NEIGHBOUR, boot=UNKNOWN_BOOT)), blind, None, None, NOW)
    assert not d.take and d.watch is not None   # a dead pid cannot be trusted: watch for a TTL


@given(st.lists(st.tuples(st.floats(0.0, 2 * TTL), st.booleans()), min_size=1, max_size=30))
def test_remote_holder_is_never_taken_within_a_ttl_of_its_last_change(looks):
    """Whatever the spacing of our looks and of its renewals, a takeover happens only once the
    row has stayed unchanged for more than a TTL since we first saw it in that state."""
    now, renewals, watch, changed_seen_at = NOW, 0, None, None
    for gap, renews in looks:
        now += gap
        if renews:
            renewals += 1
        row = held_by(REMOTE, renewals=renewals)
        if watch is None or watch.key != row.observed_key:
            changed_seen_at = now
        d = decide_take(row, ME, None, watch, now)
        if d.take:
            assert now - changed_seen_at > TTL
            return
        watch = d.watch


# ---------------------------------------------------------------- holder_status


def test_status_of_each_kind_of_holder():
    wall = 1_750_000_000.0
    assert holder_status(FREE, ME, None, NOW, wall).state == LeaseState.FREE
    held = holder_status(held_by(NEIGHBOUR, renewed_mono=NOW - 4), ME, True, NOW, wall + 10_000)
    assert (held.state, held.alive, held.heartbeat_age, held.basis) == (LeaseState.HELD, True, 4, Basis.MONOTONIC)
    assert held.expires_in(TTL) == TTL - 4
    expired = holder_status(held_by(NEIGHBOUR, renewed_mono=NOW - TTL - 1), ME, True, NOW, wall)
    assert expired.state == LeaseState.EXPIRED and expired.expires_in(TTL) == 0.0
    dead = holder_status(held_by(NEIGHBOUR, renewed_mono=NOW), ME, False, NOW, wall)
    assert (dead.state, dead.alive, dead.expires_in(TTL)) == (LeaseState.DEAD_HOLDER, False, 0.0)


def test_status_of_a_remote_holder_is_a_wall_clock_estimate():
    wall = 1_750_000_000.0
    remote = holder_status(held_by(REMOTE, renewed_at=wall - 5), ME, None, NOW, wall)
    assert (remote.state, remote.alive, remote.heartbeat_age, remote.basis) == (LeaseState.HELD, None, 5, Basis.WALL)
    assert holder_status(held_by(REMOTE, renewed_at=wall - TTL - 1), ME, None, NOW, wall).state == LeaseState.EXPIRED


def test_states_print_as_their_values():
    assert f"{LeaseState.DEAD_HOLDER}" == "dead-holder" and LeaseEvent.LOST == "lost"
