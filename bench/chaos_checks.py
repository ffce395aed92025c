"""The chaos run's verdicts: what was injected, and whether each invariant held.

Every check reads the database the run left behind (quiet: supervisord is stopped first), the
simulator's counters and the driver's timeline (bench/chaos_lib.RunResult). Definitions in
docs/chaos.md. A check is a row: name, value, verdict ('ok', 'VIOLATION', 'injected', 'info').
"""

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

ACQUIRED = ("acquired", "taken_over_dead", "taken_over_expired")
ENDED = ("released", "force_released")
MAX_CALL_COST = 100  # one /product call of 100 ASINs: the most one admitted call can overdraw


@dataclass
class Row:
    name: str
    value: str
    verdict: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict == "VIOLATION"


def verdict(ok: bool) -> str:
    return "ok" if ok else "VIOLATION"


def holder_pid(label: str | None) -> int | None:
    try:
        return int(label.split(":")[1]) if label else None
    except (IndexError, ValueError):
        return None


# ---------------------------------------------------------------- what was injected


def injected_rows(result) -> list[Row]:
    counts = defaultdict(int)
    for e in result.events:
        counts[e.kind] += 1
    kills = [e for e in result.events if e.kind == "kill9"]
    stops = [e for e in result.events if e.kind == "sigstop"]
    faults = result.sim_stats.get("faults", {})
    restarts = counts["supervisord_restart"] // 2  # one event per lease
    rows = [
        Row("kill -9 of a worker (holders)", f"{len(kills)} ({sum(1 for e in kills if e.lease)})", "injected"),
        Row("SIGSTOP of a holder past the TTL (holding the write lock)",
            f"{len(stops)} ({sum(1 for e in stops if 'write lock' in e.detail)})", "injected"),
        Row("supervisord restarts", str(restarts), "injected"),
        Row("forced lease releases", str(counts["force_release"]), "injected"),
        Row("HTTP 500", str(faults.get("500", 0)), "injected"),
        Row("timeouts (charged, never answered)", str(faults.get("timeout", 0)), "injected"),
        Row("malformed bodies (charged)", str(faults.get("malformed", 0)), "injected"),
        Row("products without history", str(faults.get("no_history", 0)), "injected"),
        Row("drip-fed bodies (charged, past deadline_s)", str(faults.get("drip", 0)), "injected"),
        Row("redirects to another host", str(faults.get("redirect", 0)), "injected"),
        Row("429 window (forced 429s)", f"{_window_len(result, 'forced_429'):.0f}s ({faults.get('forced_429', 0)})",
            "injected"),
        Row("refill-rate change", f"{result.settings.refill_rate} -> {result.settings.rate_after}/min"
            if counts["rate_change"] else "none", "injected"),
    ]
    return rows


def _window_len(result, kind: str) -> float:
    return sum(w.end - w.start for w in result.windows if w.kind == kind)


def lease_event_rows(conn) -> list[Row]:
    counts = dict(conn.execute("SELECT event, count(*) FROM lease_events GROUP BY event").fetchall())
    return [Row(f"lease events: {e}", str(counts.get(e, 0)), "info")
            for e in ("acquired", "taken_over_dead", "taken_over_expired", "lost", "force_released", "released")]


# ---------------------------------------------------------------- invariants


def check_outcomes(conn, listed: list[str]) -> Row:
    """Every ASIN the simulator listed is one deals row with an outcome (or was removed by the
    janitor, with a decision saying so)."""
    deals = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT asin, status, reason FROM deals")}
    decided = {r[0] for r in conn.execute("SELECT DISTINCT asin FROM decisions")}
    removed = {r[0] for r in conn.execute("SELECT asin FROM decisions d WHERE outcome = 'removed' AND id = "
                                          "(SELECT max(id) FROM decisions WHERE asin = d.asin)")}
    missing = [a for a in listed if a not in deals and a not in removed]
    no_reason = [a for a in listed if a in deals and deals[a][0] != "accepted" and not (deals[a][1] or "").strip()]
    undecided = [a for a in listed if a in deals and a not in decided]
    bad = missing + no_reason + undecided
    by_status = defaultdict(int)
    for a in listed:
        if a in deals:
            by_status[deals[a][0]] += 1
    detail = ", ".join(f"{k} {v}" for k, v in sorted(by_status.items()))
    if bad:
        detail += f"; missing {missing[:5]} ({len(missing)}), no reason {no_reason[:5]}, no decision {undecided[:5]}"
    return Row("listed ASINs stored once with an outcome", f"{len(listed) - len(bad)}/{len(listed)}",
               verdict(not bad and bool(listed)), detail)


