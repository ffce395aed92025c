"""The simulator's request handling, independent of HTTP: (method, path, params, body) -> Reply.

Order of checks for /token, /deal, /product (each answer carries the token envelope):
key (400 missing/unknown, 402 expired) -> parameters (400/405) -> tokens (429 at zero or
below, or in a forced window; cost 0) -> injected request fault -> the call, charged.
/token is free and never refused for tokens.
"""

import json
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from .catalogue import Catalogue
from .config import SimConfig, keepa_minute
from .deals import DealBook, SelectionError, parse_selection
from .faults import Faults
from .products import ProductOptions, build_product
from .tokens import TokenBucket

KEEPA_ENDPOINTS = ("/token", "/deal", "/product")
DEAL_PAGE_COST = 5
MAX_ASINS = 100
DOMAINS = frozenset([1, 2, 3, 4, 5, 6, 8, 9, 10, 11])


@dataclass
class Reply:
    status: int
    payload: dict
    delay_s: float = 0.0
    truncate: bool = False  # the malformed-JSON fault
    drip_s: float = 0.0     # the drip fault: the body takes this long to send
    location: str | None = None  # the redirect fault: a 302 to here


class BadRequest(Exception):
    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status, self.error_type = status, error_type


class SimApp:
    def __init__(self, cfg: SimConfig):
        cfg.validate()
        self.cfg = cfg
        self.clock = cfg.clock
        anchor = cfg.anchor if cfg.anchor is not None else self.clock.wall()
        self.catalogue = Catalogue(cfg.seed, cfg.products, keepa_minute(anchor), cfg.deal_share,
                                   cfg.deal_update_per_min, cfg.deal_new_per_min)
        self.deal_book = DealBook(self.catalogue, cfg.deal_cache_s)
        self.bucket = TokenBucket(cfg.refill_rate, cfg.start_tokens, self.clock)
        if cfg.rate_change:
            self.bucket.schedule_rate(cfg.rate_change[0], cfg.rate_change[1])
        self.faults = Faults(cfg, self.clock)
        self.api_keys = None if cfg.api_keys is None else frozenset(cfg.api_keys)
        self.expired_keys = frozenset(cfg.expired_keys)
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.statuses: dict[str, int] = {}
        self.served_429 = 0
        self.products_returned = 0
        self.deal_asins: set[str] = set()

    # -- entry point -------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: str, body: bytes, content_type: str = "") -> Reply:
        started = time.perf_counter()
        endpoint = "/" + path.strip("/") if path.strip("/") else "/"
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        if endpoint.startswith("/_sim/"):  # admin traffic is not counted in the stats
            try:
                return self._admin(method, endpoint, body)
            except BadRequest as e:
                return Reply(e.status, {"error": {"type": e.error_type, "message": str(e), "details": None}})
        self._count(self.requests, endpoint if endpoint in KEEPA_ENDPOINTS else "other")
        try:
            if endpoint in KEEPA_ENDPOINTS:
                if "form-urlencoded" in content_type and body:
                    params.update({k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()})
                    body = b""
                reply = self._keepa(endpoint, method, params, body, started)
            else:
                raise BadRequest(404, "notFound", f"unknown endpoint {endpoint}")
        except BadRequest as e:
            reply = Reply(e.status, {**self.envelope(0, started),
                                     "error": {"type": e.error_type, "message": str(e), "details": None}})
        self._count(self.statuses, str(reply.status))
        return reply

    def _count(self, table: dict, key: str) -> None:
        with self._lock:
            table[key] = table.get(key, 0) + 1

    def envelope(self, consumed: int, started: float, account: bool = True) -> dict:
        state = self.bucket.state()
        return {
            "timestamp": int(self.clock.wall() * 1000),
            "tokensLeft": state.balance if account else 0,
            "refillIn": state.refill_in_ms if account else 0,
            "refillRate": state.rate if account else 0,
            "tokenFlowReduction": self.cfg.token_flow_reduction if account else 0.0,
            "tokensConsumed": consumed,
            "processingTimeInMs": int((time.perf_counter() - started) * 1000),
        }

    # -- Keepa endpoints ---------------------------------------------------------------------

    def _keepa(self, endpoint: str, method: str, params: dict, body: bytes, started: float) -> Reply:
        key = params.get("key", "")
        if key in self.expired_keys:
            return self._error(402, "paymentRequired", "the access key has expired", started, account=False)
        if key and (self.api_keys is None or key in self.api_keys) and self.faults.in_forced_402():
            return self._error(402, "paymentRequired", "the subscription is inactive", started, account=False)
        if not key or (self.api_keys is not None and key not in self.api_keys):
            return self._error(400, "invalidAccessKey", "invalid access key", started, account=False)
        if endpoint == "/token":
            call = lambda: (0, {})  # noqa: E731
        elif endpoint == "/deal":
            call = self._deal_call(method, params, body)
        else:
            call = self._product_call(params)
        if endpoint != "/token":
            if self.faults.in_forced_429():
                self.faults.count_forced_429()
                return self._refuse(started)
            if not self.bucket.admit():
                return self._refuse(started)
        fault = self.faults.draw_request_fault()
        if fault == "500":
            return self._error(500, "internalServerError", "injected server error", started)
        if fault == "redirect":
            return Reply(302, {}, location=self.cfg.redirect_to)
        cost, payload = call()
        self.bucket.charge(cost)
        return Reply(200, {**self.envelope(cost, started), **payload},
                     delay_s=self.faults.delay_for(fault), truncate=fault == "malformed",
                     drip_s=self.faults.settings["drip_s"] if fault == "drip" else 0.0)

    def _refuse(self, started: float) -> Reply:
        with self._lock:
            self.served_429 += 1
        return self._error(429, "notEnoughToken", "not enough tokens", started)

    def _error(self, status: int, error_type: str, message: str, started: float, account: bool = True) -> Reply:
        return Reply(status, {**self.envelope(0, started, account),
                              "error": {"type": error_type, "message": message, "details": None}})

    def _deal_call(self, method: str, params: dict, body: bytes):
        raw = body if method == "POST" and body.strip() else params.get("selection")
        if raw is None:
            raise BadRequest(400, "invalidParameter", "selection is required")
        try:
            query = parse_selection(json.loads(raw))
        except (ValueError, SelectionError) as e:  # JSONDecodeError is a ValueError
            raise BadRequest(400, "invalidParameter", f"malformed selection: {e}") from None

        def call():
            page = self.deal_book.page(query, self.now_km(), self.clock.monotonic())
            with self._lock:
                self.deal_asins.update(d["asin"] for d in page["dr"])
            return DEAL_PAGE_COST, {"deals": page}

        return call

    def _product_call(self, params: dict):
        domain = _int_param(params, "domain", None)
        if domain not in DOMAINS:
            raise BadRequest(400, "invalidParameter", "domain must be a valid Amazon locale id")
        raw = params.get("asin")
        if raw is None:
            if params.get("code"):  # product codes (UPC/EAN) are not simulated: nothing found
                return lambda: (0, {"products": []})
            raise BadRequest(400, "invalidParameter", "asin or code is required")
        asins = list(dict.fromkeys(a.strip().upper() for a in raw.split(",") if a.strip()))
        if not asins:
            raise BadRequest(400, "invalidParameter", "asin is empty")
        if len(asins) > MAX_ASINS:
            raise BadRequest(400, "invalidParameter", f"at most {MAX_ASINS} ASINs per request")
        opts = _product_options(params)
        if not all(len(a) == 10 and a.isalnum() for a in asins):
            return lambda: (0, {})  # Keepa: 200 without a products key

        def call():
            now_km = self.now_km()
            products, cost = [], 0
            for asin in asins:
                index = self.catalogue.index_of(asin)
                if index is None:
                    continue
                product, c = build_product(self.catalogue, index, now_km, opts, domain,
                                           without_history=self.faults.draw_no_history())
                products.append(product)
                cost += c
            with self._lock:
                self.products_returned += len(products)
            return cost, {"products": products}

        return call

    def now_km(self) -> int:
        return keepa_minute(self.clock.wall())

    # -- admin -------------------------------------------------------------------------------

    def _admin(self, method: str, endpoint: str, body: bytes) -> Reply:
        if endpoint == "/_sim/stats" and method == "GET":
            return Reply(200, self.stats())
        if endpoint in ("/_sim/faults", "/_sim/tokens"):
            if method == "GET":
                return Reply(200, self.faults.describe() if endpoint == "/_sim/faults" else self.token_info())
            try:
                changes = json.loads(body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("body must be a JSON object")
                if endpoint == "/_sim/faults":
                    return Reply(200, self.faults.update(changes))
                return Reply(200, self.update_tokens(changes))
            except ValueError as e:
                raise BadRequest(400, "invalidParameter", str(e)) from None
        raise BadRequest(404, "notFound", f"unknown endpoint {endpoint}")

    def token_info(self) -> dict:
        state = self.bucket.state()
        return {"tokensLeft": state.balance, "refillIn": state.refill_in_ms, "refillRate": state.rate,
                "cap": state.cap, "refilled": self.bucket.refilled, "consumed": self.bucket.consumed}

    def update_tokens(self, changes: dict) -> dict:
        """{"tokens": N} sets the balance, {"refill_rate": R} changes the rate now,
        {"rate_change": [at_s, R]} schedules a change."""
        for name, value in changes.items():
            ok = isinstance(value, int) and not isinstance(value, bool)
            if name == "rate_change":
                ok = (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
                      and value[0] >= 0 and value[1] >= 0)
            if name not in ("tokens", "refill_rate", "rate_change") or not ok:
                raise ValueError(f"bad token setting {name!r}: {value!r}")
            if name == "refill_rate" and value < 0:
                raise ValueError("refill_rate must be >= 0")
        if "tokens" in changes:
            self.bucket.set_balance(changes["tokens"])
        if "refill_rate" in changes:
            self.bucket.set_rate(changes["refill_rate"])
        if "rate_change" in changes:
            self.bucket.schedule_rate(float(changes["rate_change"][0]), int(changes["rate_change"][1]))
        return self.token_info()

    def stats(self) -> dict:
        with self._lock:
            asins = sorted(self.deal_asins)
            tokens = self.token_info()
            return {
                "tokens": tokens,
                "tokens_consumed": tokens["consumed"],  # flat aliases of tokens.* and served_429
                "tokens_refilled": tokens["refilled"],
                "served_429": self.served_429,
                "responses_429": self.served_429,
                "faults": dict(self.faults.counts),
                "requests": dict(self.requests),
                "statuses": dict(self.statuses),
                "products_returned": self.products_returned,
                "deal_asins_count": len(asins),
                "deal_asins": asins,
                "listed_asins": asins,  # alias of deal_asins
            }


def _int_param(params: dict, name: str, default):
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(400, "invalidParameter", f"{name} must be an integer") from None


def _product_options(params: dict) -> ProductOptions:
    opts = ProductOptions(
        stats_days=_int_param(params, "stats", None),
        history=_int_param(params, "history", 1) != 0,
        days=_int_param(params, "days", None),
        offers=_int_param(params, "offers", None),
        buybox=_int_param(params, "buybox", 0) != 0,
        rating=_int_param(params, "rating", 0) != 0,
        update=_int_param(params, "update", None),
    )
    if opts.offers is not None and opts.offers != 0 and not 20 <= opts.offers <= 100:
        raise BadRequest(405, "invalidParameter", "offers must be between 20 and 100")
    if opts.offers == 0:
        opts.offers = None
    for name in ("stats_days", "days", "update"):
        value = getattr(opts, name)
        if value is not None and value < 0:
            raise BadRequest(405, "invalidParameter", f"{name.split('_')[0]} must be >= 0")
    return opts
