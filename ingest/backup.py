"""Backups and restore of the one SQLite file (docs/backups.md).

A backup is SQLite's online backup API (never `cp`, which misses what is still in the WAL),
copied in one step: one read transaction, so the copy is the database as of one commit while
both workers keep writing (WAL readers never block writers). It is written to a hidden temporary
name created 0600, switched to a self-contained rollback journal, checked (`PRAGMA
integrity_check`, the schema version), fsynced and renamed into place (then the folder is
fsynced). Every attempt is a row of `backups`. `--keep N` / `[backup] keep` deletes the oldest
`ingest-*.db` of the folder beyond N. The upsert worker takes one every `[backup] every_h` hours.

A restore checks its source the same way, refuses while a live process holds a lease on the
database (unless forced), keeps a consistent copy of the file it replaces beside it, and swaps
the new file in with one rename (the old -wal/-shm go with it).
"""

import logging
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .backends import backend_of, is_url
from .errors import ConfigError, IngestError, StoreError
from .lease_rules import LeaseState
from .lease_table import lease_rows
from .settings import parse, setting
from .store import connect, disk_full, is_disk_full, latest_version, schema_version, size_text, transaction

log = logging.getLogger("ingest.backup")

BACKUP_PATTERN = re.compile(r"^ingest-\d{8}T\d{6}(\.\d+)?Z\.db$")


@dataclass(frozen=True)
class BackupSettings:
    """[backup]: scheduled backups by the upsert worker (off unless every_h is set)."""

    every_h: float = setting(0.0, "take a backup this often, in hours (0: never; ingest db backup by hand)",
                             min=0, max=24 * 365)
    keep: int = setting(7, "keep this many backups in the folder (the oldest beyond it are deleted)", min=1, max=10000)
    dir: str | None = setting(None, "backup folder (default: backups/ beside the database)", kind=str)

    def __post_init__(self):
        if self.dir is not None and not self.dir.strip():
            raise ConfigError("dir must not be empty (leave it out for backups/ beside the database)")

    @classmethod
    def from_config(cls, config: dict) -> "BackupSettings":
        return parse(cls, (config or {}).get("backup"), "backup")


class BackupError(IngestError):
    """A backup or restore that could not be made; nothing was replaced."""


class InUse(BackupError):
    """Refused: a live process holds a lease on the database."""


@dataclass(frozen=True)
class BackupResult:
    path: Path
    bytes: int
    seconds: float
    schema_version: int
    pruned: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"path": str(self.path), "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "schema_version": self.schema_version, "integrity": "ok", "pruned": self.pruned}


@dataclass(frozen=True)
class LastBackup:
    at: float
    path: str
    bytes: int | None
    ok: bool


# ------------------------------------------------------------------ pure parts


def backup_name(now: float) -> str:
    """ingest-20260102T030405Z.db: sorts by time; UTC so a clock change never reorders it."""
    return "ingest-" + datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ") + ".db"


def default_folder(db_path: Path, settings: BackupSettings) -> Path:
    return Path(settings.dir) if settings.dir else Path(db_path).parent / "backups"


def destination(db_path: Path, dest: str | None, settings: BackupSettings, now: float) -> Path:
    """DEST as given (a folder, existing or ending in '/', gets the default name), else the folder."""
    if dest is None:
        return default_folder(db_path, settings) / backup_name(now)
    path = Path(dest)
    if path.is_dir() or dest.endswith("/"):
        return path / backup_name(now)
    return path


def beyond_keep(names: list[str], keep: int) -> list[str]:
    """The backups to delete: every `ingest-*.db` but the newest `keep` (names sort by time)."""
    ours = sorted(n for n in names if BACKUP_PATTERN.match(n))
    return ours[:-keep] if keep > 0 else ours


def is_due(last: LastBackup | None, now: float, settings: BackupSettings) -> bool:
    """A scheduled backup is due: scheduling is on and the last good one is every_h old (or none)."""
    if settings.every_h <= 0:
        return False
    return last is None or now - last.at >= settings.every_h * 3600


# ------------------------------------------------------------------ checks


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_private(path: Path) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)


