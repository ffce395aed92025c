"""`ingest db migrate|version|backup|restore|vacuum|stats|source`: the file itself."""

import time

import click

from ..backends import open_store
from ..store import latest_version, require_database, size_text


@click.group("db")
def db_group():
    """The database file: schema, backups, restore, vacuum, sizes, source."""


@db_group.command("migrate")
@click.pass_obj
def migrate_command(app):
    """Apply pending schema migrations."""
    store = open_store(app.db_path)
    conn = store.connect()
    applied = store.backend.migrate(conn)
    version = store.backend.schema_version(conn)
    if applied:
        click.echo(f"migrated {store.label} to version {version} (applied {', '.join(map(str, applied))})")
    else:
        click.echo(f"{store.label} is at version {version}: nothing to do")


@db_group.command("version")
@click.pass_obj
def version_command(app):
    """Print the schema version of the database (and the newest this ingest knows)."""
    store = open_store(require_database(app.db_path))
    click.echo(f"{store.backend.schema_version(store.connect())} (latest {latest_version()})")


_json = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@db_group.command("backup")
@click.argument("dest", required=False, metavar="[DEST]")
@click.option("--keep", type=click.IntRange(1, 100_000), metavar="N", help="Then delete the oldest ingest-*.db in that folder beyond N.")
@_json
@click.pass_obj
def backup_command(app, dest, keep, as_json):
    """A consistent online copy (while the workers write), checked, 0600.

    DEST: a file, or a folder for ingest-<UTC time>.db (default: [backup] dir, else backups/
    beside the database)."""
    from ..backup import take_backup
    from . import echo_json

    app.db()  # migrated first: the copy has the current schema
    result = take_backup(app.db_path, dest, keep=keep, settings=app.settings["backup"])
    if as_json:
        echo_json(result.to_json())
        return
    click.echo(f"backup {result.path}: {size_text(result.bytes)}, schema version {result.schema_version},"
               f" integrity ok, {result.seconds:.1f} s")
    if result.pruned:
        click.echo(f"removed {len(result.pruned)} older: {', '.join(result.pruned)}")


@db_group.command("restore")
@click.argument("source", type=click.Path(dir_okay=False), metavar="SRC")
@click.option("--force", is_flag=True, help="Even while a live process holds a lease (it loses its writes).")
@_json
@click.pass_obj
def restore_command(app, source, force, as_json):
    """Replace the database with the backup SRC (checked first); the replaced file is kept beside
    it as DB.replaced-<UTC time>. Refused while a worker holds a lease: stop them first."""
    from pathlib import Path

    from ..backup import restore
    from . import echo_json

    result = restore(app.db_path, Path(source), force=force)
    if as_json:
        echo_json(result.to_json())
        return
    kept = f"; the replaced file is {result.kept}" if result.kept else ""
    click.echo(f"restored {result.restored} from {result.source} (schema version {result.schema_version}){kept}")


@db_group.command("vacuum")
@_json
@click.pass_obj
def vacuum_command(app, as_json):
    """Rewrite the file compactly with auto_vacuum = INCREMENTAL (so pruning shrinks it from then
    on). Refused while a worker holds a lease; needs free space of about the file's size."""
    from ..backup import vacuum
    from . import echo_json

    app.db()
    result = vacuum(app.db_path)
    if as_json:
        echo_json(result.to_json())
        return
    click.echo(f"vacuumed {app.db_path}: {size_text(result.bytes_before)} -> {size_text(result.bytes_after)},"
               f" auto_vacuum {result.auto_vacuum}")


@db_group.command("stats")
@_json
@click.pass_obj
def stats_command(app, as_json):
    """Rows and bytes per table and index, WAL, free pages, free disk, growth and days until full."""
    from ..dbstats import collect
    from . import echo_json, echo_table

    settings = app.settings
    stats = collect(app.db(), app.db_path, time.time(), settings["retention"], settings["ledger"].call_log_days)
    if as_json:
        echo_json(stats.to_json())
        return
    rows = [[o.name, o.kind if o.kind == "table" else f"index on {o.table}", o.rows, o.bytes,
             size_text(o.bytes) if o.bytes is not None else "-"]
            for o in sorted(stats.objects, key=lambda o: -(o.bytes or 0))]
    echo_table(["NAME", "KIND", "ROWS", "BYTES", "SIZE"], rows)
    click.echo()
    _show_file(stats)
    if stats.growth_bytes_per_day is None:
        click.echo("growth       unknown (this SQLite has no dbstat)")
    else:
        rows_text = ", ".join(f"{t} {n:+d}" for t, n in stats.growth_rows.items() if n)
        click.echo(f"growth       {size_text(int(abs(stats.growth_bytes_per_day)))}/day"
                   f"{' shrinking' if stats.growth_bytes_per_day < 0 else ''} (net rows, last day: {rows_text or 'none'})")
        days = stats.days_until_full
        full = ("unknown (the server's disk)" if stats.free_pages is None else "never at this rate" if days is None else "more than 10 years" if days > 3650 else f"{days:.1f} days")
        click.echo(f"disk full in {full}")


def _show_file(stats) -> None:
    """The file, its WAL and the disk; a database on a server (PostgreSQL) has only its size here."""
    if stats.free_pages is None:
        click.echo(f"database     {stats.path}: {size_text(stats.file_bytes)} (pg_database_size)")
        click.echo("wal, disk    the server's: not visible from here")
        return
    click.echo(f"file         {stats.path}: {size_text(stats.file_bytes)} (page {stats.page_size} B,"
               f" {stats.free_pages} free pages = {size_text(stats.free_pages * stats.page_size)}),"
               f" auto_vacuum {stats.auto_vacuum}")
    click.echo(f"wal          {size_text(stats.wal_bytes)}")
    click.echo(f"disk         {size_text(stats.disk_free)} free of {size_text(stats.disk_total)}")


@db_group.command("source")
@click.option("--adopt", is_flag=True, help="Record this configuration's source as the file's (the override).")
@_json
@click.pass_obj
def source_command(app, adopt, as_json):
    """Which Keepa account (fingerprint) or the simulator fills this database. Workers configured
    for another refuse to start (exit 3); --adopt makes the current configuration's the file's."""
    from .. import db_source
    from . import echo_json

    conn = app.db()
    before = db_source.recorded(conn)
    configured = None
    if adopt:
        configured = db_source.configured_source(app.config)
        db_source.adopt(conn, configured, time.time())
    now = db_source.recorded(conn)
    if as_json:
        echo_json({"database": str(app.db_path), "source": now and now.source, "adopted_at": now and now.adopted_at,
                   "previous": before and before.source})
        return
    if now is None:
        click.echo(f"{app.db_path}: no source yet (the first worker to start records its own)")
    elif adopt:
        was = f" (was {db_source.describe(before.source)})" if before and before.source != now.source else ""
        click.echo(f"{app.db_path} now holds deals from {db_source.describe(now.source)}{was}")
    else:
        click.echo(f"{app.db_path} holds deals from {db_source.describe(now.source)}")


from .db_copy import copy_command  # noqa: E402  (ingest db copy: its own module)
db_group.add_command(copy_command)

commands = [db_group]
