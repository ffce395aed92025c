"""`ingest watch`: the watchdog as supervisord's event listener (supervisor.d/programs/watch.conf).

Under supervisord it speaks the listener protocol on stdin/stdout (ingest/watch.py); `--once`
makes one look from a shell instead and prints what it did."""

import logging
import sys

import click

from ..logs import register_secret, setup_logging


def build_watcher(app, supervisor_conf: str | None):
    from ..alerts import AlertSettings, Outbox, channels_from
    from ..backends import open_store
    from ..watch import Watcher, WatchSettings

    register_secret(app.settings["keepa"].api_key)
    alert_settings = AlertSettings.from_config(app.config)
    db_path = app.db_path
    outbox = Outbox(lambda: open_store(db_path).open(), channels_from(alert_settings), alert_settings).start()
    return Watcher(db_path, app.config, outbox, stall_minutes=app.settings["health"].stall_minutes,
                   supervisor_conf=supervisor_conf, settings=WatchSettings.from_config(app.config),
                   alert_settings=alert_settings)


@click.command("watch")
@click.option("--once", is_flag=True, help="One look from a shell (act, alert, print), not the listener loop.")
@click.option("--supervisor-conf", metavar="PATH",
              help="supervisord config (else $INGEST_SUPERVISOR_CONF, ./supervisor.d/supervisord.conf).")
@click.pass_obj
def watch(app, once, supervisor_conf):
    """The watchdog: kills stopped and hung workers of this supervisord and sends alerts.

    Runs as `[eventlistener:watch]` under supervisord (TICK_5 and PROCESS_STATE events); see
    docs/watch.md."""
    from ..watch import listen
    from .sim import UsageLine

    if not once and sys.stdin.isatty():
        raise UsageLine("ingest watch speaks supervisord's event listener protocol on stdin: it runs as"
                        " [eventlistener:watch] (supervisor.d/programs/watch.conf); from a shell use --once")
    setup_logging("watch", logging.INFO)
    watcher = build_watcher(app, supervisor_conf)
    if once:
        actions = watcher.look()
        watcher.outbox.close(timeout=120)
        for a in actions:
            click.echo(f"{a.action}: {a.reason}")
        state = watcher.alert_state
        click.echo(f"verdict {state.pending or state.reported or 'unknown'}; {len(actions)} action(s)")
        return
    log = logging.getLogger("ingest.watch")
    log.info("watching %s (TICK_5, PROCESS_STATE); %d alert channel(s)", watcher.store.label, len(watcher.outbox.channels))
    code = listen(watcher)
    watcher.outbox.close(timeout=30)
    sys.exit(code)


commands = [watch]
