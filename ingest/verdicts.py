"""Checks and verdicts: the records every health check returns and how they fold into one verdict.

A check is a function `Context -> Check`: a `CheckVerdict`, a one-line summary, the next step an
operator should take, and the figures behind it. `run_checks` runs some (one that raises a
database error becomes a 'fail', never a traceback) and `combine` folds them into a
`HealthReport`: 'down' on any fail, 'degraded' on any warn, else 'healthy'. The checks
themselves are in ingest/health.py (what `ingest status` runs) and ingest/diagnostics.py.
"""

import json
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from .backends import backend_of
from .clock import SYSTEM_CLOCK
from .errors import EXIT_BY_VERDICT
from .lease_table import lease_rows
from .leases import LeaseTiming

WORKERS = ("backfill", "upsert")

CheckVerdict = Literal["ok", "warn", "fail"]                 # one check, mildest first
HealthVerdict = Literal["healthy", "degraded", "down"]       # the whole system, from the worst check
VERDICT_ORDER: dict[str, int] = {v: i for i, v in enumerate(get_args(CheckVerdict))}


@dataclass
class Check:
    name: str
    verdict: CheckVerdict
    summary: str
    next_step: str = ""
    data: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class HealthReport:
    """The verdict of a set of checks, the problems worst first, and every check."""

    verdict: HealthVerdict
    problems: list[str]
    checks: list[Check]

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "problems": list(self.problems),
                "checks": [c.to_json() for c in self.checks]}

    @property
    def exit_code(self) -> int:
        """0 healthy, 1 degraded, 2 down: what status commands exit with."""
        return EXIT_BY_VERDICT[self.verdict]


def combine(checks: list[Check]) -> HealthReport:
    """The overall verdict: down on any fail, degraded on any warn. Problems list the worst first."""
    worst = max((VERDICT_ORDER[c.verdict] for c in checks), default=0)
    verdict = get_args(HealthVerdict)[worst]
    bad = sorted((c for c in checks if c.verdict != "ok"), key=lambda c: -VERDICT_ORDER[c.verdict])
    return HealthReport(verdict, [f"{c.name}: {c.summary}" for c in bad], checks)


@dataclass
class Context:
    """What every check reads: the connection, the time, and the thresholds."""

    conn: object  # a connection of either store (ingest.backends)
    now: float
    stall_s: float
    supervisor: dict | None
    timing: LeaseTiming
    workers: tuple[str, ...]
    clock: object = SYSTEM_CLOCK
    _leases: dict | None = None
    config: dict | None = None  # the raw config, for checks with settings of their own ([backup])

    def leases(self) -> dict[str, dict]:
        """lease name -> row of `lease_rows` (cached: several checks read it)."""
        if self._leases is None:
            self._leases = {r["name"]: r for r in lease_rows(self.conn, self.now, clock=self.clock)}
        return self._leases

    def progress(self, worker: str) -> dict | None:
        row = self.conn.execute("SELECT * FROM worker_progress WHERE worker = ?", (worker,)).fetchone()
        return dict(row) if row else None

    def checkpoint(self, name: str) -> tuple[dict, float] | None:
        row = self.conn.execute("SELECT value, updated_at FROM checkpoints WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0]), row[1]
        except ValueError:
            return {}, row[1]


def ago(seconds: float | None) -> str:
    """'42s', '12m', '3.5h', '2.0d' (None: 'never')."""
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def make_context(conn, *, now: float | None = None, supervisor: dict | None = None, stall_minutes: float = 10.0,
                 config: dict | None = None, workers: tuple[str, ...] = WORKERS, clock=SYSTEM_CLOCK) -> Context:
    timing = LeaseTiming.from_config(config or {})
    return Context(conn, clock.wall() if now is None else now, stall_minutes * 60.0, supervisor, timing,
                   tuple(workers), clock, config=config)


def run_checks(ctx: Context, checks) -> list[Check]:
    """Run each check; one that raises becomes a 'fail' naming the error, never a traceback."""
    out = []
    for check in checks:
        try:
            out.append(check(ctx))
        except backend_of(ctx.conn).errors as e:
            out.append(Check(check.__name__.removeprefix("check_"), "fail", f"database error: {e}",
                             "ingest diagnose stall (integrity); check the database file"))
    return out
