"""Fault injection: shares of requests that fail in the ways a Keepa client must survive.

Per request to /token, /deal or /product (after the key check, the parameter check and the
token check), at most one of these is drawn, in this order:
- "500": HTTP 500 with the envelope; costs nothing.
- "timeout": the call is processed and charged like a real one, but the answer is held for
  timeout_s (longer than a client waits), so the client pays tokens and hears nothing.
- "malformed": the call is processed and charged; the body (200) is cut in half.
- "redirect": HTTP 302 to redirect_to (another host); costs nothing. A client that follows it
  hands the key to that host.
- "drip": the call is processed and charged; the body trickles out over drip_s (longer than a
  client's deadline), a piece every half second.
- "slow": the call is processed and charged; the answer comes after slow_s.
Per product returned by /product:
- "no_history": the product comes back with csv = null and stats = null (the partial-data
  case), charged as usual.
A forced 429 window refuses every call in it (cost 0) whatever the balance.
A forced 402 window answers every call in it, /token included, with HTTP 402 paymentRequired
(cost 0): an inactive subscription, as when an account is not renewed and then paid again.
"""

import random
import threading

REQUEST_FAULTS = ("500", "redirect", "timeout", "malformed", "drip", "slow")
FAULT_KINDS = (*REQUEST_FAULTS, "no_history", "forced_429", "forced_402")
SHARE_FIELDS = ("fault_500", "fault_slow", "fault_timeout", "fault_malformed", "fault_no_history", "fault_drip",
                "fault_redirect")
SECONDS_FIELDS = ("slow_s", "timeout_s", "drip_s")


class Faults:
    def __init__(self, cfg, clock):
        self._clock = clock
        self._lock = threading.Lock()
        self._rng = random.Random(f"{cfg.seed}/faults")
        self.settings = {name: float(getattr(cfg, name)) for name in SHARE_FIELDS + SECONDS_FIELDS}
        self._window: tuple[float, float] | None = None
        self._window_402: tuple[float, float] | None = None
        if cfg.force_429_window:
            self.force_429(*cfg.force_429_window)
        if cfg.force_402_window:
            self.force_402(*cfg.force_402_window)
        self.counts = dict.fromkeys(FAULT_KINDS, 0)

    def force_429(self, start_s: float, duration_s: float) -> None:
        """Refuse every call from start_s to start_s + duration_s (seconds from now)."""
        now = self._clock.monotonic()
        with self._lock:
            self._window = (now + start_s, now + start_s + duration_s)

    def in_forced_429(self) -> bool:
        return self._inside(self._window)

    def force_402(self, start_s: float, duration_s: float) -> None:
        """Answer every call with 402 from start_s to start_s + duration_s (seconds from now)."""
        now = self._clock.monotonic()
        with self._lock:
            self._window_402 = (now + start_s, now + start_s + duration_s)

    def in_forced_402(self) -> bool:
        if not self._inside(self._window_402):
            return False
        with self._lock:
            self.counts["forced_402"] += 1
        return True

    def _inside(self, window: tuple[float, float] | None) -> bool:
        return window is not None and window[0] <= self._clock.monotonic() < window[1]

    def update(self, changes: dict) -> dict:
        """Apply admin changes ({"fault_500": 0.2, "force_429": [start_s, duration_s] | null, ...}).
        Raises ValueError (one line) on a bad value; nothing is applied then."""
        new = dict(self.settings)
        window = window_402 = "unchanged"
        for name, value in changes.items():
            if name in SHARE_FIELDS:
                if not _number(value) or not 0.0 <= value <= 1.0:
                    raise ValueError(f"{name} must be a number between 0 and 1")
                new[name] = float(value)
            elif name in SECONDS_FIELDS:
                if not _number(value) or value < 0:
                    raise ValueError(f"{name} must be a number of seconds >= 0")
                new[name] = float(value)
            elif name == "force_429":
                if value is not None and (not isinstance(value, list) or len(value) != 2
                                          or not all(_number(v) and v >= 0 for v in value)):
                    raise ValueError("force_429 must be [start_s, duration_s] or null")
                window = value
            elif name == "force_402":
                if value is not None and (not isinstance(value, list) or len(value) != 2
                                          or not all(_number(v) and v >= 0 for v in value)):
                    raise ValueError("force_402 must be [start_s, duration_s] or null")
                window_402 = value
            else:
                raise ValueError(f"unknown fault setting {name!r}")
        with self._lock:
            self.settings = new
            if window is None:
                self._window = None
            if window_402 is None:
                self._window_402 = None
        if window not in ("unchanged", None):
            self.force_429(*window)
        if window_402 not in ("unchanged", None):
            self.force_402(*window_402)
        return self.describe()

    def describe(self) -> dict:
        out = dict(self.settings)
        window = self._window
        now = self._clock.monotonic()
        out["force_429"] = None if window is None else [round(window[0] - now, 3), round(window[1] - now, 3)]
        window = self._window_402
        out["force_402"] = None if window is None else [round(window[0] - now, 3), round(window[1] - now, 3)]
        return out

    def draw_request_fault(self) -> str | None:
        s = self.settings
        with self._lock:
            for kind, share in (("500", s["fault_500"]), ("redirect", s["fault_redirect"]),
                                ("timeout", s["fault_timeout"]), ("malformed", s["fault_malformed"]),
                                ("drip", s["fault_drip"]), ("slow", s["fault_slow"])):
                if share and self._rng.random() < share:
                    self.counts[kind] += 1
                    return kind
        return None

    def draw_no_history(self) -> bool:
        share = self.settings["fault_no_history"]
        if not share:
            return False
        with self._lock:
            hit = self._rng.random() < share
            if hit:
                self.counts["no_history"] += 1
            return hit

    def count_forced_429(self) -> None:
        with self._lock:
            self.counts["forced_429"] += 1

    def delay_for(self, kind: str | None) -> float:
        if kind == "timeout":
            return self.settings["timeout_s"]
        if kind == "slow":
            return self.settings["slow_s"]
        return 0.0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
