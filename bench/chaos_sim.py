"""The Keepa simulator as a separate process for the chaos run (bench/chaos.py).

Its own process, not a thread of the chaos driver: restarting supervisord must not reset its
counters, and the driver's sampling threads must not slow its answers. Everything after start
goes through its admin endpoints (docs/simulator.md): /_sim/faults, /_sim/tokens, /_sim/stats.
"""

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path


class SimProcess:
    def __init__(self, ingest_bin: Path, *, refill_rate: int, start_tokens: int, products: int, seed: int,
                 timeout_s: float, log_path: Path, drip_s: float = 60.0, redirect_to: str | None = None):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [str(ingest_bin), "sim", "--port", "0", "--refill-rate", str(refill_rate),
             "--start-tokens", str(start_tokens), "--products", str(products), "--seed", str(seed),
             "--timeout-s", str(timeout_s), "--drip-s", str(drip_s),
             *(["--redirect-to", redirect_to] if redirect_to else [])],
            stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True,
        )
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.stop()
            raise RuntimeError(f"the simulator did not start (first line {self.url!r}); see {log_path}")

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def set_faults(self, **changes) -> dict:
        return self._call("/_sim/faults", changes)

    def set_tokens(self, **changes) -> dict:
        return self._call("/_sim/tokens", changes)

    def tokens(self) -> dict:
        return self._call("/_sim/tokens")

    def stats(self) -> dict:
        return self._call("/_sim/stats")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()


def wait_for(predicate, timeout: float, interval: float = 0.2):
    """predicate()'s first truthy value, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value or None
        time.sleep(interval)
