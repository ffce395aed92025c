"""Each verdict of each health check, from database states built row by row (time injected)."""

import json
import os
from typing import get_args

import pytest

from ingest.clock import FakeClock
from ingest.errors import EXIT_BY_VERDICT
from ingest.health import (RESTART_LOOP_ACQUISITIONS, assess_health, check_database, check_heartbeats, check_last_fetch,
                           check_leases, check_progress, check_rate_limits, check_restarts, check_supervisor,
                           check_tokens)
from ingest.procinfo import Identity
from ingest.store import open_db
from ingest.verdicts import Check, HealthVerdict, combine, make_context

NOW = 1_750_000_000.0
MONO = 50_000.0
RUNNING = {"backfill": {"state": "RUNNING", "pid": 11, "uptime_s": 600},
           "upsert": {"state": "RUNNING", "pid": 12, "uptime_s": 600}}


# ------------------------------------------------------------------ building states


@pytest.fixture
def conn(db_path):
    c = open_db(db_path)
    yield c
    c.close()


def clock():
    return FakeClock(wall=NOW, monotonic=MONO)


def put_lease(conn, name, *, heartbeat_age=2.0, held_for=3 * 3600.0, how="alive", fence=1, ttl=30.0):
    """A lease row. how: 'alive' (this process, exact monotonic age), 'dead' (this host, a pid whose
    start time does not match: a dead holder), 'remote' (another host: wall-clock age), 'free'."""
    me = Identity.current()
    if how == "free":
        conn.execute("INSERT OR REPLACE INTO leases (name, fence, ttl_s, transitions) VALUES (?, ?, ?, 1)",
                     (name, fence, ttl))
        return
    host, boot, pidns, pid, start = me.host, me.boot, me.pidns, os.getpid(), me.start
    if how == "dead":
        start = "1"  # another process started at another time: pid reused, holder gone
    elif how == "remote":
        host = "elsewhere"
    renewed = NOW - heartbeat_age
    conn.execute(
        "INSERT OR REPLACE INTO leases (name, holder_host, holder_boot, holder_pidns, holder_pid, holder_start,"
        " holder_nonce, fence, ttl_s, acquired_at, renewed_at, expires_at, renewed_mono, renewals, transitions)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (name, host, boot, pidns, pid, start, f"nonce{name}", fence, ttl, NOW - held_for, renewed, renewed + ttl,
         MONO - heartbeat_age, 5, fence),
    )


def put_progress(conn, worker, *, commit_age=30.0, success_age=30.0, state="working", last_error=None):
    conn.execute(
        "INSERT OR REPLACE INTO worker_progress (worker, pid, fence, state, started_at, updated_at,"
        " last_success_at, last_commit_at, last_error) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?)",
        (worker, os.getpid(), state, NOW - 3600, NOW - 5,
         None if success_age is None else NOW - success_age,
         None if commit_age is None else NOW - commit_age, last_error),
    )


def put_account(conn, *, balance=150.0, rate=5.0, blocked_until=None):
    conn.execute(
        "INSERT OR REPLACE INTO token_accounts (account, balance, in_flight, as_of, refill_rate, next_tick,"
        " synced_at, blocked_until) VALUES ('kacct', ?, 0, ?, ?, ?, ?, ?)",
        (balance, NOW, rate, NOW + 30, NOW, blocked_until),
    )


def put_call(conn, *, age=60.0, actual=5, status="ok", worker="backfill", tokens_left=100, endpoint="deal"):
    conn.execute(
        "INSERT INTO keepa_calls (at, account, worker, endpoint, asins, estimated, actual, status, http_status,"
        " latency_ms, tokens_left) VALUES (?, 'kacct', ?, ?, 0, 5, ?, ?, ?, 100, ?)",
        (NOW - age, worker, endpoint, actual, status, 429 if status == "rate_limited" else 200, tokens_left),
    )


def put_checkpoint(conn, name, value, age=30.0):
    conn.execute("INSERT OR REPLACE INTO checkpoints (name, value, updated_at, fence) VALUES (?, ?, ?, 1)",
                 (name, json.dumps(value), NOW - age))