def epochs(conn, lease: str) -> dict[int, dict]:
    """fence -> {start, end, pid} from lease_events (wall times taken inside the transactions,
    which the write lock serialises, so they order events and commits correctly)."""
    out: dict[int, dict] = {}
    for name, at, event, fence, holder in conn.execute(
            "SELECT name, at, event, fence, holder FROM lease_events WHERE name = ? ORDER BY id", (lease,)):
        if event in ACQUIRED:
            for f, ep in out.items():
                if ep["end"] is None and f < fence:
                    ep["end"] = at
            out[fence] = {"start": at, "end": None, "pid": holder_pid(holder)}
        elif event in ENDED and fence in out and out[fence]["end"] is None:
            out[fence]["end"] = at
    return out


def check_fencing(conn, leases) -> list[Row]:
    decreases, outside, wrong_pid, total = [], [], [], 0
    for lease in leases:
        eps = epochs(conn, lease)
        last = None
        for cid, fence, at, pid, what in conn.execute(
                "SELECT id, fence, at, pid, what FROM fenced_commits WHERE lease = ? ORDER BY id", (lease,)):
            total += 1
            if last is not None and fence < last:
                decreases.append((lease, cid, last, fence))
            last = fence
            ep = eps.get(fence)
            if ep is None or at < ep["start"] or (ep["end"] is not None and at > ep["end"]):
                outside.append((lease, cid, fence, at, what))
            elif ep["pid"] is not None and ep["pid"] != pid:
                wrong_pid.append((lease, cid, fence, pid, ep["pid"]))
    return [
        Row("fence never decreases along commit order", f"{len(decreases)} decreases in {total} commits",
            verdict(not decreases and total > 0), str(decreases[:5]) if decreases else ""),
        Row("each commit inside its fence's epoch, by its holder", f"{len(outside) + len(wrong_pid)} outside",
            verdict(not outside and not wrong_pid), str((outside + wrong_pid)[:5]) if outside or wrong_pid else ""),
    ]


def handover_gaps(conn, result) -> list[tuple[object, float | None]]:
    """For each disruption of a holder: seconds from when the next holder could start (ref_at)
    until a holder works again: an acquisition with a higher fence, or (no takeover happened)
    the disrupted holder's next commit."""
    gaps = []
    for e in result.events:
        if e.lease is None or e.fence is None or e.kind not in ("kill9", "sigstop", "force_release", "supervisord_restart"):
            continue
        acq = conn.execute("SELECT min(at) FROM lease_events WHERE name = ? AND fence > ? AND event IN (?, ?, ?) AND at >= ?",
                           (e.lease, e.fence, *ACQUIRED, e.at)).fetchone()[0]
        again = conn.execute("SELECT min(at) FROM fenced_commits WHERE lease = ? AND fence = ? AND at >= ?",
                             (e.lease, e.fence, e.ref_at)).fetchone()[0]
        ends = [t for t in (acq, again) if t is not None]
        gaps.append((e, (min(ends) - e.ref_at) if ends else None))
    return gaps


