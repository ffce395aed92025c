"""`ingest db migrate|version`: the schema."""

import click

from ..store import connect, latest_version, migrate, schema_version


@click.group("db")
def db_group():
    """Inspect and migrate the database schema."""


@db_group.command("migrate")
@click.pass_obj
def migrate_command(app):
    """Apply pending schema migrations."""
    conn = connect(app.db_path)
    applied = migrate(conn)
    if applied:
        click.echo(f"migrated {app.db_path} to version {schema_version(conn)} (applied {', '.join(map(str, applied))})")
    else:
        click.echo(f"{app.db_path} is at version {schema_version(conn)}: nothing to do")


@db_group.command("version")
@click.pass_obj
def version_command(app):
    """Print the schema version of the database (and the newest this ingest knows)."""
    conn = connect(app.db_path)
    click.echo(f"{schema_version(conn)} (latest {latest_version()})")


commands = [db_group]
