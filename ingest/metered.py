"""MeteredKeepa: the Keepa client as the workers use it, every call paid for through the ledger.

    keepa = open_keepa(db_path, config, worker="upsert", stop=stop_event)
    page = keepa.deals(selection, page=0)        # waits for tokens, retries 429, logs the call

A 429 never reaches the worker: the ledger stores the server's balance, holds every worker until
the projected balance is positive, and the same request is sent again. What does reach the worker:
TransientError (after bounded retries), KeepaRequestError, MalformedResponse, CostAboveCap, and
Stopped when `stop` is set while waiting. One MeteredKeepa per thread (it owns one connection).
"""

import logging
import math
import threading

from . import calllog
from .calllog import CallRecord
from .clock import SYSTEM_CLOCK
from .errors import ConfigError
from .keepa import (
    Bounds,
    DealPage,
    Envelope,
    KeepaClient,
    KeepaError,
    KeepaRequestError,
    MalformedResponse,
    ProductPage,
    RateLimited,
    TransientError,
)
from .ledger import SPIN, Ledger, Stopped, ledger_connection
from .logs import register_secret
from .settings import KeepaSettings, parse, with_environment
from .backends import transaction
from .token_costs import product_kind
from .token_model import LedgerPolicy, account_id
from .token_transitions import CostAboveCap

__all__ = ["MeteredKeepa", "open_keepa", "Stopped", "CostAboveCap", "keepa_settings"]

log = logging.getLogger(__name__)
PRUNE_EVERY_S = 3600.0
_STATUS = {KeepaRequestError: "request_error", MalformedResponse: "malformed", TransientError: "transient"}


