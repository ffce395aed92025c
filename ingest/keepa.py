"""The Keepa HTTP client: one request per call, the token envelope, typed errors, no leaked key.

It knows nothing about tokens beyond reading the envelope: the ledger (ingest/ledger.py) decides
when a call may be made, and ingest/metered.py ties the two together. Connection errors, timeouts
and 5xx are retried here (bounded attempts and total time, exponential backoff with jitter);
429 is raised at once as `RateLimited` so the ledger can hold every worker.

The key travels in the query string, so a URL is a secret: no URL is ever logged or put into an
exception, and every message built from a library exception goes through `redact()`. Redirects
are never followed (a 3xx would carry the key to another host): one is an error naming the status
and the target host only.

Every attempt is bounded (`Bounds`): it runs in an I/O thread that streams the body, counting
decoded bytes (gzip included) against `max_body_bytes` and checking the deadline between chunks,
while the calling thread waits for it, for the deadline, or for `stop` (SIGTERM), whichever comes
first. An attempt past either bound is abandoned as transient. What the server sent is parsed and
checked by ingest/envelope.py: an envelope outside Keepa's token model is ignored for the ledger.
"""

import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3

from .asins import is_asin
from .envelope import TokenFields, parse_json, token_problem

from .clock import SYSTEM_CLOCK
from .errors import EXIT_CONFIG, ConfigError, IngestError
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

        fields = TokenFields(tokens_left=num("tokensLeft"), refill_in_ms=num("refillIn"),
                             refill_rate=num("refillRate"), flow_reduction=num("tokenFlowReduction"),
                             tokens_consumed=num("tokensConsumed"), timestamp_ms=num("timestamp"))
        problem = token_problem(fields, received_at)
        if problem is not None:  # outside Keepa's model: nothing of it may reach the ledger
            log.warning("keepa HTTP %d: token envelope ignored for the ledger: %s", status, problem)
            fields = TokenFields()
        return cls(
            status=status,
            tokens_left=int(fields.tokens_left) if fields.tokens_left is not None else None,
            refill_in_s=fields.refill_in_ms * 0.001 if fields.refill_in_ms is not None else None,
            refill_rate=fields.refill_rate,
            flow_reduction=fields.flow_reduction,
            tokens_consumed=int(fields.tokens_consumed) if fields.tokens_consumed is not None else None,
            server_time=fields.timestamp_ms * 0.001 if fields.timestamp_ms is not None else None,
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
CHUNK_BYTES = 64 * 1024   # at most this much decoded body per read (urllib3 bounds gzip output too)
WAIT_POLL_S = 0.05        # how often the calling thread looks at `stop` during an attempt


@dataclass(frozen=True)
class Bounds:
    """One HTTP attempt, end to end: connect to last byte within `deadline_s`, a body of at most
    `max_body_bytes` decoded."""

    deadline_s: float = 30.0
    max_body_bytes: int = 64 * 2**20

    @classmethod
    def from_settings(cls, deadline_s: float, max_body_mb: float) -> "Bounds":
        return cls(deadline_s, int(max_body_mb * 2**20))


@dataclass
class Exchange:
    """What the I/O thread of one attempt hands back: a status and body, or a problem line."""

    status: int = 0
    body: bytes = b""
    redirect_host: str | None = None
    problem: str | None = None


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
        bounds: Bounds = Bounds(),
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
        # no single socket wait may outlast the attempt's deadline
        self.timeout = (min(connect_timeout_s, bounds.deadline_s), min(read_timeout_s, bounds.deadline_s))
        self.retry = retry
        self.bounds = bounds
        self.clock = clock
        self.stop = stop
        self.session = session or _new_session()

    # ------------------------------------------------------------------ endpoints

    def token_status(self) -> Envelope:
        _, envelope = self.request("token", {})
        return envelope

    def deals(self, selection: dict, page: int = 0) -> DealPage:
        check_query_domain(selection, self.domain)  # /product will ask self.domain: one marketplace
        selection = {**selection, "page": int(page), "domainId": self.domain}
        body, envelope = self.request("deal", {"selection": json.dumps(selection, separators=(",", ":"))})
        deals = body.get("deals")
        if not isinstance(deals, dict) or not isinstance(deals.get("dr", []), list):
            raise MalformedResponse("deal: 200 response without a 'deals' object", endpoint="deal", envelope=envelope)
        return DealPage(deals=_with_valid_asins("deal", deals.get("dr") or []), envelope=envelope, raw=deals)

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
        return ProductPage(products=_with_valid_asins("product", products), envelope=envelope)

    # ------------------------------------------------------------------ transport

    def request(self, endpoint: str, params: dict) -> tuple[dict, Envelope]:
        """GET one endpoint; retries transient failures; returns (body, envelope) for a 200."""
        started = self.clock.monotonic()
        delays = self.retry.delays()
        for attempt in range(1, self.retry.attempts + 1):
            failure = self._attempt(endpoint, params)
            if not isinstance(failure, TransientError):
                return failure
            if self._stopping():
                raise failure
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
        """One HTTP exchange, bounded in time and size. Returns (body, envelope), or a
        TransientError to retry; raises the rest."""
        t0 = self.clock.monotonic()
        exchange = self._bounded_exchange(f"{self.base_url}/{endpoint}", {"key": self._key, **params})
        if exchange.problem is not None:
            return TransientError(f"{endpoint}: {exchange.problem}", endpoint=endpoint)
        if exchange.redirect_host is not None:
            return TransientError(f"{endpoint}: HTTP {exchange.status} redirect to {exchange.redirect_host}"
                                  " not followed (the key stays with the configured host)", endpoint=endpoint)
        latency = self.clock.monotonic() - t0
        parsed = parse_json(exchange.body.decode("utf-8", errors="replace"))
        envelope = Envelope.from_body(parsed.body, exchange.status, self.clock.wall(), latency)
        return self._classify(endpoint, exchange.status, parsed.body, parsed.problem, envelope)

    def _bounded_exchange(self, url: str, params: dict) -> Exchange:
        """Run `_exchange` in an I/O thread and wait for it, for the deadline or for `stop`. An
        abandoned thread stops at its next chunk, or at its socket timeout (at most the deadline)."""
        deadline = time.monotonic() + self.bounds.deadline_s
        cancelled, done, result = threading.Event(), threading.Event(), []

        def run():
            try:
                result.append(_exchange(self.session, url, params, self.timeout, self.bounds, deadline,
                                        cancelled, self._clean))
            except Exception as e:  # noqa: BLE001 - never a thread traceback (its text may hold the URL)
                result.append(Exchange(problem=f"request failed: {type(e).__name__}"))
            finally:
                done.set()

        threading.Thread(target=run, daemon=True, name="keepa-http").start()
        while not done.wait(WAIT_POLL_S):
            if self._stopping() or time.monotonic() > deadline:
                cancelled.set()
                self.session = _new_session()  # the abandoned thread keeps the old one to itself
                if self._stopping():
                    return Exchange(problem="abandoned: the worker is stopping")
                return Exchange(problem=f"no complete answer within deadline_s = {self.bounds.deadline_s:g} s (abandoned)")
        return result[0] if result else Exchange(problem="the request thread failed")

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

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


def check_query_domain(query: dict | None, domain: int) -> None:
    """ConfigError unless the deal query lists the marketplace /product asks ([keepa] domain):
    German deals bought with US histories would be stored and evaluated, and wrong."""
    wanted = (query or {}).get("domainId", domain)
    if wanted != domain:
        raise ConfigError(f"the deal query has domainId {wanted!r} but [keepa] domain is {domain}: one marketplace"
                          f" per query (set [keepa] domain = {wanted!r}, or domainId = {domain} in the query)")


def _with_valid_asins(endpoint: str, entries: list) -> list[dict]:
    """The entries that are objects with a well-formed ASIN; one line saying how many were not."""
    kept = [e for e in entries if isinstance(e, dict) and is_asin(e.get("asin"))]
    if len(kept) < len(entries):
        log.warning("keepa %s: %d of %d entries dropped: not an object with a valid ASIN (10 of A-Z0-9)",
                    endpoint, len(entries) - len(kept), len(entries))
    return kept


def _new_session() -> requests.Session:
    session = requests.Session()
    session.headers.update({"Accept-Encoding": "gzip", "User-Agent": "ingest"})
    return session


def _exchange(session: requests.Session, url: str, params: dict, timeout, bounds: Bounds, deadline: float,
              cancelled: threading.Event, clean) -> Exchange:
    """GET without following redirects and read the body in chunks, within the bounds. Library
    exceptions are turned into text inside the except blocks, so no exception chain can carry
    the URL; `clean` redacts that text."""
    try:
        response = session.get(url, params=params, timeout=timeout, stream=True, allow_redirects=False)
    except requests.Timeout as e:
        return Exchange(problem=f"timed out ({type(e).__name__})")
    except requests.ConnectionError as e:
        return Exchange(problem=f"connection failed: {_connection_reason(clean(str(e)))}")
    except requests.RequestException as e:
        return Exchange(problem=f"request failed: {type(e).__name__}: {clean(str(e))[:200]}")
    try:
        if 300 <= response.status_code < 400:
            return Exchange(response.status_code, redirect_host=_target_host(response.headers.get("Location", "")))
        return _read_body(response, bounds, deadline, cancelled, clean)
    finally:
        response.close()


def _read_body(response, bounds: Bounds, deadline: float, cancelled: threading.Event, clean) -> Exchange:
    body = bytearray()
    try:
        while True:
            chunk = response.raw.read1(CHUNK_BYTES, decode_content=True)
            if not chunk:
                return Exchange(response.status_code, bytes(body))
            body += chunk
            if len(body) > bounds.max_body_bytes:
                return Exchange(problem=f"response body larger than max_body_mb = {bounds.max_body_bytes / 2**20:g}"
                                        " (abandoned)")
            if cancelled.is_set():
                return Exchange(problem="abandoned")
            if time.monotonic() > deadline:
                return Exchange(problem=f"no complete answer within deadline_s = {bounds.deadline_s:g} s (abandoned)")
    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
        if isinstance(e, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return Exchange(problem=f"timed out ({type(e).__name__})")
        return Exchange(problem=f"reading the response failed: {type(e).__name__}: {clean(str(e))[:200]}")


_HOST_CHARS = re.compile(r"[^A-Za-z0-9.:\[\]-]")


def _target_host(location: str) -> str:
    """The host a redirect points to, and nothing else of its URL (never its query)."""
    try:
        parts = urlsplit(location.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return "an invalid location"
    if not host:
        return "the same host"
    host = _HOST_CHARS.sub("?", host)[:80]
    return f"{host}:{port}" if port else host


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
