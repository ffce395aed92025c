"""`ingest db copy --to postgresql://...`: move an SQLite database up to PostgreSQL (ingest/db_copy.py).
A subcommand of `ingest db` (registered in ingest/cli/db.py)."""

import click

from ..backends import is_url
from ..errors import ConfigError
from ..store import require_database


def _to_url(ctx, param, value: str) -> str:
    if not is_url(value):  # never echo the value: a URL may hold a password
        raise click.BadParameter("must be a postgresql:// URL (e.g. postgresql://ingest@dbhost/ingest)")
    return value


def _progress(table: str, done: int, total: int, seconds: float) -> None:
    rate = done / seconds if seconds > 0 else 0.0
    click.echo(f"copying {table}: {done:,} of {total:,} rows, {rate:,.0f} rows/s", err=True)


@click.command("copy")
@click.option("--to", "target", required=True, callback=_to_url, metavar="URL",
              help="The PostgreSQL database to fill (postgresql://...); it must hold no rows.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def copy_command(app, target, as_json):
    """Copy the SQLite database (--db) into an empty PostgreSQL database, in one transaction,
    then compare the row counts table by table. Refused while a worker holds a lease (stop them
    first); the leases arrive free, with their fences."""
    from . import echo_json, echo_table

    source = app.db_path
    if is_url(source):
        raise ConfigError("db copy copies an SQLite database: --db / INGEST_DB / [store] db names a PostgreSQL"
                          " database (point it at the SQLite file)")
    source = require_database(source)
    try:
        from ..db_copy import copy_database

        result = copy_database(source, target, progress=None if as_json else _progress)
    except ModuleNotFoundError as e:
        if e.name != "psycopg":
            raise
        raise ConfigError("the PostgreSQL driver is not installed: pip install -e '.[postgres]'") from None
    if as_json:
        echo_json(result.to_json())
        return
    echo_table(["TABLE", "SQLITE", "POSTGRESQL"], [[t.name, t.source_rows, t.target_rows] for t in result.tables])
    click.echo()
    click.echo(f"copied {result.source} (schema version {result.schema_version}) to {result.target}:"
               f" {result.rows:,} rows in {result.seconds:.1f} s, counts match in every table")
    if result.freed_leases:
        click.echo(f"leases freed (their holders had exited): {', '.join(result.freed_leases)}")
    click.echo("next: set INGEST_DB or [store] db to that URL and start the workers")

