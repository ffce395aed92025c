"""What backfill and upsert share, in two parts:

The process lifecycle (`Worker.run()`, private to this module):
  open the database (migrating it) -> install SIGTERM/SIGINT handlers -> wait for the lease
  -> heartbeat -> step() until stopped (or, with --once, until a pass is done) -> release.
  Every IngestError ends it with its own `exit_code` (3 config, 4 database, 5 lease lost).
  A lost lease stops the loop at once; the fenced commit refuses any write from a process
  that no longer holds the lease, so a late write can never land.
  The database path must keep naming the file opened (device and inode, checked every renew_s
  and before each fenced commit): deleted or replaced, the worker stops with exit 4 and writes
  nothing more, its lease release included (the write would land in another file, or create one).

The batch API subclasses call from `step()`: `fetch_products`, `commit_batch` (a product
batch), `commit_page` (a listing page), `commit` (any other fenced write) and `tally`.
A batch is evaluated and compressed before its write transaction (`prepare_outcomes`), so the
write lock is held for the fence check and the writes only.
"""

import logging
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

from .. import checkpoints
from .. import deals as store_deals
from ..analytics import AnalyticsParams, evaluate_deal
from ..calllog import spend_by_worker
from ..clock import SYSTEM_CLOCK
from ..db_source import claim, source_of
from ..errors import EXIT_MEANINGS, EXIT_OK, ConfigError, DiskFull, IngestError
from ..keepa import MalformedResponse, PaymentRequired, TransientError, check_query_domain
from ..leases import Lease, LeaseLost, LeaseTiming
from ..metered import Stopped, keepa_settings, open_keepa
from ..settings import setting, worker_settings
from ..backends import Store, open_store, transaction
from ..store import DatabaseReplaced, FileIdentity

log = logging.getLogger("ingest.worker")

PAGE_SIZE = 150  # deals per /deal page (Keepa): a shorter page is the last one
PAUSED_402 = "paused: Keepa subscription inactive (402)"  # the progress row's last_error while paused

# how the log line of a fatal error starts (ingest status shows the worker's last error line)


@dataclass(frozen=True)
class WorkerSettings:
    """Knobs shared by both workers; [worker] in the config, [backfill]/[upsert] override."""

    stats_days: int = setting(365, "days of Keepa stats asked with each product", min=1, max=3650)
    progress_log_s: float = setting(30.0, "a progress line this often", min=0.1, max=86400)
    backoff_s: float = setting(2.0, "first wait after a transient failure, doubled up to backoff_max_s",
                               min=0.01, max=3600)
    backoff_max_s: float = setting(120.0, "longest wait after transient failures", min=0.01, max=86400)
    malformed_attempts: int = setting(3, "a batch answered malformed this often is stored incomplete", min=1, max=100)
    retry_base_s: float = setting(60.0, "first refetch of an incomplete deal after", min=0.01, max=30 * 86400)
    retry_cap_s: float = setting(6 * 3600.0, "refetch delay doubles up to this", min=0.01, max=30 * 86400)
    retry_max_attempts: int = setting(12, "an incomplete deal is refetched at most this often", min=1, max=1000)
    disk_full_retry_s: float = setting(30.0, "on a full disk, try the rolled-back step again this often",
                                       min=0.05, max=3600)
    payment_retry_s: float = setting(300.0, "on HTTP 402 (subscription inactive), re-check with the free"
                                     " /token call this often", min=0.05, max=86400)

    def __post_init__(self):
        if self.backoff_s > self.backoff_max_s:
            raise ConfigError(f"backoff_s ({self.backoff_s:g}) must be at most backoff_max_s ({self.backoff_max_s:g})")
        if self.retry_base_s > self.retry_cap_s:
            raise ConfigError(f"retry_base_s ({self.retry_base_s:g}) must be at most retry_cap_s ({self.retry_cap_s:g})")

    @property
    def retry_backoff(self) -> store_deals.RetryBackoff:
        return store_deals.RetryBackoff(self.retry_base_s, self.retry_cap_s, self.retry_max_attempts)

    @classmethod
    def from_config(cls, config: dict, worker: str) -> "WorkerSettings":
        return worker_settings(config, worker)


