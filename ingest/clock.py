"""Time sources, injectable so that time logic is testable without sleeping.

`wall()` is Unix seconds (it can step: NTP, manual changes); `monotonic()` never steps.
Same-host processes share CLOCK_MONOTONIC, so monotonic readings are comparable across
processes of one boot (see docs/design.md, leases).
"""

import threading
import time


class SystemClock:
    def wall(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.clock_gettime(time.CLOCK_MONOTONIC)

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> bool:
        """Sleep, waking early when `stop` is set. Returns True when stopped."""
        if stop is None:
            time.sleep(max(0.0, seconds))
            return False
        return stop.wait(max(0.0, seconds))


class FakeClock:
    """A clock tests move by hand. `step_wall` models an NTP jump; monotonic never jumps."""

    def __init__(self, wall: float = 1_700_000_000.0, monotonic: float = 1_000.0):
        self._wall = wall
        self._mono = monotonic
        self._lock = threading.Lock()

    def wall(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._wall += seconds
            self._mono += seconds

    def step_wall(self, seconds: float) -> None:
        with self._lock:
            self._wall += seconds

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> bool:
        self.advance(max(0.0, seconds))
        return bool(stop and stop.is_set())


SYSTEM_CLOCK = SystemClock()
