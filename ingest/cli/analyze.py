"""`ingest analyze FILE`: the 1yr average and the deal decision for products in a Keepa
/product response (or one product object), each with its reason. No database, no network."""

import json
import sys
from datetime import datetime, timezone

import click

from ..analytics import AnalyticsParams, evaluate_deal, explain
from ..clock import SYSTEM_CLOCK
from ..envelope import Unacceptable, loads, unbounded
from ..errors import EXIT_CONFIG, IngestError


class InputFileError(IngestError):
    """The input file cannot be read at all (missing, a directory, no permission)."""

    exit_code = EXIT_CONFIG


def read_products(source: str) -> list[dict]:
    """The products of a /product response, a single product, or a list of products."""
    name = "stdin" if source == "-" else source
    try:
        if source == "-":
            text = sys.stdin.read()
        else:
            with open(source, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise InputFileError(f"cannot read {name}: {reason}") from None
    try:
        data = loads(text)  # bounded numbers and nesting: a hostile file is one line, not a traceback
    except json.JSONDecodeError as e:
        raise IngestError(f"{name} is not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except Unacceptable as e:
        raise IngestError(f"{name} is not acceptable JSON: {e}") from None
    except ValueError:  # Python's own limit on integer digits
        raise IngestError(f"{name} is not JSON (a number of thousands of digits?)") from None
    problem = unbounded(data)
    if problem is not None:
        raise IngestError(f"{name} is not acceptable JSON: {problem}")
    return _products_of(data, name)


def _products_of(data, name: str) -> list[dict]:
    if isinstance(data, dict) and "products" in data:
        products = data["products"]
        if not isinstance(products, list):
            raise IngestError(f"{name}: 'products' is not a list")
    elif isinstance(data, dict) and ("asin" in data or "csv" in data):
        products = [data]
    elif isinstance(data, list):
        products = data
    elif isinstance(data, dict) and isinstance(data.get("error"), dict):
        error = data["error"]
        raise IngestError(f"{name}: a Keepa error response, no products ({error.get('type')}: {error.get('message')})")
    else:
        raise IngestError(f"{name}: neither a /product response with 'products' nor a product object")
    for i, product in enumerate(products):
        if not isinstance(product, dict):
            raise IngestError(f"{name}: product #{i} is not an object")
    return products


def parse_now(ctx, param, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        now = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO date/time (e.g. 2024-06-01T12:00:00Z)") from None
    return now if now.tzinfo else now.replace(tzinfo=timezone.utc)  # naive: taken as UTC


def summary(product: dict, now: datetime, params: AnalyticsParams) -> dict:
    return {"asin": product.get("asin"), **evaluate_deal(product, now, params).as_dict()}


def _money(cents: int | None) -> str:
    return "-" if cents is None else f"{cents / 100:.2f}"


def summary_line(row: dict) -> str:
    sales = f"{row['sales']} sale" + ("" if row["sales"] == 1 else "s")
    value = f"avg {_money(row['value'])} from {sales}" if row["value"] is not None else f"avg none ({row['reason']})"
    if row["missing"]:
        value += f", missing {','.join(row['missing'])}"
    rank = row["sales_rank"] if row["sales_rank"] is not None else "-"
    return (
        f"{row['asin'] or '?'}  {row['status']}: {row['status_reason']}  {value}  "
        f"used {_money(row['current_used'])}  new {_money(row['current_new'])}  rank {rank}"
    )


@click.command("analyze")
@click.argument("source", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (asin, value, reason, sales, status, ...).")
@click.option("--now", callback=parse_now, metavar="ISO", help="Evaluate as of this time (naive = UTC); default: now.")
@click.option("--explain", "explain_steps", is_flag=True, help="Print every step behind each result (JSON).")
@click.pass_obj
def analyze(app, source, as_json, now, explain_steps):
    """The 1yr average and deal decision, with reasons, for a Keepa /product response in FILE
    ('-' = stdin). Values are in cents in JSON and in currency units in the text output."""
    params = AnalyticsParams.from_config(app.config)
    products = read_products(source)
    now = now or datetime.fromtimestamp(SYSTEM_CLOCK.wall(), timezone.utc)
    if explain_steps:
        click.echo(json.dumps([explain(p, now, params) for p in products], indent=2))
        return
    rows = [summary(p, now, params) for p in products]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no products in {'stdin' if source == '-' else source}", err=True)
    for row in rows:
        click.echo(summary_line(row))


commands = [analyze]