def check_stalls(conn, result) -> list[Row]:
    bound = result.settings.stall_bound_s
    gaps = handover_gaps(conn, result)
    measured = [g for _, g in gaps if g is not None]
    late = [(e.kind, e.lease, round(g, 2)) for e, g in gaps if g is not None and g > bound]
    never = [(e.kind, e.lease) for e, g in gaps if g is None]
    excused = [w for w in result.windows if w.kind in ("supervisord_down", "write_locked_stop")]
    unexplained = []
    longest = 0.0
    for lease, intervals in result.unowned.items():
        for start, end in intervals:
            begin = max([start] + [w.end for w in excused if w.start - 1.0 <= start <= w.end + 1.0])
            length = end - begin
            longest = max(longest, length)
            if length > bound:
                unexplained.append((lease, round(start - result.events[0].at, 1), round(length, 2)))
    return [
        Row(f"handover after each disruption <= ttl+renew ({bound:g}s)",
            f"max {max(measured, default=0):.2f}s over {len(measured)}", verdict(not late and not never),
            f"late {late[:5]} never {never[:5]}" if late or never else ""),
        Row(f"no lease without a live holder > {bound:g}s (sampled)", f"max {longest:.2f}s",
            verdict(not unexplained), str(unexplained[:5]) if unexplained else ""),
    ]


def check_429s(conn, result) -> list[Row]:
    stats = result.sim_stats
    natural = stats.get("served_429", 0) - stats.get("faults", {}).get("forced_429", 0)
    windows = [w for w in result.windows if w.kind == "forced_429"]
    calls = conn.execute("SELECT at FROM keepa_calls WHERE status = 'rate_limited' OR http_status = 429").fetchall()
    slack = 1.0 + result.settings.read_timeout_s  # `at` is taken when the answer is read
    outside = [at for (at,) in calls if not any(w.start - 0.5 <= at <= w.end + slack for w in windows)]
    return [
        Row("429s only inside the injected window", f"{len(calls)} logged, {len(outside)} outside; "
            f"server: {natural} not forced", verdict(not outside and natural == 0)),
    ]


def check_tokens(conn, result) -> list[Row]:
    tokens = result.sim_stats.get("tokens", {})
    consumed, refilled = tokens.get("consumed", 0), tokens.get("refilled", 0)
    supplied = result.start_tokens + refilled
    logged = conn.execute("SELECT coalesce(sum(actual), 0) FROM keepa_calls").fetchone()[0]
    faults = result.sim_stats.get("faults", {})
    unheard = faults.get("timeout", 0) + faults.get("malformed", 0)
    gap = consumed - logged
    min_balance = result.min_balance
    return [
        Row("tokens used against tokens refilled", f"used {consumed} of {supplied} ({start_pct(consumed, supplied)})",
            verdict(consumed <= supplied + MAX_CALL_COST),
            f"start {result.start_tokens} + refilled {refilled}; final balance {tokens.get('tokensLeft')}"),
        Row("lowest balance seen (>= -one call)", "n/a" if min_balance is None else str(min_balance),
            verdict(min_balance is None or min_balance >= -MAX_CALL_COST)),
        Row("bucket never at its cap (no refill lost)", f"max {result.max_balance} of cap {result.cap}",
            verdict(result.max_balance is None or result.max_balance < result.cap)),
        Row("ledger's call log vs server's charges", f"logged {logged}, charged {consumed}, gap {gap}",
            verdict(0 <= gap <= unheard * MAX_CALL_COST),
            f"gap = tokens charged for answers never read ({unheard} timeouts/malformed)"),
    ]


def start_pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.0f}%" if whole else "n/a"


def check_integrity(store, conn) -> Row:
    """The store's own check, in full: SQLite's PRAGMA integrity_check; PostgreSQL's amcheck of
    every index (the run creates the extension in its own server, bench/chaos.py --postgres)."""
    found = store.backend.integrity(conn, quick=False)
    if found.skipped:
        return Row(found.label, "not run", "info", found.skipped)
    problems = list(found.problems)
    return Row(found.label, "ok" if not problems else f"{len(problems)} problems", verdict(not problems),
               "; ".join(problems[:3]))


def check_key_stays_home(result) -> Row:
    hits = result.redirect_target_hits
    return Row("requests that followed a redirect to another host", str(hits), verdict(hits == 0))


