"""`ingest deals`: list stored deals; `ingest deals recompute`: re-run analytics for free."""

import click

from . import echo_json, echo_table
from .. import deals as store_deals


@click.group("deals", invoke_without_command=True)
@click.option("--status", type=click.Choice(store_deals.STATUSES), help="Only deals with this status.")
@click.option("--limit", type=click.IntRange(0, 10_000_000), default=50, show_default=True,
              help="At most this many (0: all).")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of deal objects.")
@click.pass_context
def deals_group(ctx, status, limit, as_json):
    """List stored deals, most recently seen first."""
    if ctx.invoked_subcommand is not None:
        return
    rows = store_deals.list_deals(ctx.obj.db(), status=status, limit=limit or None)
    if as_json:
        echo_json([{**row, "reason": row["reason"], "one_year_avg": row["one_year_avg_cents"]} for row in rows])
        return
    counts = store_deals.deal_counts(ctx.obj.db())
    click.echo("  ".join(f"{k}: {v}" for k, v in counts.items()))
    echo_table(["ASIN", "STATUS", "REASON", "USED", "1YR AVG", "SALES", "TITLE"],
               [[row["asin"], row["status"], row["reason"], _cents(row["used_price_cents"]),
                 _cents(row["one_year_avg_cents"]), row["avg_sales"], (row["title"] or "")[:50]] for row in rows],
               right=("USED", "1YR AVG"))


def _cents(value):
    return "-" if value is None else f"{value / 100:.2f}"


@deals_group.command("recompute")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def recompute_command(app, as_json):
    """Re-evaluate every deal from its stored history (no Keepa call, no token)."""
    import time

    from ..analytics import AnalyticsParams
    from ..recompute import recompute_all

    def progress(done, total):
        if not as_json:
            click.echo(f"\r{done}/{total} deals re-evaluated", nl=False, err=True)

    result = recompute_all(app.db(), AnalyticsParams.from_config(app.config), time.time(), progress)
    if as_json:
        echo_json(result.__dict__)
    else:
        click.echo(f"\n{result.examined} examined, {result.changed} changed, "
                   f"{result.skipped_refetched} skipped (refetched meanwhile)", err=False)


commands = [deals_group]
