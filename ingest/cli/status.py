"""`ingest status`: one screen for an operator. supervisord's programs, leases, tokens, deals by
status, each worker's last progress, and the verdict of the health checks (ingest.health) with
the problems and next steps. Exit 0 healthy, 1 degraded, 2 down."""

import sys
import time
from datetime import datetime

import click

from ..backends import open_store
from ..errors import EXIT_BY_VERDICT
from ..health import system_report
from ..supervisor import describe_exit, probe
from . import echo_table
from .leases import _duration

MARKS = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


# ---------------------------------------------------------------- gathering


def _tokens(conn, now: float) -> list[dict]:
    from ..token_model import Account, LedgerPolicy, open_reservations

    out = []
    for row in conn.execute("SELECT * FROM token_accounts ORDER BY account"):
        a = Account.from_row(row).projected(now)
        held = open_reservations(a, LedgerPolicy().reservation_ttl_s)
        reservations = sum(h["count"] for h in held if h["expires_at"] >= now)
        out.append({
            "account": a.account, "balance": round(a.server_balance, 1), "available": round(a.balance, 1),
            "in_flight": a.in_flight, "cap": a.cap, "refill_rate": a.refill_rate,
            "blocked_until": a.blocked_until if a.blocked_until and a.blocked_until > now else None,
            "reservations": reservations, "synced_at": a.synced_at,
        })
    return out


def gather(app, *, stall_minutes: float, supervisor_conf: str | None, now: float | None = None) -> dict:
    """Everything the screen and --json show, as plain data."""
    from ..deals import deal_counts, progress_rows
    from ..lease_table import lease_rows

    now = time.time() if now is None else now
    view = probe(supervisor_conf)
    conn = app.db()
    leases = lease_rows(conn, now)
    programs = view.programs if view.running else None
    assessment = system_report(conn, programs, now=now, stall_minutes=stall_minutes, config=app.config).to_json()
    return {
        "verdict": assessment["verdict"],
        "problems": assessment["problems"],
        "at": now,
        "database": open_store(app.db_path).label,
        "supervisor": {
            "running": view.running, "config": str(view.config) if view.config else None,
            "pid": view.supervisord_pid, "error": view.error, "programs": view.programs,
        },
        "leases": leases,
        "tokens": _tokens(conn, now),
        "deals": deal_counts(conn),
        "progress": progress_rows(conn),
        "checks": assessment["checks"],
        "watch": _watch(conn, now),
    }


FAILED_WINDOW_S = 24 * 3600.0


def _watch(conn, now: float) -> dict:
    """The watchdog's last action, the last alert and the deliveries that failed in a day."""
    from ..alerts import failed_deliveries, last_message
    from ..watch import last_action

    return {"last_action": last_action(conn), "last_alert": last_message(conn),
            "failed_deliveries": failed_deliveries(conn, now - FAILED_WINDOW_S)}


# ---------------------------------------------------------------- the screen


def _ago(now: float, then: float | None) -> str:
    return "never" if then is None else _duration(now - then) + " ago"


def _program_note(p: dict) -> str:
    if p["state"] == "RUNNING":
        return ""
    note = p["spawnerr"] or (describe_exit(p["exitstatus"]) if p["state"] == "EXITED" else p["description"])
    if p.get("last_error"):  # what it died of, from the end of its log
        note = note.replace(" (process log may have details)", "") + f"; log: {p['last_error']}"
    return note


def _show_supervisor(s: dict) -> None:
    if not s["running"]:
        click.echo(f"supervisord  not running: {s['error']}")
        return
    click.echo(f"supervisord  running, pid {s['pid']} ({s['config']})")
    if not s["programs"]:
        click.echo("  no programs")
        return
    rows = [[name, p["state"], str(p["pid"] or "-"), _duration(p["uptime_s"]), _program_note(p)]
            for name, p in sorted(s["programs"].items())]
    _indented(["PROGRAM", "STATE", "PID", "UPTIME", "NOTE"], rows)


def _indented(headers, rows) -> None:
    echo_table(headers, rows, indent="  ")


def _show_leases(leases: list[dict]) -> None:
    click.echo("leases")
    if not leases:
        click.echo("  none taken yet")
        return
    rows = [[r["name"], r["holder"] or "-", str(r["fence"]), r["state"], _duration(r["held_for"]),
             _duration(r["heartbeat_age"]), ("~" if r["basis"] == "wall" else "") + _duration(r["expires_in"])]
            for r in leases]
    _indented(["NAME", "HOLDER", "FENCE", "STATE", "HELD FOR", "HEARTBEAT", "EXPIRES IN"], rows)


def _show_tokens(tokens: list[dict], now: float) -> None:
    if not tokens:
        click.echo("tokens       no Keepa call yet")
        return
    for t in tokens:
        blocked = f", blocked for {_duration(t['blocked_until'] - now)}" if t["blocked_until"] else ""
        click.echo(f"tokens       {t['balance']:.0f} / {t['cap']:.0f}, refill {t['refill_rate']:g}/min,"
                   f" in flight {t['in_flight']:g} ({t['reservations']} reservations){blocked}"
                   f"  [account {t['account']}]")