def check_settled(result) -> Row:
    took = None if result.settled_at is None else result.settled_at - result.settle_at
    return Row("settled: backfill pass + upsert caught up", "timed out" if took is None else f"{took:.0f}s",
               verdict(took is not None), json.dumps(result.settle_state) if took is None else "")


EXIT_LINE = re.compile(r"^(\S+ \S+) (?:INFO|WARN) exited: (\S+) \((exit status (\d+)|terminated by (\S+)); (not )?expected\)")


def check_exits(result) -> list[Row]:
    """Worker exits from supervisord's log: SIGKILL (ours), 5 (lost lease) and 0 are expected;
    anything else is a crash, unless a paused process held the database's write lock then."""
    path = result.log_dir / "supervisord.log"
    counts, crashes, quit_alone = defaultdict(int), [], []
    locked = [w for w in result.windows if w.kind == "write_locked_stop"]
    for line in path.read_text().splitlines() if path.exists() else []:
        m = EXIT_LINE.match(line)
        if not m:
            continue
        how = m.group(4) or m.group(5)
        counts[how] += 1
        if how == "0":  # supervisord did not stop it ("stopped:" lines): it quit on its own, and
            quit_alone.append((m.group(2), m.group(1)))  # exit 0 is never restarted
        if how not in ("0", "5", "SIGKILL"):
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if not any(w.start <= at <= w.end + 60 for w in locked):
                crashes.append((m.group(2), how, m.group(1)))
    fatal = [line for line in (path.read_text().splitlines() if path.exists() else []) if "gave up:" in line]
    return [
        Row("worker exits (status: count)", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none", "info"),
        Row("no worker crash (exit other than 0/5/SIGKILL)", str(len(crashes) + len(fatal)),
            verdict(not crashes and not fatal), str((crashes + fatal)[:5]) if crashes or fatal else ""),
        Row("no worker quit on its own with exit 0 (not restarted)", str(len(quit_alone)),
            verdict(not quit_alone), str(quit_alone[:5]) if quit_alone else ""),
    ]


def check_programs(result) -> Row:
    down = {p: st for p, st in result.programs_at_end.items() if st != "RUNNING"}
    return Row("every program RUNNING after settling", f"{len(result.programs_at_end) - len(down)}/"
               f"{len(result.programs_at_end)}", verdict(not down and bool(result.programs_at_end)),
               str(down) if down else "")


def status_row(result) -> Row:
    status = result.status_json or {}
    problems = [p if isinstance(p, str) else json.dumps(p) for p in status.get("problems", [])][:3]
    return Row("`ingest status` after settling", str(status.get("verdict")), "info", "; ".join(problems))


def all_rows(result) -> list[Row]:
    conn = result.store.read_only()  # the run is over: nothing writes
    try:
        listed = result.sim_stats.get("deal_asins") or result.sim_stats.get("listed_asins") or []
        rows = injected_rows(result) + lease_event_rows(conn)
        rows.append(check_settled(result))
        rows.append(check_outcomes(conn, listed))
        rows += check_fencing(conn, ("backfill", "upsert"))
        rows += check_stalls(conn, result)
        rows += check_429s(conn, result)
        rows += check_tokens(conn, result)
        rows.append(check_integrity(result.store, conn))
        rows.append(check_key_stays_home(result))
        rows += check_exits(result)
        rows.append(check_programs(result))
        rows.append(status_row(result))
        return rows
    finally:
        conn.close()


def format_table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    vwidth = max(len(r.value) for r in rows)
    lines = [f"| {'check':<{width}} | {'count / value':<{vwidth}} | verdict |", f"|{'-' * (width + 2)}|{'-' * (vwidth + 2)}|---------|"]
    for r in rows:
        lines.append(f"| {r.name:<{width}} | {r.value:<{vwidth}} | {r.verdict} |")
    notes = [f"- {r.name}: {r.detail}" for r in rows if r.detail and r.verdict != "injected"]
    return "\n".join(lines + ([""] + notes if notes else []))
