"""The deal funnel from the decisions table: `ingest deals stats` and `ingest deals rejections`.

Every evaluation outcome is a row (decisions): accepted, rejected (a business reason) or
incomplete (data missing: refetched later, never a rejection), plus janitor removals. The old
system's rejection rate was a grep count that mixed "no data" with "not a deal"; here the two
are always reported apart.
"""

import re

from .errors import EXIT_USAGE, IngestError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


class BadDuration(IngestError):
    exit_code = EXIT_USAGE


def parse_duration(text: str) -> float:
    """'30m', '1h', '2d', '90s', '1w' -> seconds."""
    match = _DURATION.match(str(text).lower())
    if not match or float(match.group(1)) <= 0:
        raise BadDuration(f"not a duration: {text!r} (use e.g. 30m, 1h, 2d)")
    return float(match.group(1)) * UNITS[match.group(2)]


def _by_outcome(conn, since: float, until: float) -> dict[str, dict[str, int]]:
    """outcome -> {reason: decisions} in [since, until], most frequent reason first (one pass)."""
    out: dict[str, dict[str, int]] = {"accepted": {}, "rejected": {}, "incomplete": {}, "removed": {}}
    rows = conn.execute(
        "SELECT outcome, reason, count(*) AS n FROM decisions WHERE at >= ? AND at <= ?"
        " GROUP BY outcome, reason ORDER BY n DESC, reason",
        (since, until),
    )
    for outcome, reason, n in rows:
        out.setdefault(outcome, {})[reason] = n
    return out


def _pct(part: int, whole: int) -> float | None:
    return None if not whole else round(100.0 * part / whole, 1)


def deal_stats(conn, now: float, window_s: float) -> dict:
    """The funnel over (now - window_s, now]: seen -> evaluated -> accepted / rejected by reason /
    incomplete by cause, rates per hour, and the deals table as it stands."""
    since, hours = now - window_s, window_s / 3600.0
    seen = conn.execute("SELECT count(*), sum(CASE WHEN first_seen >= ? THEN 1 ELSE 0 END) FROM deals WHERE last_seen >= ?",
                        (since, since)).fetchone()
    evaluated = conn.execute(
        "SELECT count(DISTINCT asin) FROM decisions WHERE outcome != 'removed' AND at >= ? AND at <= ?",
        (since, now),
    ).fetchone()[0]
    outcomes = _by_outcome(conn, since, now)
    accepted = sum(outcomes["accepted"].values())
    rejected, incomplete, removed = outcomes["rejected"], outcomes["incomplete"], outcomes["removed"]
    n_rej, n_inc = sum(rejected.values()), sum(incomplete.values())
    evaluations = accepted + n_rej + n_inc
    current: dict[str, dict[str, int]] = {"accepted": {}, "rejected": {}, "incomplete": {}}
    for status, reason, n in conn.execute("SELECT status, reason, count(*) FROM deals GROUP BY status, reason"):
        current.setdefault(status, {})[reason] = n
    return {
        "since": since,
        "until": now,
        "window_s": window_s,
        "seen": seen[0],
        "new": seen[1] or 0,
        "evaluations": evaluations,
        "evaluated": evaluated,
        "accepted": accepted,
        "rejected": n_rej,
        "rejected_by_reason": rejected,
        "incomplete": n_inc,
        "incomplete_by_cause": incomplete,
        "removed": sum(removed.values()),
        "removed_by_reason": removed,
        "accepted_pct_of_complete": _pct(accepted, accepted + n_rej),
        "incomplete_pct_of_evaluations": _pct(n_inc, evaluations),
        "per_hour": {
            "seen": round(seen[0] / hours, 1),
            "evaluations": round(evaluations / hours, 1),
            "accepted": round(accepted / hours, 1),
            "rejected": round(n_rej / hours, 1),
            "incomplete": round(n_inc / hours, 1),
        },
        "current": {status: {"total": sum(r.values()), "by_reason": r} for status, r in current.items()},
    }


def rejections(conn, now: float, window_s: float, limit: int = 20) -> dict:
    """Rejections by reason and incomplete outcomes by cause since now - window_s, and the latest rows."""
    since = now - window_s
    rows = conn.execute(
        "SELECT d.at, d.worker, d.asin, d.outcome, d.reason, d.one_year_avg_cents, x.used_price_cents, x.title"
        " FROM decisions d LEFT JOIN deals x USING (asin)"
        " WHERE d.outcome IN ('rejected', 'incomplete') AND d.at >= ? AND d.at <= ?"
        " ORDER BY d.at DESC, d.id DESC LIMIT ?",
        (since, now, limit),
    ).fetchall()
    outcomes = _by_outcome(conn, since, now)
    rejected, incomplete = outcomes["rejected"], outcomes["incomplete"]
    return {
        "since": since,
        "until": now,
        "window_s": window_s,
        "rejected": sum(rejected.values()),
        "rejected_by_reason": rejected,
        "incomplete": sum(incomplete.values()),
        "incomplete_by_cause": incomplete,
        "latest": [dict(r) for r in rows],
    }
