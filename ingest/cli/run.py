"""`ingest run backfill|upsert`: the long-running workers (supervisord runs them)."""

import sys

import click

from ..logs import setup_logging


def _run(app, worker_class, once: bool, query: str | None) -> None:
    setup_logging(worker_class.name)
    worker = worker_class(app.db_path, app.config, once=once, query_option=query)
    sys.exit(worker.run())


@click.group("run")
def run_group():
    """Run a worker until SIGTERM (exit 0), a lost lease (5) or a configuration error (3)."""


_once = click.option("--once", is_flag=True, help="One pass, then exit (backfill: the whole query; upsert: one poll).")
_query = click.option("--query", metavar="FILE", help="Deal query JSON (else $INGEST_QUERY, config [backfill] query, built-in default).")


@run_group.command("backfill")
@_once
@_query
@click.pass_obj
def backfill_command(app, once, query):
    """Page through the whole deal query, storing every deal with an outcome."""
    from ..workers.backfill import BackfillWorker

    _run(app, BackfillWorker, once, query)


@run_group.command("upsert")
@_once
@_query
@click.pass_obj
def upsert_command(app, once, query):
    """Keep deals fresh: newest deals, retries of incomplete ones, refreshes, the janitor."""
    from ..workers.upsert import UpsertWorker

    _run(app, UpsertWorker, once, query)


commands = [run_group]
