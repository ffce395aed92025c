"""The `ingest` command. Each concept's commands live in their own module of this package
and are listed in COMMAND_MODULES; each module exports `commands`, a list of click commands."""

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from .. import __version__
from ..config import load_config
from ..errors import IngestError
from ..logs import redact
from ..settings import Settings, load_settings
from ..backends import open_store
from ..store import require_database, resolve_db_path

COMMAND_MODULES = [  # one module per line
    "config",
    "db",
    "leases",
    "tokens",
    "sim",
    "analyze",
    "run",
    "deals",
    "status",
    "diagnose",
    "sql",
    "metrics",
    "watch",
    "alerts",
]

UNCHECKED_COMMANDS = {"config", None}  # `config check` reports the problems itself


@dataclass
class App:
    """What every command gets as ctx.obj: where the database is, the config, one connection."""

    db_option: str | None
    config_option: str | None
    _config: dict | None = None
    _settings: Settings | None = None
    _conn: object | None = field(default=None, repr=False)  # sqlite3 or backends.postgres connection

    @property
    def config(self) -> dict:
        if self._config is None:
            self._config = load_config(self.config_option)
        return self._config

    @property
    def settings(self) -> Settings:
        """The whole config validated (a bad one is ConfigError: one line, exit 3)."""
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings

    @property
    def db_path(self) -> "Path | str":
        """An SQLite file's Path or a PostgreSQL URL (never shown: it may hold a password)."""
        return resolve_db_path(self.db_option, self.config)

    def db(self):
        """The existing database, migrated (a newer schema is refused with one line). A path
        naming no file is a StoreError (exit 4): no command but a worker creates a database."""
        if self._conn is None:
            self._conn = open_store(require_database(self.db_path)).open()
        return self._conn


class IngestGroup(click.Group):
    """Turns IngestError into one redacted line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except IngestError as e:
            click.echo(f"ingest: error: {redact(str(e))}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=IngestGroup)
@click.option("--db", "db_option", metavar="PATH", help="SQLite file or postgresql:// URL (else $INGEST_DB, config [store] db, var/ingest.db).")
@click.option("--config", "config_option", metavar="PATH", help="TOML config file (else $INGEST_CONFIG, ./ingest.toml).")
@click.version_option(__version__, prog_name="ingest")
@click.pass_context
def main(ctx, db_option, config_option):
    """ingest: Keepa deals into SQLite, through crashes, restarts and token shortages."""
    if db_option is not None and not db_option.strip():
        raise click.UsageError("--db needs a path (leave it out for $INGEST_DB, [store] db or var/ingest.db)")
    ctx.obj = App(db_option=db_option, config_option=config_option)
    if ctx.invoked_subcommand not in UNCHECKED_COMMANDS:
        ctx.obj.settings  # every command checks the whole config before it does anything


def echo_json(value) -> None:
    import json

    click.echo(json.dumps(value, indent=2, default=str))


def echo_table(headers: list[str], rows: list[list], missing: str = "-", right: tuple[str, ...] = (),
               indent: str = "") -> None:
    """A plain aligned table (tabulate, which sqlite-utils installs): a header line, then rows.
    Columns of numbers, and those named in `right`, are right-aligned; strings are never parsed
    as numbers (ASIN 0439064872 keeps its zero); None is shown as `missing`; every line starts
    with `indent`."""
    from tabulate import tabulate

    def numeric(i: int) -> bool:
        values = [r[i] for r in rows if r[i] is not None]
        return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

    align = ["right" if h in right or numeric(i) else "left" for i, h in enumerate(headers)]
    text = tabulate(rows, headers=headers, tablefmt="plain", missingval=missing, disable_numparse=True, colalign=align)
    click.echo("\n".join(indent + line.rstrip() for line in text.splitlines()))


for _name in COMMAND_MODULES:
    _module = importlib.import_module(f".{_name}", __name__)
    for _command in _module.commands:
        main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