def put_event(conn, name, event="acquired", age=60.0, fence=1):
    conn.execute("INSERT INTO lease_events (name, at, event, fence, holder) VALUES (?, ?, ?, ?, 'h')",
                 (name, NOW - age, event, fence))


def healthy_state(conn):
    for worker in ("backfill", "upsert"):
        put_lease(conn, worker)
        put_progress(conn, worker)
    put_account(conn)
    put_call(conn)


def run(check, conn, supervisor=RUNNING, **kw):
    return check(make_context(conn, now=NOW, supervisor=supervisor, clock=clock(), **kw))


# ------------------------------------------------------------------ overall verdicts


def test_healthy_state_is_healthy_with_exit_code_0(conn):
    healthy_state(conn)
    result = assess_health(conn, now=NOW, supervisor=RUNNING, clock=clock())
    assert (result.verdict, result.problems, result.exit_code) == ("healthy", [], 0)
    payload = result.to_json()
    assert payload["verdict"] == "healthy" and payload["problems"] == []
    assert {c["name"] for c in payload["checks"]} >= {"leases", "heartbeats", "progress", "tokens", "rate_limits",
                                                       "restarts", "supervisor", "database"}
    assert all(set(c) == {"name", "verdict", "summary", "next_step", "data"} for c in payload["checks"])
    json.dumps(payload)  # JSON-able through and through


def test_fresh_database_is_down(conn):
    result = assess_health(conn, now=NOW, supervisor=None, clock=clock())
    assert result.verdict == "down" and result.exit_code == 2
    assert any(p.startswith("leases: backfill lease never taken") for p in result.problems)


def test_any_warn_is_degraded_and_fails_are_listed_first():
    checks = [Check("a", "ok", "fine"), Check("b", "warn", "meh"), Check("c", "fail", "bad")]
    assert combine(checks[:2]).verdict == "degraded"
    assert combine(checks).verdict == "down"
    assert combine(checks).problems == ["c: bad", "b: meh"]
    assert combine(checks[:1]).verdict == "healthy"


def test_every_verdict_has_its_documented_exit_code():
    assert EXIT_BY_VERDICT == dict(zip(get_args(HealthVerdict), (0, 1, 2)))


def test_unreachable_supervisor_degrades_but_does_not_fail(conn):
    healthy_state(conn)
    result = assess_health(conn, now=NOW, supervisor=None, clock=clock())
    assert result.verdict == "degraded"
    assert result.problems == ["supervisor: supervisord is not reachable: process states unknown"]


# ------------------------------------------------------------------ leases


@pytest.mark.parametrize("how, verdict, words", [
    ("alive", "ok", "backfill held"),
    ("remote", "ok", "backfill held"),
    ("free", "fail", "backfill lease free"),
    ("dead", "fail", "held by dead pid"),
])
def test_leases_verdicts(conn, how, verdict, words):
    put_lease(conn, "upsert")
    put_lease(conn, "backfill", how=how)
    check = run(check_leases, conn)
    assert check.verdict == verdict and words in check.summary
    if verdict != "ok":
        assert check.next_step


def test_expired_lease_warns(conn):
    put_lease(conn, "upsert")
    put_lease(conn, "backfill", heartbeat_age=45.0)  # ttl 30
    check = run(check_leases, conn)
    assert check.verdict == "warn" and "backfill lease expired" in check.summary


def test_missing_lease_row_fails(conn):
    put_lease(conn, "upsert")
    check = run(check_leases, conn)
    assert check.verdict == "fail" and "backfill lease never taken" in check.summary


# ------------------------------------------------------------------ heartbeats


@pytest.mark.parametrize("age, verdict", [(3.0, "ok"), (14.0, "ok"), (16.0, "warn"), (25.0, "warn")])
def test_heartbeat_late_after_renew_interval_plus_margin(conn, age, verdict):
    put_lease(conn, "backfill", heartbeat_age=age)  # renew_s 10 + margin 5 = 15
    check = run(check_heartbeats, conn)
    assert check.verdict == verdict
    if verdict == "warn":
        assert "backfill renewed" in check.summary


