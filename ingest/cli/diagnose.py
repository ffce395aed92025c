"""`ingest diagnose asin|stall`, and `ingest deals stats|rejections` (added to the deals group)."""

import time

import click

from . import echo_json
from ..asins import asin_argument
from .deals import deals_group
from ..errors import StoreError
from ..supervisor import supervisor_states
from ..verdicts import Check, HealthReport, combine

VERDICT_LABEL = {"ok": "OK  ", "warn": "WARN", "fail": "FAIL"}


@click.group("diagnose")
def diagnose():
    """Why is it stalled? Why was this deal rejected?"""


# ------------------------------------------------------------------ asin


@diagnose.command("asin")
@click.argument("asin", type=asin_argument)
@click.option("--fetch", is_flag=True, help="Fetch the product from Keepa afresh (costs tokens, through the ledger).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def diagnose_asin(app, asin, fetch, as_json):
    """The 1yr average of ASIN step by step: history span, inferred sales with dates and prices,
    outliers removed, result and reason. From stored history at zero token cost."""
    from ..analytics import AnalyticsParams
    from ..asin_report import explain_fetched, explain_stored, render

    params = AnalyticsParams.from_config(app.config)
    conn = app.db()
    if fetch:
        from ..metered import open_keepa

        keepa = open_keepa(app.db_path, app.config, worker="diagnose")
        try:
            report = explain_fetched(conn, asin, params, keepa, time.time())
        finally:
            keepa.close()
    else:
        report = explain_stored(conn, asin, params)
    if as_json:
        echo_json(report)
        return
    for line in render(report):
        click.echo(line)


# ------------------------------------------------------------------ stall


def _unusable_database(app, error: StoreError) -> HealthReport:
    """The database cannot be opened: say so as a failed check, with the checks that need no database."""
    from ..diagnostics import Environment, check_disk, check_sqlite_version

    env = Environment(app.db_path)
    return combine([Check("database", "fail", str(error),
                          "ingest db info; check the path, permissions and disk; restore from a backup if damaged"),
                    check_sqlite_version(env), check_disk(env)])


def print_report(result: HealthReport) -> None:
    width = max((len(c.name) for c in result.checks), default=8)
    for check in result.checks:
        click.echo(f"{VERDICT_LABEL[check.verdict]}  {check.name:<{width}}  {check.summary}")
        if check.verdict != "ok" and check.next_step:
            click.echo(f"      {'':<{width}}  -> {check.next_step}")
    click.echo(f"verdict: {result.verdict}")


@diagnose.command("stall")
@click.option("--stall-minutes", type=click.FloatRange(min=0.1, max=7 * 24 * 60), default=None,
              help="No progress for this long while holding a lease is a stall (default: [health] stall_minutes, 10).")
@click.option("--supervisor-conf", metavar="PATH", help="supervisord config (default: supervisor.d/supervisord.conf).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def diagnose_stall(app, stall_minutes, supervisor_conf, as_json):
    """Every check an operator used to run by hand, each with a verdict and the next step.
    Exit 0 healthy, 1 degraded, 2 down."""
    from ..diagnostics import diagnose_stall as run

    if stall_minutes is None:
        stall_minutes = app.settings["health"].stall_minutes
    try:
        conn = app.db()
    except StoreError as e:
        result = _unusable_database(app, e)
    else:
        result = run(conn, app.db_path, supervisor=supervisor_states(supervisor_conf), stall_minutes=stall_minutes,
                     config=app.config)
    if as_json:
        echo_json(result.to_json())
    else:
        print_report(result)
    raise SystemExit(result.exit_code)


# ------------------------------------------------------------------ deals stats / rejections


def _window(value: str) -> float:
    from ..funnel import BadDuration, parse_duration

    try:
        return parse_duration(value)
    except BadDuration as e:
        raise click.BadParameter(str(e)) from None


def _counts(title: str, counts: dict, per_hour_of: float) -> None:
    total = sum(counts.values())
    click.echo(f"{title}: {total}")
    for reason, n in counts.items():
        share = f"{100 * n / total:.0f}%" if total else "-"
        click.echo(f"  {reason:<22} {n:>7}  {share:>4}  {n / per_hour_of:.1f}/h")


@deals_group.command("stats")
@click.option("--since", "since", default="24h", show_default=True, help="Window: 30m, 1h, 2d ...")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def deals_stats(app, since, as_json):
    """The funnel: seen, evaluated, accepted, rejected by reason, incomplete by cause, per hour.
    Incomplete (data missing, refetched later) is never counted as a rejection."""
    from ..funnel import deal_stats

    window = _window(since)
    stats = deal_stats(app.db(), time.time(), window)
    if as_json:
        echo_json(stats)
        return
    hours = window / 3600
    p = stats["per_hour"]
    click.echo(f"last {since}: seen {stats['seen']} ({stats['new']} new, {p['seen']}/h),"
               f" evaluated {stats['evaluated']} deals in {stats['evaluations']} evaluations ({p['evaluations']}/h)")
    pct = stats["accepted_pct_of_complete"]
    click.echo(f"accepted: {stats['accepted']}  ({p['accepted']}/h"
               + (f", {pct}% of complete evaluations)" if pct is not None else ")"))
    _counts("rejected", stats["rejected_by_reason"], hours)
    inc = stats["incomplete_pct_of_evaluations"]
    _counts("incomplete (data missing, will be refetched)" + (f" [{inc}% of evaluations]" if inc is not None else ""),
            stats["incomplete_by_cause"], hours)
    if stats["removed"]:
        _counts("removed by the janitor", stats["removed_by_reason"], hours)
    current = stats["current"]
    click.echo("stored now: " + ", ".join(f"{s} {current[s]['total']}" for s in current))


@deals_group.command("rejections")
@click.option("--since", "since", default="1h", show_default=True, help="Window: 30m, 1h, 2d ...")
@click.option("--limit", type=click.IntRange(1, 100_000), default=20, show_default=True,
              help="Latest rows to list.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def deals_rejections(app, since, limit, as_json):
    """Rejections by reason and incomplete outcomes by cause, from the decisions table."""
    from ..funnel import rejections

    window = _window(since)
    report = rejections(app.db(), time.time(), window, limit)
    if as_json:
        echo_json(report)
        return
    hours = window / 3600
    _counts(f"rejected in the last {since}", report["rejected_by_reason"], hours)
    _counts(f"incomplete in the last {since} (not rejections: refetched later)", report["incomplete_by_cause"], hours)
    if report["latest"]:
        click.echo("latest:")
        for r in report["latest"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["at"]))
            avg = "-" if r["one_year_avg_cents"] is None else f"{r['one_year_avg_cents'] / 100:.2f}"
            click.echo(f"  {when}  {r['asin']:<12} {r['outcome']:<10} {r['reason']:<20} avg {avg:>8}"
                       f"  {(r['title'] or '')[:40]}")


commands = [diagnose]
