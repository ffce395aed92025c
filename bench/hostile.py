"""Hostile-server figures: how fast a bad answer is abandoned, how fast a worker stops in one, and
how much memory a body that never ends costs.

    .venv/bin/python bench/hostile.py [--rounds 3] [--skip-worker]

Against tests/hostile_server.py on loopback:
  drip-fed body (a byte every 0.1 s)   abandon time per deadline_s        vs  deadline_s itself
  SIGTERM to `ingest run backfill`      stop time during a drip / a stall  vs  stop time while idle-working
  endless body, gzip bomb               peak RSS of a fresh process        vs  the same process's RSS before
  parse_json of a big product body      time                               vs  plain json.loads
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest.envelope import parse_json  # noqa: E402
from ingest.keepa import Bounds, KeepaClient, RetryPolicy, TransientError  # noqa: E402
from tests.hostile_server import Drip, HostileServer, Stall  # noqa: E402

KEY = "BENCHKEY-0123456789abcdef"
ONCE = RetryPolicy(attempts=1)
INGEST = str(Path(sys.executable).parent / "ingest")


def report(name: str, value: str) -> None:
    print(f"  {name:<58} {value}")


def drip_abandon(rounds: int) -> None:
    print("drip-fed body (one byte every 0.1 s): time until the attempt is abandoned")
    with HostileServer() as server:
        for deadline in (1.0, 2.0, 5.0):
            times = []
            for _ in range(rounds):
                server.script("token", Drip(interval_s=0.1))
                client = KeepaClient(KEY, server.url, retry=ONCE, bounds=Bounds(deadline_s=deadline))
                t0 = time.monotonic()
                try:
                    client.token_status()
                except TransientError:
                    pass
                times.append(time.monotonic() - t0)
            report(f"deadline_s = {deadline:g}", f"median {statistics.median(times):.2f} s, max {max(times):.2f} s"
                   f" (over the deadline: {max(times) - deadline:+.2f} s)")


# peak RSS from /proc's VmHWM (kB), this process's own: getrusage's ru_maxrss would carry the
# forking parent's over exec
_RSS_CHILD = r"""
import sys, time
from ingest.keepa import KeepaClient, RetryPolicy, TransientError
def peak_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])
before = peak_kb()
client = KeepaClient("BENCHKEY-0123456789abcdef", sys.argv[1], retry=RetryPolicy(attempts=1))
t0 = time.monotonic()
try:
    client.token_status()
    outcome = "answered"
except TransientError as e:
    outcome = str(e)[:70]
print(before, peak_kb(), round(time.monotonic() - t0, 2), outcome)
"""


def rss_under_bodies() -> None:
    from tests.hostile_server import Endless, GzipBomb, gzip_bomb

    print("peak RSS of a fresh client process (default bounds: max_body_mb = 64, deadline_s = 30)")
    gzip_bomb(1024)  # built before the clock starts
    with HostileServer() as server:
        for name, behaviour in (("endless chunked body", Endless()), ("gzip bomb, 1 GiB decoded", GzipBomb(1024))):
            server.script("token", behaviour)
            out = subprocess.run([sys.executable, "-c", _RSS_CHILD, server.url], capture_output=True, text=True,
                                 timeout=120, cwd=ROOT).stdout.split(maxsplit=3)
            before, peak, seconds, outcome = int(out[0]), int(out[1]), out[2], out[3].strip()
            report(name, f"RSS {before / 1024:.0f} MB before, peak {peak / 1024:.0f} MB; {seconds} s; {outcome}")


def worker_stop_times(rounds: int) -> None:
    from ingest.simulator import SimConfig, Simulator

    print("SIGTERM to `ingest run backfill`: time until the process has exited (deadline_s = 30)")
    sim = Simulator(SimConfig(port=0, refill_rate=6000, seed=7, products=3000)).start()
    try:
        with HostileServer(upstream=sim.url) as proxy:
            for name, behaviour in (("during a drip-fed /product", Drip(interval_s=0.5)),
                                    ("during a silent /product (headers, then nothing)", Stall(seconds=120)),
                                    ("working normally (baseline)", None)):
                times = []
                for _ in range(rounds):
                    proxy.clear()
                    if behaviour is not None:
                        proxy.script("product", behaviour, times=None)
                    times.append(_one_stop(proxy, type(behaviour).__name__ if behaviour else None))
                report(name, f"median {statistics.median(times):.2f} s, max {max(times):.2f} s")
    finally:
        sim.stop()


def _one_stop(proxy, served: str | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, KEEPA_BASE_URL=proxy.url, KEEPA_API_KEY=KEY, INGEST_DB=f"{tmp}/ingest.db",
                   INGEST_CONFIG=f"{tmp}/ingest.toml")
        Path(f"{tmp}/ingest.toml").write_text("[leases]\nttl_s = 3.0\nrenew_s = 1.0\nretry_s = 0.25\n")
        proc = subprocess.Popen([INGEST, "run", "backfill"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            before = proxy.served("product", served or "forwarded")
            while proxy.served("product", served or "forwarded") <= before and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            return time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def parse_cost() -> None:
    print("parse_json (bounded numbers and depth) vs json.loads, on a synthetic 100-product body")
    product = {"asin": "B00EXAMPLE", "csv": [list(range(4000)) for _ in range(30)], "stats": {"avg": [1] * 30}}
    text = json.dumps({"products": [product] * 100, "tokensLeft": 5})
    for name, fn in (("json.loads (baseline)", json.loads), ("parse_json", parse_json)):
        t0 = time.perf_counter()
        fn(text)
        report(f"{name}, {len(text) / 2**20:.1f} MB", f"{time.perf_counter() - t0:.2f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-worker", action="store_true", help="leave out the worker stop times (slowest part)")
    args = p.parse_args()
    drip_abandon(args.rounds)
    rss_under_bodies()
    parse_cost()
    if not args.skip_worker:
        worker_stop_times(args.rounds)


if __name__ == "__main__":
    main()
