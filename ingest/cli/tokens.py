"""`ingest tokens`: the shared token ledger (balance, rate, cap, reservations, spend, 429s),
`ingest tokens history` (the call log) and `ingest tokens sync` (one free /token call)."""

import time
from datetime import datetime, timezone

import click

from .. import calllog
from ..keepa import KeepaError
from ..ledger import Ledger
from ..metered import open_keepa
from ..settings import with_environment
from ..token_costs import learned
from ..token_model import Account, LedgerPolicy, account_id, open_reservations


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _relative(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    delta = t - now
    return f"{_iso(t)} (in {delta:.0f}s)" if delta >= 0 else f"{_iso(t)} ({-delta:.0f}s ago)"


def _configured_account(config: dict) -> str | None:
    key = (with_environment(config)[0].get("keepa") or {}).get("api_key")
    return account_id(str(key)) if key else None


def _pick_account(conn, config: dict) -> str | None:
    wanted = _configured_account(config)
    if wanted and conn.execute("SELECT 1 FROM token_accounts WHERE account = ?", (wanted,)).fetchone():
        return wanted
    row = conn.execute("SELECT account FROM token_accounts ORDER BY coalesce(synced_at, 0) DESC LIMIT 1").fetchone()
    return row[0] if row else wanted


def ledger_report(conn, config: dict, now: float | None = None) -> dict:
    """Everything `ingest tokens` shows, as one dict (also what --json prints)."""
    now = time.time() if now is None else now
    name = _pick_account(conn, config)
    policy = LedgerPolicy.from_config(config)
    stored = Ledger(conn, name, policy).load() if name else None
    spend = {"last_hour": calllog.spend_by_worker(conn, now - 3600), "last_day": calllog.spend_by_worker(conn, now - 86400)}
    report = {"account": name, "balance": None, "available": None, "projected_after_next_tick": None,
              "refill_rate": None, "cap": None, "next_tick": None, "blocked_until": None, "synced_at": None,
              "stale": True, "in_flight": 0, "reservations": [], "rate_limited_total": 0,
              "rate_limited_last_day": sum(w["rate_limited"] for w in spend["last_day"].values()),
              "spend": spend, "costs": []}
    if stored is None:
        return report
    a: Account = stored.projected(now)
    after_tick = min(a.server_balance + a.effective_rate, a.cap)
    reservations = open_reservations(a, policy.reservation_ttl_s)  # one entry per process, worker and minute
    report.update(
        balance=round(a.server_balance, 2), available=round(a.balance, 2), projected_after_next_tick=round(after_tick, 2),
        refill_rate=a.refill_rate, flow_reduction=a.flow_reduction, cap=a.cap, next_tick=_iso(a.next_tick),
        blocked_until=_iso(a.blocked_until) if a.blocked_until and a.blocked_until > now else None,
        synced_at=_iso(a.synced_at), stale=a.synced_at is None or now - a.synced_at > policy.stale_after_s,
        in_flight=a.in_flight, reservations=reservations, rate_limited_total=a.rate_limited,
        costs=learned(conn, name), workers=a.workers,
    )
    return report


def _print_report(r: dict, now: float) -> None:
    if r["balance"] is None:
        click.echo("no token ledger yet: it starts with the first Keepa call (or `ingest tokens sync`)")
        return
    echo = click.echo
    echo(f"account        {r['account']}{'  (stale: no server answer recently)' if r['stale'] else ''}")
    echo(f"balance        {r['balance']:g} now (server model), {r['available']:g} available after "
         f"{r['in_flight']:g} reserved; {r['projected_after_next_tick']:g} after the next tick")
    echo(f"refill         {r['refill_rate']:g}/min (flow reduction {r.get('flow_reduction', 0):g}), cap {r['cap']:g}")
    echo(f"next tick      {r['next_tick']}")
    echo(f"blocked until  {r['blocked_until'] or '-'}")
    echo(f"last sync      {r['synced_at'] or '-'}")
    echo(f"429s           {r['rate_limited_total']} in all, {r['rate_limited_last_day']} in the last day")
    echo(f"reservations   {sum(res['count'] for res in r['reservations'])} open")
    for res in r["reservations"][:20]:
        echo(f"  {res['worker']} pid {res['pid']}: {res['count']} for {res['cost']:g} tokens, "
             f"newest {now - res['last_at']:.0f}s ago")
    for label, key in (("spend 1h", "last_hour"), ("spend 24h", "last_day")):
        rows = r["spend"][key]
        text = ", ".join(f"{w} {v['tokens']} tokens/{v['calls']} calls" for w, v in sorted(rows.items())) or "-"
        echo(f"{label:<15}{text}")
    for c in r["costs"]:
        echo(f"cost {c['kind']:<10} avg {c['avg']:g}, reserving {c['reserve_per_unit']:g} per unit ({c['samples']} samples)")


@click.group("tokens", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the ledger as JSON.")
@click.pass_context
def tokens(ctx, as_json):
    """The shared token ledger: balance, rate, cap, reservations, spend per worker, 429s."""
    if ctx.invoked_subcommand is not None:
        return
    from . import echo_json

    app = ctx.obj
    now = time.time()
    report = ledger_report(app.db(), app.config, now)
    if as_json:
        echo_json(report)
    else:
        _print_report(report, now)


@tokens.command("history")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1_000_000),
              help="How many calls, newest first.")
@click.option("--worker", help="Only this worker's calls.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def history(app, limit, worker, as_json):
    """The call log: every Keepa call with its estimated and actual cost, status and latency."""
    from . import echo_json

    rows = calllog.recent(app.db(), limit=limit, worker=worker)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no Keepa calls logged")
        return
    from . import echo_table

    echo_table(["time (UTC)", "worker", "endpoint", "asins", "est", "cost", "left", "status", "ms", "error"],
               [[_iso(r["at"]), r["worker"], r["endpoint"], r["asins"], _number(r["estimated"]), r["actual"],
                 r["tokens_left"], r["status"], round(r["latency_ms"] or 0), r["error"] or ""] for r in rows])


def _number(value: float | None) -> int | float | None:
    """5.0 as 5 (an estimate is often whole), other values as they are."""
    return int(value) if value is not None and float(value).is_integer() else value


@tokens.command("sync")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def sync(app, as_json):
    """One free /token call: resynchronise the ledger from the server and print what it said."""
    from . import echo_json

    keepa = open_keepa(app.db_path, app.config, worker="cli")
    try:
        envelope = keepa.token_status()
    except KeepaError as e:
        raise type(e)(f"token sync failed: {e}") from None
    finally:
        keepa.close()
    result = {"tokens_left": envelope.tokens_left, "refill_in_s": envelope.refill_in_s,
              "refill_rate": envelope.refill_rate, "flow_reduction": envelope.flow_reduction,
              "server_time": _iso(envelope.server_time)}
    if as_json:
        echo_json(result)
    else:
        click.echo(f"server: {envelope.tokens_left} tokens left, next refill in {envelope.refill_in_s:.1f}s, "
                   f"{envelope.refill_rate:g}/min (flow reduction {envelope.flow_reduction or 0:g}); ledger updated")


commands = [tokens]