def test_heartbeat_limit_follows_configured_timing(conn):
    put_lease(conn, "backfill", heartbeat_age=16.0, ttl=120.0)
    config = {"leases": {"ttl_s": 120.0, "renew_s": 30.0, "retry_s": 5.0}}
    assert run(check_heartbeats, conn, config=config).verdict == "ok"


def test_remote_holder_heartbeat_is_judged_by_wall_clock(conn):
    put_lease(conn, "upsert", how="remote", heartbeat_age=20.0)
    check = run(check_heartbeats, conn)
    assert check.verdict == "warn" and check.data["upsert"]["basis"] == "wall"


# ------------------------------------------------------------------ progress (stall)


def test_progress_ok_when_committing(conn):
    healthy_state(conn)
    assert run(check_progress, conn).verdict == "ok"


def test_lease_held_but_no_commit_for_stall_minutes_warns(conn):
    healthy_state(conn)
    put_progress(conn, "upsert", commit_age=11 * 60, state="working", last_error="read timeout")
    check = run(check_progress, conn)
    assert check.verdict == "warn"
    assert "upsert holds its lease but committed nothing for 11m" in check.summary
    assert "read timeout" in check.summary
    assert run(check_progress, conn, stall_minutes=15).verdict == "ok"


def test_new_holder_gets_grace_from_acquisition(conn):
    healthy_state(conn)
    put_progress(conn, "upsert", commit_age=3600)           # the previous holder's last commit
    put_lease(conn, "upsert", held_for=60.0, fence=2)       # taken over a minute ago
    assert run(check_progress, conn).verdict == "ok"


def test_backfill_between_passes_is_not_a_stall(conn):
    healthy_state(conn)
    put_progress(conn, "backfill", commit_age=3600, state="idle")
    put_checkpoint(conn, "backfill", {"pass": 3, "page": 0, "pending": None, "next_pass_at": NOW + 120})
    check = run(check_progress, conn)
    assert check.verdict == "ok" and check.data["backfill"]["next_pass_in"] == 120
    put_checkpoint(conn, "backfill", {"pass": 3, "page": 0, "pending": None, "next_pass_at": NOW - 3000})
    assert run(check_progress, conn).verdict == "warn"


# ------------------------------------------------------------------ last successful fetch


def test_last_fetch_ok(conn):
    healthy_state(conn)
    check = run(check_last_fetch, conn)
    assert check.verdict == "ok" and check.data["backfill"]["last_call_status"] == "ok"


def test_commits_without_successful_fetch_warn(conn):
    healthy_state(conn)
    put_progress(conn, "backfill", commit_age=20, success_age=40 * 60)
    put_call(conn, age=30, status="malformed", actual=None)
    assert run(check_progress, conn).verdict == "ok"
    check = run(check_last_fetch, conn)
    assert check.verdict == "warn"
    assert "backfill: last successful Keepa fetch 40m ago (last call: malformed, 30s ago)" in check.summary


def test_never_fetched_warns_only_after_stall_from_acquisition(conn):
    put_lease(conn, "backfill", held_for=60)
    put_lease(conn, "upsert", held_for=3600)
    check = run(check_last_fetch, conn)
    assert check.verdict == "warn" and "upsert: last successful Keepa fetch never" in check.summary
    assert "backfill" not in check.summary


def test_held_lease_without_any_progress_row_warns_after_stall(conn):
    put_lease(conn, "backfill", held_for=20 * 60)
    put_lease(conn, "upsert", held_for=60)
    check = run(check_progress, conn)
    assert check.verdict == "warn" and "backfill" in check.summary and "upsert" not in check.summary


# ------------------------------------------------------------------ tokens


def test_tokens_ok(conn):
    healthy_state(conn)
    check = run(check_tokens, conn)
    assert check.verdict == "ok" and "balance 150/300" in check.summary


