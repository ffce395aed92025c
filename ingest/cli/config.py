"""`ingest config check`: the effective settings and where each came from, or every problem."""

import sys

import click

from ..config import config_path
from ..errors import EXIT_CONFIG
from ..settings import load_settings, problems


@click.group("config")
def config_group():
    """The configuration file and environment."""


@config_group.command("check")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: {ok, file, problems, settings}.")
@click.pass_obj
def check(app, as_json):
    """Validate the whole config. Exit 0 and the effective settings (default, file or
    environment), or exit 3 and one line per problem."""
    from . import echo_json

    path = config_path(app.config_option)
    found = problems(app.config)
    settings = None if found else load_settings(app.config)
    if as_json:
        echo_json({
            "ok": not found,
            "file": str(path) if path else None,
            "problems": found,
            "settings": [vars(e) for e in settings.entries] if settings else [],
        })
    elif found:
        for problem in found:
            click.echo(f"ingest: config: {problem}", err=True)
    else:
        click.echo(f"config {path or '(no file: defaults and environment)'}: ok")
        for e in settings.entries:
            click.echo(f"  [{e.section}] {e.key} = {_toml(e.value)}    # {e.source}")
    sys.exit(EXIT_CONFIG if found else 0)


def _toml(value) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return "{...}" if value else "{}"
    return f"{value:g}" if isinstance(value, float) else str(value)


commands = [config_group]