@dataclass
class Tally:
    """What a worker did since its last progress log line (the line is all it is for: the
    stored progress counters are written in the fenced commits)."""

    pages: int = 0
    accepted: int = 0
    rejected: int = 0
    incomplete: int = 0

    def add(self, counts: Mapping[str, int]) -> None:
        for key, n in counts.items():
            setattr(self, key, getattr(self, key) + n)


def prepare_outcomes(asins: list[str], listings: Mapping[str, store_deals.Listing],
                     products: Mapping[str, dict] | None, now: float,
                     params: AnalyticsParams) -> list[store_deals.Outcome]:
    """Every ASIN of a fetched batch evaluated (or marked unfetched) and compressed: the CPU
    work of a batch, done before its write transaction. `products` None: the batch kept
    coming back malformed."""
    at = datetime.fromtimestamp(now, tz=timezone.utc)
    outcomes = []
    for asin in asins:
        listing = listings.get(asin)
        product = products.get(asin) if products is not None else None
        if product is None:
            cause = "malformed_response" if products is None else "not_returned"
            outcomes.append(store_deals.unfetched_outcome(asin, listing, cause))
        else:
            outcomes.append(store_deals.evaluated_outcome(asin, listing, product, evaluate_deal(product, at, params)))
    return outcomes


def outcome_counts(outcomes: list[store_deals.Outcome]) -> dict[str, int]:
    counts = {status: 0 for status in store_deals.STATUSES}
    for outcome in outcomes:
        counts[outcome.status] += 1
    return counts


