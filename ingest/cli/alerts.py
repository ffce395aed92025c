"""`ingest alerts`: what the watchdog sent, to which channel, and how each delivery went;
`ingest alerts test` sends a test message to every configured channel."""

import sys
import time
from datetime import datetime

import click

from ..errors import EXIT_FAILURE


def _when(at: float) -> str:
    return datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


@click.group("alerts", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: every message with its deliveries.")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True, help="The newest N messages.")
@click.pass_context
def alerts(ctx, as_json, limit):
    """Messages the watchdog sent (alerts, recoveries, repeats, actions, tests), newest first."""
    if ctx.invoked_subcommand is not None:
        return
    from ..alerts import recent_alerts
    from . import echo_json

    messages = recent_alerts(ctx.obj.db(), limit)
    if as_json:
        echo_json(messages)
        return
    if not messages:
        click.echo("no alert sent yet")
        return
    for m in messages:
        click.echo(f"{_when(m['at'])}  {m['kind']:<9} {m['verdict'] or '-':<8} {m['text']}")
        if not m["deliveries"]:
            click.echo("    (no channel configured: recorded only)")
        for d in m["deliveries"]:
            error = f": {d['error']}" if d["error"] else ""
            click.echo(f"    {d['channel']} {d['target'] or ''}: {d['result']} after {d['attempts']} attempt(s){error}")


@alerts.command("test")
@click.pass_obj
def test(app):
    """Send a test message to every channel now; exit 1 if one failed."""
    from ..alerts import AlertSettings, Outbox, channels_from, compose, host_name, recent_alerts
    from ..logs import register_secret
    from ..backends import open_store

    register_secret(app.settings["keepa"].api_key)
    settings = AlertSettings.from_config(app.config)
    channels = channels_from(settings)
    if not channels:
        click.echo("no alert channel configured: set [alerts] webhooks, email_to or command"
                   " (or INGEST_ALERT_WEBHOOK)")
        sys.exit(EXIT_FAILURE)
    db_path = app.db_path
    app.db()  # migrated before the outbox writes
    outbox = Outbox(lambda: open_store(db_path).open(), channels, settings).start()
    outbox.put(compose("test", None, None, (), host=host_name(), database=open_store(db_path).label, at=time.time()))
    outbox.drain(timeout=settings.attempts * (settings.timeout_s + settings.backoff_s * 2 ** settings.attempts))
    outbox.close()
    sent = recent_alerts(app.db(), 1)[0]["deliveries"]
    for d in sent:
        error = f": {d['error']}" if d["error"] else ""
        click.echo(f"{d['channel']} {d['target'] or ''}: {d['result']} after {d['attempts']} attempt(s){error}")
    sys.exit(0 if sent and all(d["result"] == "sent" for d in sent) else EXIT_FAILURE)


commands = [alerts]