def test_tokens_full_and_nothing_spent_warns(conn):
    put_account(conn, balance=300.0)
    put_call(conn, age=30 * 60)  # last spend long ago
    check = run(check_tokens, conn)
    assert check.verdict == "warn" and "tokens full (300/300)" in check.summary


def test_tokens_projected_to_full_by_refill_ticks(conn):
    conn.execute("INSERT INTO token_accounts (account, balance, in_flight, as_of, refill_rate, next_tick)"
                 " VALUES ('k', 0, 0, ?, 5, ?)", (NOW - 7200, NOW - 7170))  # two idle hours: refilled to cap
    assert run(check_tokens, conn).verdict == "warn"


def test_tokens_full_but_spending_is_ok(conn):
    put_account(conn, balance=300.0)
    put_call(conn, age=60, actual=5)
    assert run(check_tokens, conn).verdict == "ok"


def test_tokens_blocked_after_429_warns(conn):
    put_account(conn, balance=-20.0, blocked_until=NOW + 90)
    put_call(conn)
    check = run(check_tokens, conn)
    assert check.verdict == "warn" and "blocked after a 429" in check.summary


def test_no_ledger_account_warns(conn):
    assert run(check_tokens, conn).verdict == "warn"


# ------------------------------------------------------------------ 429s, restarts, supervisor


def test_recent_429_warns_old_one_does_not(conn):
    put_call(conn, status="rate_limited", actual=0, age=30 * 60)
    assert run(check_rate_limits, conn).verdict == "ok"
    put_call(conn, status="rate_limited", actual=0, age=60, worker="upsert")
    check = run(check_rate_limits, conn)
    assert check.verdict == "warn" and check.data["by_worker"] == {"upsert": 1}


def test_many_acquisitions_recently_is_a_restart_loop(conn):
    for i in range(RESTART_LOOP_ACQUISITIONS - 1):
        put_event(conn, "backfill", "taken_over_dead", age=60 * (i + 1), fence=i + 1)
    put_event(conn, "backfill", "acquired", age=3600)  # outside the window
    assert run(check_restarts, conn).verdict == "ok"
    put_event(conn, "backfill", "acquired", age=30, fence=9)
    check = run(check_restarts, conn)
    assert check.verdict == "warn" and f"backfill acquired {RESTART_LOOP_ACQUISITIONS} times" in check.summary


def test_supervisor_backoff_is_a_restart_loop(conn):
    supervisor = {**RUNNING, "backfill": {"state": "BACKOFF", "pid": 0}}
    assert run(check_restarts, conn, supervisor=supervisor).verdict == "warn"


@pytest.mark.parametrize("state, verdict", [("RUNNING", "ok"), ("STARTING", "warn"), ("BACKOFF", "warn"),
                                            ("STOPPED", "fail"), ("FATAL", "fail"), ("EXITED", "fail")])
def test_supervisor_states(conn, state, verdict):
    supervisor = {"ingest:backfill": {"state": state, "pid": 11}, "ingest:upsert": {"state": "RUNNING", "pid": 12}}
    assert run(check_supervisor, conn, supervisor=supervisor).verdict == verdict


def test_supervisor_missing_program_fails(conn):
    assert run(check_supervisor, conn, supervisor={"upsert": RUNNING["upsert"]}).verdict == "fail"


def test_supervisor_unreachable_warns(conn):
    check = run(check_supervisor, conn, supervisor=None)
    assert check.verdict == "warn" and "not reachable" in check.summary


def test_database_check(conn):
    assert run(check_database, conn).verdict == "ok"
    conn.execute("PRAGMA user_version = 1")
    assert run(check_database, conn).verdict == "fail"


def test_assess_down_when_a_worker_is_stopped_even_if_the_other_runs(conn):
    healthy_state(conn)
    put_lease(conn, "backfill", how="free")
    supervisor = {**RUNNING, "backfill": {"state": "STOPPED", "pid": 0}}
    result = assess_health(conn, now=NOW, supervisor=supervisor, clock=clock())
    assert result.verdict == "down"
    assert [p.split(":")[0] for p in result.problems] == ["supervisor", "leases"]