class MeteredKeepa:
    def __init__(self, client: KeepaClient, ledger: Ledger, worker: str, *, stop: threading.Event | None = None,
                 clock=SYSTEM_CLOCK, call_log_days: float = calllog.DEFAULT_RETENTION_DAYS):
        self.client = client
        self.ledger = ledger
        self.worker = worker
        self.stop = stop
        self.clock = clock
        self.call_log_days = call_log_days
        self._pruned_at = None

    # ------------------------------------------------------------------ the API the workers call

    def deals(self, selection: dict, page: int) -> DealPage:
        return self._metered("deal", 1, 0, lambda: self.client.deals(selection, page))

    def products(self, asins: list[str], *, stats: int | None = 365, history: bool = True,
                 days: int | None = None, offers: int | None = None) -> ProductPage:
        return self._metered(
            product_kind(offers), len(asins), len(asins),
            lambda: self.client.products(asins, stats=stats, history=history, days=days, offers=offers),
        )

    def product_batch_size(self, limit: int = 100, offers: int | None = None) -> int:
        """How many ASINs to ask for now: what the balance (or, when it is spent, the next tick)
        pays for at the learned cost per ASIN. Always >= 1 and never above the cap."""
        self._ensure_synced()
        state = self.ledger.state()
        unit = max(self.ledger.unit_cost(product_kind(offers)), 1e-6)
        budget = state.balance if state.balance >= unit else max(state.balance, 0.0) + state.effective_rate
        most = min(limit, 100, math.floor(state.cap / unit))
        return max(1, min(math.floor(budget / unit), most))

    def token_status(self) -> Envelope:
        """The free /token call; its envelope resynchronises the ledger."""
        return self.sync(force=True)

    # ------------------------------------------------------------------ internals

    def sync(self, force: bool = False) -> Envelope | None:
        """One free /token call if the ledger may make one now (about once a minute per account)."""
        if not self.ledger.claim_token_sync(force=force):
            return None
        t0 = self.clock.monotonic()
        try:
            envelope = self.client.token_status()
        except KeepaError as e:
            self._log_call_alone(self._record("token", 0, 0.0, e.envelope, _STATUS.get(type(e), "error"), t0, e))
            raise
        self.ledger.sync(envelope, from_token_call=True)
        self._log_call_alone(self._record("token", 0, 0.0, envelope, "ok", t0))
        return envelope

    def _ensure_synced(self) -> None:
        if not self.ledger.needs_sync():
            return
        try:
            if self.sync() is not None:
                return
        except KeepaError as e:
            if self.ledger.load() is None:
                raise
            log.warning("token sync failed, going on with the ledger's projection: %s", e)
            return
        # another process claimed this minute's sync; without any state yet, wait for it to land
        while self.ledger.load() is None:
            if self.clock.sleep(self.ledger.policy.min_wait_s, self.stop):
                raise Stopped("stopped while waiting for the first token sync")
            if self.ledger.claim_token_sync() and self.sync(force=True):
                return

    def _metered(self, kind: str, units: int, asins: int, send):
        self._ensure_synced()
        self._maybe_prune()
        estimate = self.ledger.estimate(kind, units)
        endpoint = kind.split(":")[0]
        while True:
            reservation = self.ledger.reserve(estimate, self.worker, kind, units=units, stop=self.stop)
            t0 = self.clock.monotonic()
            try:
                result = send()
            except RateLimited as e:
                account = self.ledger.rate_limited(
                    reservation, e.envelope, call=self._record(endpoint, asins, estimate, e.envelope, "rate_limited", t0, e)
                )
                log.warning("keepa %s: 429 (tokensLeft=%s); every worker holds for %.0fs, then the same request is retried",
                            endpoint, e.envelope.tokens_left if e.envelope else "?",
                            max((account.blocked_until or 0) - self.clock.wall(), 0))
                continue
            except KeepaError as e:
                self.ledger.settle(reservation, e.envelope,
                                   call=self._record(endpoint, asins, estimate, e.envelope, _STATUS.get(type(e), "error"), t0, e))
                if isinstance(e, TransientError) and self.stop is not None and self.stop.is_set():
                    raise Stopped(str(e)) from None
                raise
            except BaseException as e:
                # unknown whether the server charged: keep the estimate spent (errs on waiting)
                self.ledger.settle(reservation, None,
                                   call=self._record(endpoint, asins, estimate, None, "error", t0, e))
                raise
            self.ledger.settle(reservation, result.envelope,
                               call=self._record(endpoint, asins, estimate, result.envelope, "ok", t0))
            return result

    def _record(self, endpoint, asins, estimate, envelope, status, t0, error=None) -> CallRecord:
        return CallRecord(
            at=self.clock.wall(), worker=self.worker, endpoint=endpoint, asins=asins, estimated=estimate,
            actual=envelope.tokens_consumed if envelope else None, status=status,
            http_status=envelope.status if envelope else None,
            latency_ms=round((self.clock.monotonic() - t0) * 1000, 1),
            tokens_left=envelope.tokens_left if envelope else None,
            error=f"{type(error).__name__}: {error}" if error is not None else None,
        )

    def _log_call_alone(self, record: CallRecord) -> None:
        # one INSERT, atomic on its own; in a transaction only for the ledger's BEGIN retries (its
        # connection has busy_timeout = 0: a bare write would fail at once when another holds the lock)
        with transaction(self.ledger.conn, spin=SPIN):
            record.insert(self.ledger.conn, self.ledger.account)

    def _maybe_prune(self) -> None:
        now = self.clock.wall()
        if self._pruned_at is None or now - self._pruned_at > PRUNE_EVERY_S:
            self._pruned_at = now
            with transaction(self.ledger.conn, spin=SPIN):  # see _log_call_alone
                calllog.prune(self.ledger.conn, now, self.call_log_days)

    def close(self) -> None:
        self.client.close()
        self.ledger.conn.close()


def keepa_settings(config: dict) -> KeepaSettings:
    """[keepa] with the environment applied (KEEPA_API_KEY, KEEPA_BASE_URL). No key: ConfigError."""
    merged, _ = with_environment(config)
    keepa = parse(KeepaSettings, merged.get("keepa"), "keepa")
    if not keepa.api_key:
        raise ConfigError("no Keepa API key: set KEEPA_API_KEY or [keepa] api_key in the config")
    register_secret(keepa.api_key)
    return keepa


def open_keepa(db_path, config: dict, worker: str, stop: threading.Event | None = None, *,
               clock=SYSTEM_CLOCK) -> MeteredKeepa:
    keepa = keepa_settings(config)
    policy = LedgerPolicy.from_config(config)
    client = KeepaClient(
        keepa.api_key, keepa.base_url, keepa.domain, stop=stop, clock=clock,
        connect_timeout_s=keepa.connect_timeout_s, read_timeout_s=keepa.read_timeout_s,
        bounds=Bounds.from_settings(keepa.deadline_s, keepa.max_body_mb),
    )
    ledger = Ledger(ledger_connection(db_path), account_id(keepa.api_key), policy, clock)
    return MeteredKeepa(client, ledger, worker, stop=stop, clock=clock, call_log_days=policy.call_log_days)