class Worker:
    """Base class: subclasses set `name` and implement `step()` (and `pass_done()` for --once)."""

    name = "worker"
    query: dict | None = None    # the deal query, set by setup() (its domainId is checked at start)
    domain: int | None = None    # [keepa] domain, stamped on the deals written (deals.domain)

    def __init__(self, db_path, config: dict, *, once: bool = False, clock=SYSTEM_CLOCK,
                 stop: threading.Event | None = None, keepa=None):
        self.db_path = db_path
        self.config = config
        self.once = once
        self.clock = clock
        self.stop = stop or threading.Event()
        self.settings = WorkerSettings.from_config(config, self.name)
        self.params = AnalyticsParams.from_config(config)
        self.lease_timing = LeaseTiming.from_config(config)
        self.tally = Tally()
        self._keepa = keepa
        self.conn = None
        self.lease: Lease | None = None
        self._failures = 0
        self._disk_full_since: float | None = None
        self._last_progress_log = 0.0
        self._tally_started = clock.monotonic()
        self._tally_started_wall = clock.wall()
        self._opened: FileIdentity | None = None
        self._replaced: DatabaseReplaced | None = None

    # ------------------------------------------------------------ lifecycle

    def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        self._install_signal_handlers()
        try:
            return self._hold_lease_and_work()
        except Stopped:
            # the stop event is also set when the lease is lost: that is not a clean stop, and
            # supervisord must restart the worker (exit 5), not leave it EXITED (exit 0)
            if self._replaced is not None:
                return self._failed(self._replaced)
            if self.lease is not None and self.lease.wait_lost(0):
                return self._failed(LeaseLost(f"lease {self.name!r} lost while waiting"))
            return self._stopped()
        except IngestError as e:
            return self._failed(e)
        finally:
            if self.lease is not None and self._replaced is not None:
                self.lease.abandon()
            elif self.lease is not None:
                try:
                    self.lease.release()
                except Exception as e:  # the process is ending; say so, do not mask the exit code
                    log.warning("lease release failed: %s", e)

    def _hold_lease_and_work(self) -> int:
        self.store: Store = open_store(self.db_path)
        self.conn = self.store.open()
        self._opened = self.store.identity()
        self.setup()
        if self._keepa is None:
            keepa = keepa_settings(self.config)  # a missing key fails here, before the lease is taken
            check_query_domain(self.query, keepa.domain)  # one marketplace per query: exit 3 at start
            self.domain = keepa.domain
            claim(self.conn, source_of(keepa), self.store.label, self.clock.wall())  # one database, one source
        self.lease = Lease(self.store, self.name, self.lease_timing, clock=self.clock)
        self._note_waiting_for_lease()
        log.info("waiting for lease %r", self.name)
        if not self._acquire():
            return EXIT_OK  # stopped while waiting: the progress row is the holder's, not ours
        self.lease.start_heartbeat()
        threading.Thread(target=self._stop_on_loss, daemon=True, name="lease-watch").start()
        threading.Thread(target=self._watch_database, daemon=True, name="database-watch").start()
        log.info("holding lease %r with fence %d", self.name, self.lease.fence)
        self._set_state("working", pid=os.getpid(), fence=self.lease.fence, started_at=self.clock.wall())
        if self._keepa is None:
            self._keepa = open_keepa(self.store, self.config, worker=self.name, stop=self.stop)
        return self._loop()

    def _acquire(self) -> bool:
        """Wait for the lease; on a full disk wait for space too (never exit into a restart loop)."""
        while True:
            try:
                return self.lease.acquire(stop=self.stop)
            except DiskFull as e:
                self._wait_for_space(e)
                if self.stop.is_set():
                    return False

    def _failed(self, error: IngestError) -> int:
        """A fatal error: one log line, the state, and the error's own exit code (Keepa's
        400/405 are configuration errors: retrying cannot help; a 402 pauses instead)."""
        if isinstance(error, DatabaseReplaced):
            self._replaced = self._replaced or error
        code = error.exit_code
        log.error("%s: %s", EXIT_MEANINGS.get(code, "error"), error)
        self._set_state("lost" if isinstance(error, LeaseLost) else "error", last_error=str(error))
        return code

    def _loop(self) -> int:
        while not self.stop.is_set():
            self._check_database()
            self.lease.check()
            try:
                worked = self.step()
                self._failures = 0
            except (TransientError, MalformedResponse) as e:
                self._failures += 1
                self._back_off(e)
                continue
            except DiskFull as e:  # rolled back whole: the same step runs again once there is space
                self._wait_for_space(e)
                continue
            except PaymentRequired as e:  # the process and its lease stay; the same step runs again
                self._wait_for_payment(e)
                continue
            self._space_is_back()
            self._maybe_log_progress()
            if self.once and self.pass_done():
                log.info("--once: pass complete")
                break
            if not worked:
                self._set_state("idle")
                self.clock.sleep(self.idle_wait_s(), self.stop)
        self._check_database()  # stopped because the file went away: exit 4
        self.lease.check()  # stopped because the lease was lost: exit 5, not 0
        return self._stopped()

    def _stopped(self) -> int:
        log.info("stopping: releasing lease %r", self.name)
        self._set_state("stopped")
        return EXIT_OK

    def _stop_on_loss(self):
        self.lease.wait_lost()
        self.stop.set()

    def _watch_database(self):
        """At each heartbeat (renew_s): does the path still name the file we opened? If not,
        stop (the loop then exits 4). Real time, like the file it watches (an injected clock
        would be advanced by this loop)."""
        while not self.stop.wait(self.lease_timing.renew_s):
            try:
                self._check_database()
            except DatabaseReplaced:
                self.stop.set()
                return

    def _check_database(self) -> None:
        """DatabaseReplaced (and remembered) once the path names another file, or none."""
        if self._replaced is not None:
            raise self._replaced
        if self._opened is None:
            return
        try:
            self.store.check_identity(self._opened)
        except DatabaseReplaced as e:
            self._replaced = e
            raise

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return

        def handle(signum, _frame):
            log.info("received %s: finishing the current step", signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def _back_off(self, error: Exception) -> None:
        delay = min(self.settings.backoff_max_s, self.settings.backoff_s * 2 ** (self._failures - 1))
        log.warning("%s; retrying in %.0f s (failure %d)", error, delay, self._failures)
        self._set_state("backoff", counters={"errors": 1}, last_error=str(error),
                        last_error_at=self.clock.wall())
        self.clock.sleep(delay, self.stop)

    def _wait_for_space(self, error: DiskFull) -> None:
        """One log line when the disk fills (not one per retry), the state when it can be
        written, then a wait before the step is tried again."""
        wait = self.settings.disk_full_retry_s
        if self._disk_full_since is None:
            self._disk_full_since = self.clock.monotonic()
            log.error("%s; trying again every %g s (free space, or grow the filesystem)", error, wait)
        try:  # may fail on the same full disk: `ingest status` measures the free space itself
            with transaction(self.conn):
                store_deals.update_progress(self.conn, self.name, self.clock.wall(), state="disk_full",
                                            last_error=str(error), last_error_at=self.clock.wall())
        except IngestError:
            pass
        self.clock.sleep(wait, self.stop)

    def _wait_for_payment(self, error: PaymentRequired) -> None:
        """Keepa answered 402: say so in the progress row (ingest status: down, with the reason),
        keep the lease, and re-check with the free /token call every payment_retry_s until it
        answers 200 (or the worker is stopped). A 400 during the wait is still exit 3."""
        wait = self.settings.payment_retry_s
        since = self.clock.monotonic()
        log.error("%s (%s); re-checking with /token every %g s", PAUSED_402, error, wait)
        self._set_state("paused", last_error=PAUSED_402, last_error_at=self.clock.wall())
        while not self.clock.sleep(wait, self.stop):
            self.lease.check()
            try:
                self.keepa.token_status()
            except PaymentRequired:
                continue
            except (TransientError, MalformedResponse) as e:
                log.warning("re-checking the subscription: %s", e)
                continue
            log.info("Keepa answers again after %.0f s: resuming", self.clock.monotonic() - since)
            self._set_state("working")
            return

    def _space_is_back(self) -> None:
        if self._disk_full_since is not None:
            log.info("disk space is back after %.0f s: carrying on", self.clock.monotonic() - self._disk_full_since)
            self._disk_full_since = None

    def _note_waiting_for_lease(self) -> None:
        """Say we are waiting, unless the row is the live holder's: a standby (another host, a
        second copy) must not overwrite the progress of the process doing the work."""
        try:
            with transaction(self.conn):
                row = self.conn.execute("SELECT pid, state FROM worker_progress WHERE worker = ?",
                                        (self.name,)).fetchone()
                holder = self.conn.execute("SELECT holder_pid FROM leases WHERE name = ?", (self.name,)).fetchone()
                if row is None or holder is None or holder[0] is None or row["pid"] != holder[0]:
                    store_deals.update_progress(self.conn, self.name, self.clock.wall(), state="waiting_lease")
        except Exception as e:  # progress must never take the worker down
            log.warning("could not record state waiting_lease: %s", e)

    def _set_state(self, state: str, counters: dict | None = None, **fields) -> None:
        """Progress that is not part of a batch (state changes, errors): not fenced, so a
        process that lost its lease can still say so. Nothing once the file was replaced."""
        if self.conn is None or self._replaced is not None:
            return
        try:
            with transaction(self.conn):
                store_deals.update_progress(self.conn, self.name, self.clock.wall(), state=state,
                                            counters=counters, **fields)
        except Exception as e:  # progress must never take the worker down
            log.warning("could not record state %s: %s", state, e)

    def _maybe_log_progress(self) -> None:
        now = self.clock.monotonic()
        if now - self._last_progress_log < self.settings.progress_log_s:
            return
        minutes = max(1e-9, (now - self._tally_started) / 60)
        t = self.tally
        tokens = self._tokens_since(self._tally_started_wall)
        log.info(
            "progress: %s; %d pages, %d accepted / %d rejected / %d incomplete, %d tokens (%.0f/min)",
            self.describe_position(), t.pages, t.accepted, t.rejected, t.incomplete, tokens, tokens / minutes,
        )
        self._last_progress_log = now
        self.tally = Tally()
        self._tally_started = now
        self._tally_started_wall = self.clock.wall()

    def _tokens_since(self, since: float) -> int:
        """Tokens this worker spent since `since`, from the ledger's call log (the one record
        of spending: calls charged but failed included)."""
        try:
            return spend_by_worker(self.conn, since).get(self.name, {}).get("tokens", 0)
        except Exception as e:  # a log line must never take the worker down
            log.warning("could not read the call log: %s", e)
            return 0

    # ------------------------------------------------------------ subclass hooks

    def setup(self) -> None:
        """Validate configuration before the lease is taken (raise ConfigError)."""

    def step(self) -> bool:
        """One unit of work. Returns False when there was nothing to do."""
        raise NotImplementedError

    def pass_done(self) -> bool:
        return True

    def idle_wait_s(self) -> float:
        return 5.0

    def describe_position(self) -> str:
        return ""

    # ------------------------------------------------------------ batch API

    @property
    def keepa(self):
        return self._keepa

    @contextmanager
    def commit(self, what: str, source: str):
        """A fenced transaction: (conn, WriteContext). Raises LeaseLost (and writes nothing)
        when this process no longer holds the lease with its fencing token. Keep CPU work
        out of it: the other worker's heartbeat and token reservations wait for it."""
        self._check_database()
        with self.lease.fenced(self.conn) as conn:
            ctx = store_deals.WriteContext(self.name, self.lease.fence, self.clock.wall(), source, self.domain)
            yield conn, ctx
            store_deals.note_fenced_commit(conn, ctx, self.name, os.getpid(), what)

    def fetch_products(self, asins: list[str]) -> dict[str, dict] | None:
        """Fetch one batch. Transient errors propagate (the loop backs off and the same step
        runs again); a batch answered malformed `malformed_attempts` times returns None."""
        for attempt in range(1, self.settings.malformed_attempts + 1):
            try:
                page = self.keepa.products(asins, stats=self.settings.stats_days, history=True)
            except MalformedResponse as e:
                log.warning("malformed /product answer for %d ASINs (attempt %d): %s", len(asins), attempt, e)
                self._set_state("backoff", counters={"errors": 1}, last_error=str(e),
                                last_error_at=self.clock.wall())
                if attempt < self.settings.malformed_attempts:
                    self.clock.sleep(self.settings.backoff_s * attempt, self.stop)
                    if self.stop.is_set():
                        raise Stopped("stopped while retrying a malformed batch")
                continue
            return {p.get("asin"): p for p in page.products if isinstance(p, dict)}
        return None

    def commit_batch(self, what: str, source: str, asins: list[str], listings: Mapping[str, store_deals.Listing],
                     products: Mapping[str, dict] | None, *, touched=(),
                     checkpoint: checkpoints.Checkpoint | None = None, detail: dict | None = None) -> dict[str, int]:
        """One fenced transaction for a fetched batch: mark `touched` listings seen, store every
        ASIN's outcome, save the checkpoint that covers them, and count the progress.
        Evaluating and compressing happen first, outside the transaction."""
        outcomes = prepare_outcomes(asins, listings, products, self.clock.wall(), self.params)
        counts = outcome_counts(outcomes)
        succeeded = bool(asins) and products is not None
        with self.commit(what, source) as (conn, ctx):
            for listing in touched:
                store_deals.touch_seen(conn, ctx, listing)
            store_deals.store_outcomes(conn, ctx, outcomes, self.settings.retry_backoff)
            if checkpoint is not None:
                checkpoints.save(conn, ctx, checkpoint)
            fields = {"last_success_at": ctx.now} if succeeded else {}
            if detail is not None:
                fields["detail"] = detail
            store_deals.update_progress(conn, self.name, ctx.now, state="working", last_commit_at=ctx.now,
                                        **fields, counters=counts)
        self.tally.add(counts)
        return counts

    def commit_page(self, what: str, source: str, checkpoint: checkpoints.Checkpoint, *, pages: int,
                    deals_seen: int, detail: dict) -> None:
        """One fenced transaction for fetched listing pages: the checkpoint that holds their
        deals as pending, and the progress."""
        with self.commit(what, source) as (conn, ctx):
            checkpoints.save(conn, ctx, checkpoint)
            store_deals.update_progress(conn, self.name, ctx.now, state="working", last_success_at=ctx.now,
                                        last_commit_at=ctx.now, detail=detail,
                                        counters={"pages": pages, "deals_seen": deals_seen})
        self.tally.add({"pages": pages})
