"""One database, one source: the Keepa account (or the simulator) whose deals fill the file.

The source is the account fingerprint the ledger already uses (`token_model.account_id`, a
SHA-256 prefix of the key, never the key) for Keepa itself, or 'simulator' when the configured
base URL is a loopback address (the simulator of `scripts/demo` and the tests: whatever key it is
given, its deals are not an account's). The first worker to start on a file records its source
(`db_source`, one row); a worker configured for another source refuses in one line (exit 3)
before it takes its lease, so simulated deals and an account's deals never mix. `ingest db
source --adopt` records the current configuration's source on purpose.
"""

import ipaddress
import sqlite3
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigError
from .settings import KeepaSettings
from .backends import backend_of, transaction
from .token_model import account_id

SIMULATOR = "simulator"


@dataclass(frozen=True)
class DbSource:
    source: str
    adopted_at: float


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def source_of(keepa: KeepaSettings) -> str:
    """What a worker with these settings would fill the database from."""
    if is_loopback(keepa.base_url):
        return SIMULATOR
    return account_id(keepa.api_key or "")


def _has_table(conn: sqlite3.Connection) -> bool:
    return "db_source" in backend_of(conn).tables(conn)


def recorded(conn: sqlite3.Connection) -> DbSource | None:
    if not _has_table(conn):
        return None
    row = conn.execute("SELECT source, adopted_at FROM db_source WHERE id = 1").fetchone()
    return DbSource(row[0], row[1]) if row else None


def adopt(conn: sqlite3.Connection, source: str, now: float) -> None:
    """Record `source` as this file's, replacing any other (the explicit override)."""
    with transaction(conn):
        conn.execute("INSERT INTO db_source (id, source, adopted_at) VALUES (1, ?, ?)"
                     " ON CONFLICT (id) DO UPDATE SET source = excluded.source, adopted_at = excluded.adopted_at",
                     (source, now))


def mismatch(stored: str, wanted: str, db_path) -> str:
    return (f"database {db_path} holds deals from {describe(stored)}, but this worker is configured for"
            f" {describe(wanted)}: use another database (--db, INGEST_DB), or take this one over with"
            f" `ingest db source --adopt`")


def describe(source: str) -> str:
    return "the simulator" if source == SIMULATOR else f"Keepa account {source}"


def claim(conn: sqlite3.Connection, source: str, db_path, now: float) -> DbSource:
    """The file's source: recorded now when there is none yet; ConfigError when it is another."""
    with transaction(conn):
        # insert-if-absent, then read: two workers starting together on PostgreSQL (READ
        # COMMITTED, no file-wide write lock) would otherwise both see no row and both insert
        conn.execute("INSERT INTO db_source (id, source, adopted_at) VALUES (1, ?, ?) ON CONFLICT (id) DO NOTHING",
                     (source, now))
        row = conn.execute("SELECT source, adopted_at FROM db_source WHERE id = 1").fetchone()
    if row[0] != source:
        raise ConfigError(mismatch(row[0], source, db_path))
    return DbSource(row[0], row[1])


def configured_source(config: dict) -> str:
    """The source the workers would claim with this config and environment (ConfigError when
    Keepa itself is configured without a key)."""
    from .settings import parse, with_environment

    merged, _ = with_environment(config)
    keepa = parse(KeepaSettings, merged.get("keepa"), "keepa")
    if not is_loopback(keepa.base_url) and not keepa.api_key:
        raise ConfigError("no Keepa API key: set KEEPA_API_KEY or [keepa] api_key in the config")
    return source_of(keepa)
