"""The Keepa HTTP client: one request per call, the token envelope, typed errors, no leaked key.

It knows nothing about tokens beyond reading the envelope: the ledger (ingest/ledger.py) decides
when a call may be made, and ingest/metered.py ties the two together. Connection errors, timeouts
and 5xx are retried here (bounded attempts and total time, exponential backoff with jitter);
429 is raised at once as `RateLimited` so the ledger can hold every worker.

The key travels in the query string, so a URL is a secret: no URL is ever logged or put into an
exception, and every message built from a library exception goes through `redact()`.
"""

import json
import logging
import random
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import requests

from .clock import SYSTEM_CLOCK
from .errors import EXIT_CONFIG, IngestError
from .logs import REDACTED, RedactingFilter, redact, register_secret
from .settings import DEFAULT_BASE_URL

log = logging.getLogger(__name__)

# urllib3 logs request lines (with the query string) at DEBUG on its own loggers; filter them at
# the source so that no handler (a test's caplog included) ever sees the key.
for _name in ("urllib3.connectionpool", "urllib3.util.retry", "urllib3.response"):
    logging.getLogger(_name).addFilter(RedactingFilter())


@dataclass(frozen=True)
class Envelope:
    """The token fields every Keepa response carries (errors included). Times in seconds."""

    status: int
    tokens_left: int | None = None
    refill_in_s: float | None = None
    refill_rate: float | None = None
    flow_reduction: float | None = None
    tokens_consumed: int | None = None
    server_time: float | None = None   # Unix seconds (Keepa sends ms)
    processing_ms: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    received_at: float = 0.0           # local wall time the response arrived
    latency_s: float = 0.0

    @property
    def complete(self) -> bool:
        """Does it carry what the ledger needs to resynchronise?"""
        return self.tokens_left is not None and self.refill_in_s is not None and bool(self.refill_rate)

    @classmethod
    def from_body(cls, body: Any, status: int, received_at: float, latency_s: float) -> "Envelope":
        body = body if isinstance(body, dict) else {}
        error = body.get("error") if isinstance(body.get("error"), dict) else {}

        def num(name, scale=1.0):
            value = body.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None
            return value * scale

        left = num("tokensLeft")
        consumed = num("tokensConsumed")
        return cls(
            status=status,
            tokens_left=int(left) if left is not None else None,
            refill_in_s=num("refillIn", 0.001),
            refill_rate=num("refillRate"),
            flow_reduction=num("tokenFlowReduction"),
            tokens_consumed=int(consumed) if consumed is not None else None,
            server_time=num("timestamp", 0.001),
            processing_ms=num("processingTimeInMs"),
            error_type=redact(str(error.get("type"))) if error.get("type") else None,
            error_message=redact(str(error.get("message")))[:300] if error.get("message") else None,
            received_at=received_at,
            latency_s=latency_s,
        )


class KeepaError(IngestError):
    """Base of the client's errors. `envelope` is set when the server answered."""

    def __init__(self, message: str, *, endpoint: str = "", envelope: Envelope | None = None):
        super().__init__(redact(message))
        self.endpoint = endpoint
        self.envelope = envelope

    @property
    def status(self) -> int | None:
        return self.envelope.status if self.envelope else None


class RateLimited(KeepaError):
    """HTTP 429 NOT_ENOUGH_TOKEN: the call cost nothing; retry once the balance is positive."""


class KeepaRequestError(KeepaError):
    """400/402/404/405: the request (or the key/plan) is wrong; retrying will not help."""

    exit_code = EXIT_CONFIG

    @property
    def error_type(self) -> str | None:
        return self.envelope.error_type if self.envelope else None


class PaymentRequired(KeepaRequestError):
    """HTTP 402: the key is valid but its subscription is inactive (expired, unpaid). Workers
    pause on it and re-check with the free /token call instead of exiting (a renewal resumes
    them); retrying the same request at once cannot help."""


class TransientError(KeepaError):
    """Network failure, timeout or 5xx that outlasted the bounded retries."""


class MalformedResponse(KeepaError):
    """The server answered 200 with something that is not the expected JSON."""


@dataclass
class DealPage:
    deals: list[dict]
    envelope: Envelope
    raw: dict = field(repr=False)


@dataclass
class ProductPage:
    products: list[dict]
    envelope: Envelope


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5            # total tries of one request
    max_total_s: float = 120.0   # stop retrying once this much time has gone by
    first_delay_s: float = 0.1   # then 2 * previous + 0.1 (Keepa's Java client), capped, jittered
    max_delay_s: float = 60.0

    def delays(self):
        delay = self.first_delay_s
        while True:
            yield min(delay, self.max_delay_s) * (0.5 + random.random())
            delay = 2 * delay + 0.1


REQUEST_ERRORS = {400, 402, 404, 405}