def check_copy(path: Path, expected_version: int | None = None) -> int:
    """integrity_check and the schema version of a copy; its version, or BackupError."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as e:
        raise BackupError(f"{path} cannot be opened: {e}") from None
    try:
        try:
            result = [r[0] for r in conn.execute("PRAGMA integrity_check(5)").fetchall()]
            version = schema_version(conn)
            has_leases = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'leases'").fetchone() is not None
        except sqlite3.DatabaseError as e:
            raise BackupError(f"{path} is not a usable SQLite database: {e}") from None
    finally:
        conn.close()
    if result != ["ok"]:
        raise BackupError(f"{path} fails integrity_check: {'; '.join(result)[:200]}")
    if not has_leases or version < 1:
        raise BackupError(f"{path} is not an ingest database (no schema)")
    if version > latest_version():
        raise BackupError(f"{path} has schema version {version}, newer than this ingest knows ({latest_version()})")
    if expected_version is not None and version != expected_version:
        raise BackupError(f"{path} has schema version {version}, the database {expected_version}")
    return version


def _copy(source: sqlite3.Connection, tmp: Path) -> None:
    """The whole database as of one commit into `tmp` (created 0600 beforehand), self-contained."""
    dest = sqlite3.connect(tmp, isolation_level=None)
    try:
        source.backup(dest)  # pages=-1: one step, one read transaction on the source
        dest.execute("PRAGMA journal_mode = DELETE")
    finally:
        dest.close()


def _remove(path: Path) -> None:
    for p in (path, Path(f"{path}-journal"), Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", p, e.strerror)


def _snapshot(source: sqlite3.Connection, final: Path, expected_version: int | None) -> int:
    """Copy, check, fsync and rename into `final`; returns the copy's schema version."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _create_private(tmp)
        _copy(source, tmp)
        version = check_copy(tmp, expected_version)
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(final.parent)
        return version
    except (sqlite3.Error, OSError) as e:
        _remove(tmp)
        if is_disk_full(e, final):
            raise BackupError(str(disk_full(final)).replace("the transaction was rolled back, nothing was stored",
                                                           "no backup was written")) from None
        raise BackupError(f"cannot write {final}: {getattr(e, 'strerror', None) or e}") from None
    except BaseException:
        _remove(tmp)
        raise


# ------------------------------------------------------------------ backup


def last_backup(conn: sqlite3.Connection, *, ok_only: bool = False) -> LastBackup | None:
    """The newest row of `backups` (the newest good one with ok_only); None without any."""
    if "backups" not in backend_of(conn).tables(conn):
        return None
    row = conn.execute("SELECT at, path, bytes, ok FROM backups" + (" WHERE ok = 1" if ok_only else "")
                       + " ORDER BY id DESC LIMIT 1").fetchone()
    return LastBackup(row[0], row[1], row[2], bool(row[3])) if row else None


def _record(conn: sqlite3.Connection, now: float, path: Path, size: int | None, ok: bool) -> None:
    try:
        with transaction(conn):
            conn.execute("INSERT INTO backups (at, path, bytes, ok) VALUES (?, ?, ?, ?)",
                         (now, str(path), size, int(ok)))
    except IngestError as e:  # the backup itself is made (or not); its row is a record only
        log.warning("could not record the backup of %s: %s", path, e)


