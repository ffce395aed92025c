"""`ingest leases`: see who holds what, its history, and release a lease by hand."""

import time

import click

from ..lease_table import UnknownLease, admin_release, lease_exists, lease_history, lease_rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds:.1f}s"
    if seconds < 3600:
        return f"{sign}{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{sign}{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{sign}{int(seconds // 86400)}d{int(seconds % 86400 // 3600):02d}h"


def _alive(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "?"}[value]


@click.group("leases", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="A JSON list instead of a table.")
@click.pass_context
def leases(ctx, as_json):
    """Who holds which lease. 'expires in' is exact for holders on this host (monotonic clock),
    an estimate from wall clocks ('~') for holders on other hosts."""
    if ctx.invoked_subcommand is not None:
        return
    from . import echo_json, echo_table

    rows = lease_rows(ctx.obj.db())
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no leases yet")
        return
    echo_table(
        ["NAME", "HOLDER", "PID", "ALIVE", "FENCE", "HELD FOR", "HEARTBEAT", "EXPIRES IN", "STATE"],
        [
            [
                r["name"], r["holder"] or "-", str(r["pid"] or "-"), _alive(r["alive"]) if r["holder"] else "-",
                str(r["fence"]), _duration(r["held_for"]),
                _duration(r["heartbeat_age"]) + (" ago" if r["heartbeat_age"] is not None else ""),
                ("~" if r["basis"] == "wall" else "") + _duration(r["expires_in"]), r["state"],
            ]
            for r in rows
        ],
    )


@leases.command("history")
@click.argument("name", required=False)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1_000_000), help="Last N events.")
@click.option("--json", "as_json", is_flag=True, help="A JSON list instead of a table.")
@click.pass_obj
def history(app, name, limit, as_json):
    """Lease events (acquired, released, taken over, lost, force-released), oldest first."""
    from . import echo_json, echo_table

    conn = app.db()
    if name and not lease_exists(conn, name) and not lease_history(conn, name, 1):
        raise UnknownLease(f"no lease named {name!r}")
    events = lease_history(conn, name, limit)
    if as_json:
        echo_json(events)
        return
    if not events:
        click.echo("no lease events yet")
        return
    echo_table(
        ["ID", "AT", "LEASE", "EVENT", "FENCE", "HOLDER", "DETAIL"],
        [
            [str(e["id"]), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"])), e["name"], e["event"],
             str(e["fence"]), e["holder"] or "-", e["detail"] or ""]
            for e in events
        ],
    )


@leases.command("release")
@click.argument("name")
@click.option("--force", is_flag=True, help="Release even though the holder is alive and renewing.")
@click.pass_obj
def release(app, name, force):
    """Clear a lease's holder. Refused while the holder is alive and renewing, unless --force
    (the holder then notices at its next heartbeat or fenced write and stops)."""
    click.echo(admin_release(app.db(), name, force=force))


commands = [leases]