def _show_deals(deals: dict) -> None:
    total = sum(deals.values())
    parts = "  ".join(f"{status} {n}" for status, n in deals.items())
    click.echo(f"deals        {parts}  (total {total})")


def _show_backups(checks: list[dict]) -> None:
    for c in checks:
        if c["name"] == "backups":
            click.echo(f"backups      {c['summary']}")


def _show_watch(state: dict) -> None:
    """The watchdog program, its last action, the last alert and failed deliveries."""
    now, watch = state["at"], state["watch"]
    programs = state["supervisor"]["programs"] if state["supervisor"]["running"] else {}
    proc = programs.get("watch")
    running = f"{proc['state']}, pid {proc['pid'] or '-'}" if proc else "not running under supervisord"
    action = watch["last_action"]
    did = (f"last action {_ago(now, action['at'])}: {action['action']} {action['program'] or 'pid'}"
           f" {action['pid']}") if action else "no action taken"
    click.echo(f"watchdog     {running}; {did}")
    alert = watch["last_alert"]
    if alert is None:
        click.echo("alerts       none sent yet")
    else:
        how = ", ".join(f"{d['channel']} {d['result']}" for d in alert["deliveries"]) or "no channel configured"
        what = " ".join(x for x in (alert["kind"], alert["verdict"]) if x)
        click.echo(f"alerts       last {_ago(now, alert['at'])}: {what} ({how})")
    failed = watch["failed_deliveries"]
    if failed:
        last = failed[0]
        click.echo(f"             {len(failed)} delivery(ies) FAILED in 24h; last: {last['channel']}"
                   f" {last['target'] or ''} after {last['attempts']} attempt(s): {last['error']}")


def _show_progress(progress: list[dict], now: float) -> None:
    click.echo("progress")
    if not progress:
        click.echo("  no worker has started yet")
        return
    rows = [[p["worker"], p["state"], _ago(now, p["last_commit_at"]), _ago(now, p["last_success_at"]),
             str(p["pages"]), str(p["accepted"]), str(p["rejected"]), str(p["incomplete"]), str(p["tokens_spent"]),
             str(p["errors"]), (p["last_error"] or "")[:60]]
            for p in progress]
    _indented(["WORKER", "STATE", "LAST COMMIT", "LAST FETCH", "PAGES", "ACC", "REJ", "INC", "TOKENS",
               "ERRORS", "LAST ERROR"], rows)


def _show_problems(state: dict) -> None:
    """Each check that is not ok, worst first, with its next step (--json lists every check)."""
    bad = sorted((c for c in state["checks"] if c["verdict"] != "ok"), key=lambda c: c["verdict"] != "fail")
    shown = set()
    for c in bad:
        click.echo(f"  {MARKS.get(c['verdict'], c['verdict'])}  {c['name']}: {c['summary']}")
        if c.get("next_step"):
            click.echo(f"        -> {c['next_step']}")
        shown.add(f"{c['name']}: {c['summary']}")
    for problem in state["problems"]:  # problems without a check (other programs)
        if problem not in shown:
            click.echo(f"  -     {problem}")
    click.echo()


def show(state: dict) -> None:
    now = state["at"]
    stamp = datetime.fromtimestamp(now).strftime("%Y-%m-%d %H:%M:%S")
    click.echo(f"ingest status  {stamp}  database {state['database']}")
    click.echo(f"verdict      {state['verdict'].upper()}")
    _show_problems(state)
    _show_supervisor(state["supervisor"])
    _show_leases(state["leases"])
    _show_tokens(state["tokens"], now)
    _show_deals(state["deals"])
    _show_backups(state["checks"])
    _show_watch(state)
    _show_progress(state["progress"], now)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: verdict, problems and everything shown.")
@click.option("--stall-minutes", type=click.FloatRange(min=0.1, max=7 * 24 * 60),
              help="A worker holding its lease without committing for this long is stalled (default: [health] stall_minutes, 10).")
@click.option("--supervisor-conf", metavar="PATH",
              help="supervisord config (else $INGEST_SUPERVISOR_CONF, ./supervisor.d/supervisord.conf).")
@click.pass_obj
def status(app, as_json, stall_minutes, supervisor_conf):
    """One screen: supervisord's programs, leases, tokens, deals, progress, and a verdict.

    Exit status: 0 healthy, 1 degraded, 2 down."""
    from . import echo_json

    if stall_minutes is None:
        stall_minutes = app.settings["health"].stall_minutes
    state = gather(app, stall_minutes=stall_minutes, supervisor_conf=supervisor_conf)
    if as_json:
        echo_json(state)
    else:
        show(state)
    sys.exit(EXIT_BY_VERDICT[state["verdict"]])


commands = [status]