class KeepaClient:
    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        domain: int = 1,
        *,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        clock=SYSTEM_CLOCK,
        stop: threading.Event | None = None,
        session: requests.Session | None = None,
    ):
        if not api_key:
            raise IngestError("no Keepa API key")
        register_secret(api_key)
        self._key = api_key
        self.base_url = base_url.rstrip("/")
        self.domain = int(domain)
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.retry = retry
        self.clock = clock
        self.stop = stop
        self.session = session or requests.Session()
        self.session.headers.update({"Accept-Encoding": "gzip", "User-Agent": "ingest"})

    # ------------------------------------------------------------------ endpoints

    def token_status(self) -> Envelope:
        _, envelope = self.request("token", {})
        return envelope

    def deals(self, selection: dict, page: int = 0) -> DealPage:
        selection = {**selection, "page": int(page), "domainId": selection.get("domainId", self.domain)}
        body, envelope = self.request("deal", {"selection": json.dumps(selection, separators=(",", ":"))})
        deals = body.get("deals")
        if not isinstance(deals, dict) or not isinstance(deals.get("dr", []), list):
            raise MalformedResponse("deal: 200 response without a 'deals' object", endpoint="deal", envelope=envelope)
        return DealPage(deals=deals.get("dr") or [], envelope=envelope, raw=deals)

    def products(
        self,
        asins: list[str],
        *,
        stats: int | None = 365,
        history: bool = True,
        days: int | None = None,
        offers: int | None = None,
    ) -> ProductPage:
        if not asins:
            raise ValueError("products() needs at least one ASIN")
        if len(asins) > 100:
            raise ValueError(f"products() takes at most 100 ASINs per call, got {len(asins)}")
        params = {"domain": self.domain, "asin": ",".join(asins), "history": 1 if history else 0}
        if stats is not None:
            params["stats"] = int(stats)
        if days is not None:
            params["days"] = int(days)
        if offers is not None:
            params["offers"] = int(offers)
        body, envelope = self.request("product", params)
        products = body.get("products")
        if not isinstance(products, list):
            raise MalformedResponse(
                "product: 200 response without a 'products' list (malformed ASIN list?)",
                endpoint="product",
                envelope=envelope,
            )
        return ProductPage(products=products, envelope=envelope)

    # ------------------------------------------------------------------ transport

    def request(self, endpoint: str, params: dict) -> tuple[dict, Envelope]:
        """GET one endpoint; retries transient failures; returns (body, envelope) for a 200."""
        started = self.clock.monotonic()
        delays = self.retry.delays()
        for attempt in range(1, self.retry.attempts + 1):
            failure = self._attempt(endpoint, params)
            if not isinstance(failure, TransientError):
                return failure
            elapsed = self.clock.monotonic() - started
            delay = next(delays)
            if attempt == self.retry.attempts or elapsed + delay > self.retry.max_total_s:
                raise TransientError(
                    f"{endpoint}: gave up after {attempt} attempt(s) in {elapsed:.1f}s: {failure}",
                    endpoint=endpoint,
                    envelope=failure.envelope,
                )
            log.warning("keepa %s; retry %d in %.2fs", failure, attempt, delay)
            if self.clock.sleep(delay, self.stop):
                raise TransientError(f"{endpoint}: stopped while retrying: {failure}", endpoint=endpoint)
        raise AssertionError("unreachable")

    def _attempt(self, endpoint: str, params: dict):
        """One HTTP exchange. Returns (body, envelope), or a TransientError to retry; raises the
        rest. Library exceptions are turned into text inside the except block and raised outside
        it, so no exception chain can carry the URL."""
        t0 = self.clock.monotonic()
        problem = None
        try:
            response = self.session.get(
                f"{self.base_url}/{endpoint}", params={"key": self._key, **params}, timeout=self.timeout
            )
            text = response.text
        except requests.Timeout as e:
            problem = f"timed out ({type(e).__name__})"
        except requests.ConnectionError as e:
            problem = f"connection failed: {_connection_reason(self._clean(str(e)))}"
        except requests.RequestException as e:
            problem = f"request failed: {type(e).__name__}: {self._clean(str(e))[:200]}"
        if problem is not None:
            return TransientError(f"{endpoint}: {problem}", endpoint=endpoint)
        latency = self.clock.monotonic() - t0
        body, parse_problem = _parse_json(text)
        envelope = Envelope.from_body(body, response.status_code, self.clock.wall(), latency)
        return self._classify(endpoint, response.status_code, body, parse_problem, envelope)

    def _classify(self, endpoint, status, body, parse_problem, envelope):
        detail = f"{envelope.error_type or ''} {envelope.error_message or ''}".strip()
        if status == 429:
            raise RateLimited(
                f"{endpoint}: 429 not enough tokens (tokensLeft={envelope.tokens_left})",
                endpoint=endpoint,
                envelope=envelope,
            )
        if status == 402:
            raise PaymentRequired(
                f"{endpoint}: HTTP 402 {detail or 'payment required'}", endpoint=endpoint, envelope=envelope
            )
        if status in REQUEST_ERRORS:
            raise KeepaRequestError(
                f"{endpoint}: HTTP {status} {detail or 'request rejected'}", endpoint=endpoint, envelope=envelope
            )
        if status >= 500:
            return TransientError(f"{endpoint}: HTTP {status} {detail}".rstrip(), endpoint=endpoint, envelope=envelope)
        if status != 200:
            raise KeepaRequestError(f"{endpoint}: unexpected HTTP {status} {detail}".rstrip(), endpoint=endpoint, envelope=envelope)
        if parse_problem:
            raise MalformedResponse(f"{endpoint}: 200 response is {parse_problem}", endpoint=endpoint, envelope=envelope)
        return body, envelope

    def _clean(self, text: str) -> str:
        return redact(text.replace(self._key, REDACTED))

    def close(self) -> None:
        self.session.close()


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")(]+)")


def _connection_reason(text: str) -> str:
    """The useful end of urllib3's nested connection error ("Connection refused", ...)."""
    found = _ERRNO.search(text)
    if found:
        return found.group(1).strip().rstrip(".")
    for marker, reason in (("RemoteDisconnected", "the server closed the connection without answering"),
                           ("Connection aborted", "connection aborted"), ("Connection reset", "connection reset"),
                           ("NameResolutionError", "host name not resolved")):
        if marker in text:
            return reason
    return text[:160]


def _parse_json(text: str) -> tuple[dict, str | None]:
    try:
        body = json.loads(text)
    except ValueError:
        return {}, "not JSON"
    if not isinstance(body, dict):
        return {}, "JSON but not an object"
    return body, None
