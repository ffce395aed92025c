"""Keepa's token bucket, as documented in ../shared/keepa-api.md.

- A tick every 60 s (measured on the injected clock's monotonic time, phase fixed at start):
  balance = min(balance + rate, 60 * rate). A balance already above the cap is left alone
  (only reachable through --start-tokens or the admin endpoint).
- A call is admitted when the balance is positive; its cost may take the balance negative.
- A call at zero or below is refused (HTTP 429) and costs nothing.

Ticks are computed lazily from the clock, so tests move a FakeClock instead of sleeping.
"""

import math
import threading
from dataclasses import dataclass

from ..clock import SYSTEM_CLOCK

TICK_SECONDS = 60.0
CAP_MINUTES = 60


@dataclass(frozen=True)
class TokenState:
    """What the envelope reports about the bucket at one instant."""

    balance: int
    refill_in_ms: int
    rate: int
    cap: int


class TokenBucket:
    def __init__(self, rate: int, start_tokens: int | None = None, clock=SYSTEM_CLOCK):
        if rate < 0:
            raise ValueError("refill rate must be >= 0")
        self._clock = clock
        self._lock = threading.Lock()
        self._rate = int(rate)
        self._balance = self.cap if start_tokens is None else int(start_tokens)
        self._origin = clock.monotonic()
        self._ticks_done = 0
        self._pending_rates: list[tuple[float, int]] = []  # (monotonic time, new rate), sorted
        self.refilled = 0
        self.consumed = 0

    @property
    def cap(self) -> int:
        return CAP_MINUTES * self._rate

    # -- time --------------------------------------------------------------------------------

    def _tick_time(self, n: int) -> float:
        return self._origin + n * TICK_SECONDS

    def _apply_ticks(self, count: int) -> None:
        """`count` ticks at the current rate, in closed form (min is monotone, so n ticks of
        min(b + r, cap) equal min(b + n*r, cap))."""
        if count <= 0:
            return
        self._ticks_done += count
        cap = self.cap
        if self._balance >= cap:
            return
        new_balance = min(self._balance + count * self._rate, cap)
        self.refilled += new_balance - self._balance
        self._balance = new_balance

    def _advance(self) -> None:
        now = self._clock.monotonic()
        while self._pending_rates and self._pending_rates[0][0] <= now:
            at, rate = self._pending_rates.pop(0)
            self._apply_ticks(self._ticks_due(at) - self._ticks_done)
            self._set_rate_locked(rate)
        self._apply_ticks(self._ticks_due(now) - self._ticks_done)

    def _ticks_due(self, t: float) -> int:
        return max(0, math.floor((t - self._origin) / TICK_SECONDS))

    def _set_rate_locked(self, rate: int) -> None:
        self._rate = int(rate)
        # Tokens above the new cap would have expired under the new plan.
        if self._balance > self.cap:
            self._balance = self.cap

    # -- calls -------------------------------------------------------------------------------

    def admit(self) -> bool:
        """True when a call may run now (balance positive)."""
        with self._lock:
            self._advance()
            return self._balance > 0

    def charge(self, cost: int) -> None:
        with self._lock:
            self._advance()
            self._balance -= int(cost)
            self.consumed += int(cost)

    def state(self) -> TokenState:
        with self._lock:
            self._advance()
            next_tick = self._tick_time(self._ticks_done + 1)
            refill_in = max(0, math.ceil((next_tick - self._clock.monotonic()) * 1000))
            return TokenState(self._balance, min(refill_in, int(TICK_SECONDS * 1000)), self._rate, self.cap)

    # -- admin -------------------------------------------------------------------------------

    def set_rate(self, rate: int) -> None:
        with self._lock:
            self._advance()
            self._set_rate_locked(rate)

    def schedule_rate(self, delay_s: float, rate: int) -> None:
        """Change the refill rate `delay_s` seconds from now (ticks before it use the old rate)."""
        with self._lock:
            self._advance()
            self._pending_rates.append((self._clock.monotonic() + delay_s, int(rate)))
            self._pending_rates.sort()

    def set_balance(self, balance: int) -> None:
        with self._lock:
            self._advance()
            self._balance = int(balance)
