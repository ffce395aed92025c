"""The simulator's settings (one dataclass, shared by the Python API and `ingest sim`)."""

from dataclasses import dataclass, field

from ..clock import SYSTEM_CLOCK

KEEPA_EPOCH_MINUTES = 21_564_000  # Keepa minute 0 = 2011-01-01 00:00 UTC


def keepa_minute(unix_seconds: float) -> int:
    return int(unix_seconds // 60) - KEEPA_EPOCH_MINUTES


def unix_seconds(keepa_min: int) -> int:
    return (keepa_min + KEEPA_EPOCH_MINUTES) * 60


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port; see Simulator.url
    refill_rate: int = 300  # tokens per minute
    start_tokens: int | None = None  # None = the cap (60 x rate)
    token_flow_reduction: float = 0.0  # reported in the envelope only
    seed: int = 1
    products: int = 5000
    api_keys: tuple[str, ...] | None = None  # None = any non-empty key is valid
    expired_keys: tuple[str, ...] = ()  # answered with 402
    # Faults: shares of requests (0..1), drawn independently per request.
    fault_500: float = 0.0
    fault_slow: float = 0.0
    slow_s: float = 2.0
    fault_timeout: float = 0.0
    timeout_s: float = 30.0  # longer than any sane client timeout
    fault_malformed: float = 0.0
    fault_no_history: float = 0.0  # share of products returned with csv = null
    fault_drip: float = 0.0        # charged, then the body trickles out over drip_s
    drip_s: float = 60.0           # longer than a client's [keepa] deadline_s (30 s)
    fault_redirect: float = 0.0    # a 302 to redirect_to (another host): costs nothing
    redirect_to: str = "http://127.0.0.2:9/elsewhere"
    force_429_window: tuple[float, float] | None = None  # (start_s after start, duration_s)
    force_429: tuple[float, float] | None = None  # alias of force_429_window
    force_402_window: tuple[float, float] | None = None  # every call answered 402 (start_s, duration_s)
    rate_change: tuple[float, int] | None = None  # (at_s after start, new refill rate)
    # Deal dynamics: how many listed deals get a new lastUpdate per minute, and how many
    # products start being deal-listed per minute after start.
    deal_update_per_min: float = 30.0
    deal_new_per_min: float = 2.0
    deal_share: float = 0.6  # share of products that are ever deal-listed
    deal_cache_s: float = 120.0  # Keepa caches a deal query's result about 120 s
    anchor: float | None = None  # Unix seconds where generated histories end; None = start time
    clock: object = field(default=SYSTEM_CLOCK, repr=False)

    def __post_init__(self):
        if self.force_429 is not None and self.force_429_window is None:
            self.force_429_window = tuple(self.force_429)
        if self.api_keys is not None:
            self.api_keys = tuple(self.api_keys)
        self.expired_keys = tuple(self.expired_keys or ())

    def validate(self) -> None:
        """Raise ValueError with one line on a setting that cannot work."""
        for name in ("fault_500", "fault_slow", "fault_timeout", "fault_malformed", "fault_no_history", "fault_drip",
                     "fault_redirect", "deal_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.refill_rate < 0:
            raise ValueError("refill_rate must be >= 0")
        if self.products < 1 or self.products > 10_000_000:
            raise ValueError("products must be between 1 and 10,000,000")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        if self.slow_s < 0 or self.timeout_s < 0 or self.drip_s < 0:
            raise ValueError("slow_s, timeout_s and drip_s must be >= 0")
        if self.deal_update_per_min <= 0 or self.deal_new_per_min <= 0:
            raise ValueError("deal rates must be > 0")
