#!/usr/bin/env python
"""Chaos run: the whole system under supervisord against the simulator with faults on, while
workers are killed, paused past their TTL, their leases force-released and supervisord
restarted; then it settles and the invariants are checked. Prints a table; exits 1 on any
violation. Interrupted (Ctrl-C, SIGTERM, SIGHUP, e.g. from `timeout`), it stops its
supervisord, the workers and the simulator before it exits 128 + the signal number. See
docs/chaos.md.

    .venv/bin/python bench/chaos.py --duration 600
    .venv/bin/python bench/chaos.py --duration 90 --seed 3 --keep /tmp/chaos-out
    .venv/bin/python bench/chaos.py --duration 120 --postgres     # the state in PostgreSQL

--postgres starts a PostgreSQL server of its own from the installed binaries (tests/pg_server.py),
gives the programs its URL as INGEST_DB in ingest.env, and stops it at the end; --db URL uses a
database you made (empty; the run migrates it and leaves its rows).
"""

import argparse
import signal
import sys
import time
from pathlib import Path

# the run imports its siblings as bench.* and the project copy from tests/supervised.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chaos_checks import all_rows, format_table  # noqa: E402
from bench.chaos_lib import ChaosRun, ChaosSettings  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of chaos (then the settle phase)")
    p.add_argument("--seed", type=int, default=1, help="seeds the action schedule and the simulator")
    p.add_argument("--products", type=int, default=None, help="simulator catalogue size (default: by duration)")
    p.add_argument("--no-standby", action="store_true", help="one copy of each worker (no contender)")
    p.add_argument("--keep", metavar="DIR", help="copy the run's var/ (database, logs) here")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--postgres", action="store_true", help="the state in a PostgreSQL server the run starts")
    where.add_argument("--db", metavar="URL", help="the state in this (empty) PostgreSQL database")
    return p.parse_args(argv)


def settings_for(duration: float, seed: int = 1, products: int | None = None, standby: bool = True,
                 db: str | None = None) -> ChaosSettings:
    """Short runs get a smaller catalogue and a shorter 429 window, so they settle in time."""
    if products is None:
        products = 6000 if duration >= 300 else 2500
    return ChaosSettings(duration_s=duration, seed=seed, products=products, standby=standby,
                         window_429_s=20.0 if duration >= 300 else 8.0,
                         action_gap_s=(8.0, 20.0) if duration >= 300 else (5.0, 10.0),
                         settle_timeout_s=300.0 if duration >= 300 else 90.0, db=db)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, so no `except Exception` in the run swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, _frame):
    raise Interrupted(signum)


def _already_stopping(signum, _frame):
    # not SIG_IGN: an ignored signal stays ignored in the children the cleanup starts
    print(f"{signal.Signals(signum).name}: still stopping the run's processes, please wait", flush=True)


def _set_stop_handlers(handler) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def start_postgres():
    """A server of the run's own and an empty database in it, with amcheck installed (the
    integrity check's); None and a line saying why when the server binaries are missing."""
    from tests.pg_server import PgServer, why_unavailable

    if why := why_unavailable():
        print(f"chaos: --postgres: {why}", file=sys.stderr)
        return None, None
    server = PgServer.start()
    return server, server.create_database(extensions=("amcheck",))


def main(argv=None) -> int:
    args = parse_args(argv)
    server, db = None, args.db
    if args.postgres:
        server, db = start_postgres()
        if server is None:
            return 3
    try:
        return run_chaos(args, db)
    finally:
        if server is not None:
            server.stop()


def run_chaos(args, db: str | None) -> int:
    settings = settings_for(args.duration, args.seed, args.products, not args.no_standby, db)
    started = time.monotonic()
    run = ChaosRun(settings, log=lambda line: print(line, flush=True))
    keep = Path(args.keep) if args.keep else None
    interrupted: Interrupted | None = None
    _set_stop_handlers(_interrupt)
    try:
        result = run.execute()
        rows = all_rows(result)
    except Interrupted as e:
        interrupted = e
        run_for = time.monotonic() - started
    finally:
        _set_stop_handlers(_already_stopping)  # a second Ctrl-C must not cut the cleanup short
        if interrupted:
            print(f"\n{interrupted}: stopping supervisord, the workers and the simulator", flush=True)
        run.close(keep_to=keep)
    if interrupted:
        print(f"chaos run interrupted by {interrupted} after {run_for:.0f}s; everything stopped "
              f"{time.monotonic() - started - run_for:.0f}s later"
              + (f"; database and logs kept in {keep}" if keep else ""), flush=True)
        return 128 + interrupted.signum
    print()
    store = "PostgreSQL" if settings.db else "SQLite"
    print(f"chaos run on {store}: {settings.duration_s:.0f}s of chaos, seed {settings.seed}, "
          f"{settings.products} products, "
          f"ttl {settings.ttl_s:g}s / renew {settings.renew_s:g}s / retry {settings.retry_s:g}s, "
          f"{time.monotonic() - started:.0f}s in all")
    print(format_table(rows))
    failed = [r for r in rows if r.failed]
    print(f"\n{'FAILED: ' + ', '.join(r.name for r in failed) if failed else 'all invariants held'}")
    if keep:
        print(f"{'logs' if settings.db else 'database and logs'} kept in {keep}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
