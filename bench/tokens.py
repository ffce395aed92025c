"""Two processes spending Keepa tokens as fast as the shared ledger allows, against the simulator.

    .venv/bin/python bench/tokens.py [--duration 180] [--rate 300] [--no-baseline]

`upsert` fetches deal pages (5 tokens each); `backfill` fetches product batches sized by the
ledger (product_batch_size, learned cost per ASIN). The simulator starts with one minute of
tokens and refills `--rate` per minute. Printed: 429s (target 0), the share of the tokens made
available (start + refilled) that was used (target >= 97%), and each process's share (policy:
backfill >= ~30% while both are busy).

Baseline, in the same run: the same two processes without the ledger, each retrying a 429 after
refillIn + 100 ms as Keepa's Java client does.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KEY = "bench-key-not-a-secret-0000"
GUARD_S = 2.0  # workers stop this long before the end, so a tick landing at the very end is not counted


def worker_main(mode: str, name: str, db: str, url: str, deadline: float, out: str, asins_file: str) -> None:
    from ingest.keepa import KeepaClient, RateLimited
    from ingest.metered import Stopped, open_keepa

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    threading.Timer(max(deadline - time.time(), 0), stop.set).start()
    asins = json.loads(Path(asins_file).read_text())
    consumed = calls = rate_limited = 0
    cursor = 0
    if mode == "ledger":
        keepa = open_keepa(db, {"keepa": {"api_key": KEY, "base_url": url}}, name, stop=stop)
    else:
        keepa = KeepaClient(KEY, url, stop=stop)
    page = 0
    while not stop.is_set():
        try:
            if name == "upsert":
                result = keepa.deals({"priceTypes": [0], "dateRange": 1}, page % 5)
                page += 1
            else:
                n = keepa.product_batch_size(100) if mode == "ledger" else 20
                batch = [asins[(cursor + i) % len(asins)] for i in range(n)]
                cursor += n
                result = keepa.products(batch, stats=365, history=True)
        except Stopped:
            break
        except RateLimited as e:  # only the baseline sees these: the ledger handles them inside
            rate_limited += 1
            stop.wait((e.envelope.refill_in_s or 1.0) + 0.1)
            continue
        calls += 1
        consumed += result.envelope.tokens_consumed or 0
    if mode == "ledger":
        from ingest.store import connect

        rate_limited = connect(db).execute(
            "SELECT count(*) FROM keepa_calls WHERE worker = ? AND status = 'rate_limited'", (name,)).fetchone()[0]
    Path(out).write_text(json.dumps({"consumed": consumed, "calls": calls, "rate_limited": rate_limited}))
    os._exit(0)  # the deadline timer thread may still be pending


def run(mode: str, duration: float, rate: int, folder: Path) -> dict:
    from ingest.simulator import SimConfig, Simulator

    sim = Simulator(SimConfig(port=0, seed=1, refill_rate=rate, start_tokens=rate, products=5000)).start()
    start_tokens = rate
    asins = [sim.app.catalogue.asin_of(i) for i in range(5000)]
    asins_file = folder / "asins.json"
    asins_file.write_text(json.dumps(asins))
    db = folder / f"{mode}.db"
    deadline = time.time() + duration - GUARD_S
    children = {}
    for name in ("upsert", "backfill"):
        out = folder / f"{mode}-{name}.json"
        args = [sys.executable, __file__, "--worker", mode, name, str(db), sim.url, str(deadline), str(out), str(asins_file)]
        children[name] = (subprocess.Popen(args), out)
    try:
        for name, (child, _) in children.items():
            if child.wait(timeout=duration + 120) != 0:
                raise SystemExit(f"{mode} {name} failed")
        stats = sim.stats()
    finally:
        for child, _ in children.values():
            if child.poll() is None:
                child.kill()
        sim.stop()
    results = {name: json.loads(out.read_text()) for name, (_, out) in children.items()}
    available = start_tokens + stats["tokens"]["refilled"]
    used = stats["tokens"]["consumed"]
    return {
        "mode": mode, "served_429": stats["served_429"], "available": available, "used": used,
        "used_share": used / available if available else 0.0, "left": stats["tokens"]["tokensLeft"],
        "workers": {n: {**r, "share": r["consumed"] / used if used else 0.0} for n, r in results.items()},
    }


def report(r: dict) -> None:
    w = r["workers"]
    print(f"{r['mode']:<9} 429s {r['served_429']:>4}   used {r['used']:>6} of {r['available']:>6} available "
          f"({100 * r['used_share']:5.1f}%), {r['left']} left   upsert {100 * w['upsert']['share']:5.1f}% "
          f"({w['upsert']['calls']} calls)   backfill {100 * w['backfill']['share']:5.1f}% ({w['backfill']['calls']} calls)",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds per run (default 180)")
    parser.add_argument("--rate", type=int, default=300, help="simulator refill per minute (default 300)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the uncoordinated baseline run")
    args = parser.parse_args()
    print(f"two processes, {args.duration:.0f} s each run, refill {args.rate}/min, start balance {args.rate}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-tokens-") as tmp:
        folder = Path(tmp)
        report(run("ledger", args.duration, args.rate, folder))
        if not args.no_baseline:
            report(run("baseline", args.duration, args.rate, folder))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, name, db, url, deadline, out, asins_file = sys.argv[2:9]
        worker_main(mode, name, db, url, float(deadline), out, asins_file)
    else:
        main()