def prune_backups(folder: Path, keep: int) -> list[str]:
    """Delete the oldest `ingest-*.db` in `folder` beyond `keep`; the names deleted."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    doomed = beyond_keep(names, keep)
    for name in doomed:
        _remove(folder / name)
    return doomed


SERVER_BACKUPS = "backups of a PostgreSQL database are the server's (pg_dump, or base backups and WAL archiving)"
_SAID_SERVER_BACKUPS = False


def require_file(db_path) -> Path:
    """Backups, restores and vacuum work on an SQLite file: a PostgreSQL URL is a ConfigError."""
    if is_url(db_path):
        raise ConfigError(f"{SERVER_BACKUPS}; ingest backs up, restores and vacuums SQLite files only")
    return Path(db_path)


def take_backup(db_path: Path, dest: str | None = None, *, keep: int | None = None,
                settings: BackupSettings = BackupSettings(), now: float | None = None) -> BackupResult:
    """One checked backup of `db_path`; `keep` prunes the folder it went to."""
    db_path = require_file(db_path)
    now = time.time() if now is None else now
    final = destination(db_path, dest, settings, now).absolute()
    if final.exists():
        raise BackupError(f"{final} already exists: give another DEST")
    conn = connect(db_path)
    try:
        started = time.monotonic()
        try:
            version = _snapshot(conn, final, schema_version(conn))
        except BackupError:
            _record(conn, now, final, None, False)
            raise
        size = final.stat().st_size
        _record(conn, now, final, size, True)
        pruned = prune_backups(final.parent, keep) if keep else []
        return BackupResult(final, size, time.monotonic() - started, version, pruned)
    finally:
        conn.close()


def scheduled_backup(db_path: Path, conn: sqlite3.Connection, now: float, settings: BackupSettings) -> BackupResult | None:
    """What the upsert worker's maintenance step does: a backup when one is due. A failure is
    one warning line (recorded as a failed row); the worker carries on."""
    if is_url(db_path):
        global _SAID_SERVER_BACKUPS
        if not _SAID_SERVER_BACKUPS:
            log.info("scheduled backups skipped: %s", SERVER_BACKUPS)
            _SAID_SERVER_BACKUPS = True
        return None
    if not is_due(last_backup(conn, ok_only=True), now, settings):
        return None
    try:
        result = take_backup(db_path, None, keep=settings.keep, settings=settings, now=now)
    except IngestError as e:
        log.warning("scheduled backup failed: %s", e)
        return None
    log.info("backup %s (%s, %.1f s)%s", result.path, size_text(result.bytes), result.seconds,
             f"; removed {len(result.pruned)} older" if result.pruned else "")
    return result


# ------------------------------------------------------------------ who is using the file


def live_holders(conn: sqlite3.Connection, now: float | None = None) -> list[str]:
    """One phrase per lease held by a process that may be alive (held, or expired but not known
    dead: a paused process comes back): restore and vacuum refuse while there is any."""
    out = []
    for row in lease_rows(conn, now):
        if row["state"] in (LeaseState.HELD, LeaseState.EXPIRED) and row["alive"] is not False:
            out.append(f"{row['name']} held by {row['holder']} ({row['state']}, heartbeat {row['heartbeat_age']}s ago)")
    return out


def refuse_if_in_use(conn: sqlite3.Connection, what: str, hint: str) -> None:
    holders = live_holders(conn)
    if holders:
        raise InUse(f"{what} refused: {'; '.join(holders)}; stop the workers first (scripts/stop){hint}")


# ------------------------------------------------------------------ restore


@dataclass(frozen=True)
class RestoreResult:
    restored: Path
    source: Path
    kept: Path | None
    schema_version: int

    def to_json(self) -> dict:
        return {"restored": str(self.restored), "source": str(self.source),
                "kept": str(self.kept) if self.kept else None, "schema_version": self.schema_version}


def restore(db_path: Path, source: Path, *, force: bool = False, now: float | None = None) -> RestoreResult:
    """Swap `source` in as the database at `db_path`, keeping the replaced file beside it."""
    db_path = require_file(db_path)
    now = time.time() if now is None else now
    db_path, source = Path(db_path), Path(source)
    if not source.is_file():
        raise BackupError(f"restore source {source} does not exist")
    if source.resolve() == db_path.resolve():
        raise BackupError(f"restore source {source} is the database itself")
    check_copy(source)
    stamp = datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    kept = None
    if db_path.exists():
        kept = db_path.with_name(f"{db_path.name}.replaced-{stamp}")
        _keep_current(db_path, kept, force)
    staged = db_path.with_name(f".{db_path.name}.restore-{os.getpid()}")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, isolation_level=None)
    try:
        version = _snapshot(src, staged, None)
    finally:
        src.close()
    for suffix in ("-wal", "-shm"):  # the replaced file's: applied to the new one they would corrupt it
        try:
            os.unlink(f"{db_path}{suffix}")
        except FileNotFoundError:
            pass
    os.replace(staged, db_path)
    _fsync(db_path.parent)
    return RestoreResult(db_path, source, kept, version)


def _keep_current(db_path: Path, kept: Path, force: bool) -> None:
    """A consistent copy of the file about to be replaced, at `kept` (refused while it is in
    use, unless forced). A damaged file (unreadable, or its copy fails the checks: what a restore
    is often for) is moved aside as it is, with its -wal, for a post-mortem."""
    try:
        current = connect(db_path)
    except StoreError as e:
        log.warning("the database cannot be opened (%s): moving it aside as it is", e)
        current = None
    if current is not None:
        try:
            if not force:
                refuse_if_in_use(current, "restore", ", or --force")
            _snapshot(current, kept, None)
            return
        except InUse:
            raise
        except (sqlite3.DatabaseError, BackupError) as e:
            log.warning("the database is damaged (%s): moving it aside as it is", e)
        finally:
            current.close()
    for suffix in ("", "-wal"):
        if os.path.exists(f"{db_path}{suffix}"):
            os.replace(f"{db_path}{suffix}", f"{kept}{suffix}")


# ------------------------------------------------------------------ vacuum


@dataclass(frozen=True)
class VacuumResult:
    bytes_before: int
    bytes_after: int
    auto_vacuum: str

    def to_json(self) -> dict:
        return {"bytes_before": self.bytes_before, "bytes_after": self.bytes_after, "auto_vacuum": self.auto_vacuum}


AUTO_VACUUM = {0: "none", 1: "full", 2: "incremental"}


def vacuum(db_path: Path) -> VacuumResult:
    """Rewrite the file with auto_vacuum = INCREMENTAL (so retention's pruning shrinks it from
    then on). Refused while a live process holds a lease: VACUUM holds the write lock throughout."""
    db_path = require_file(db_path)
    conn = connect(db_path)
    try:
        refuse_if_in_use(conn, "vacuum", "")
        before = os.path.getsize(db_path)
        try:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as e:
            if is_disk_full(e, db_path):
                raise disk_full(db_path) from None
            raise StoreError(f"vacuum of {db_path} failed: {e}") from None
        mode = AUTO_VACUUM.get(conn.execute("PRAGMA auto_vacuum").fetchone()[0], "?")
        return VacuumResult(before, os.path.getsize(db_path), mode)
    finally:
        conn.close()
