"""The watchdog's chaos run: the stalls that leases alone cannot fix, injected one after another
under a real supervisord (the shipped supervisor.d/ with the watch listener, no standby copies)
against the simulator, with a webhook receiver on loopback; then a table of what was injected
and whether each invariant held (docs/chaos.md, "The watchdog's run").

    .venv/bin/python bench/chaos_watch.py [--stops 2] [--window-402 20] [--confirm 8]

Injected, in order:
- a stopped holder with no standby (SIGSTOP of each worker's lease holder; nothing else can take
  an alive holder's lease until the watchdog kills it);
- a process SIGSTOPped while it holds the write lock (sampled in /proc/locks, then SIGSTOP; every
  other writer waits for it);
- a 402 window (the simulator answers every call, /token too, with 402).
Invariants:
- a stopped holder was replaced within TTL + one tick (5 s);
- every injected down state produced exactly one alert and one recovered message (and the
  short disruptions, fixed within confirm_s, none);
- both workers stayed RUNNING (the same pids) through the 402 window;
- only supervisord's children were signalled (every action's pid was a child when it acted).
Exit 0 when every invariant held, 1 otherwise.
"""

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.chaos_checks import Row, format_table, verdict  # noqa: E402
from ingest.simulator import SimConfig, Simulator  # noqa: E402
from ingest.watch import TICK_S, announced_within, shm_lock_holder  # noqa: E402
from tests.supervised import SupervisedProject  # noqa: E402
from tests.webhook_sink import WebhookSink  # noqa: E402

WORKERS = ("backfill", "upsert")


@dataclass
class WatchChaosSettings:
    ttl_s: float = 6.0
    renew_s: float = 2.0
    retry_s: float = 0.5
    confirm_s: float = 8.0
    stops: int = 2                 # stopped holders with no standby (alternating workers)
    window_402_s: float = 20.0
    payment_retry_s: float = 1.0
    lock_sample_s: float = 30.0    # how long to sample /proc/locks for a holder to stop

    def toml(self, webhook: str) -> str:
        return (f"[leases]\nttl_s = {self.ttl_s}\nrenew_s = {self.renew_s}\nretry_s = {self.retry_s}\n\n"
                "[backfill]\npass_pause_s = 1\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n"
                f"[worker]\npayment_retry_s = {self.payment_retry_s}\n\n"
                f"[alerts]\nconfirm_s = {self.confirm_s}\nwebhooks = [\"{webhook}\"]\nbackoff_s = 0.2\n")

    @property
    def replace_bound_s(self) -> float:
        return self.ttl_s + TICK_S


@dataclass
class Stop:
    kind: str          # 'no standby' | 'holding the write lock'
    lease: str
    pid: int
    at: float
    replaced_s: float | None = None


@dataclass
class WatchChaosResult:
    stops: list[Stop] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)
    pids_through_402: list[bool] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    actions: list[dict] = field(default_factory=list)
    children_seen: set = field(default_factory=set)
    verdict_at_end: str | None = None


class WatchChaos:
    def __init__(self, settings: WatchChaosSettings, log=print):
        self.s = settings
        self.log = log
        self.sim = Simulator(SimConfig(port=0, refill_rate=6000, products=60_000, seed=5)).start()
        self.sink = WebhookSink().__enter__()
        self.project = SupervisedProject(self.sim.url, toml=settings.toml(self.sink.url))
        self.result = WatchChaosResult()
        self._stopped: int | None = None

    # ------------------------------------------------------------ helpers

    def verdict(self) -> str | None:
        import json

        done = self.project.script("status", "--json", check=False)
        try:
            return json.loads(done.stdout)["verdict"]
        except (ValueError, KeyError):
            return None

    def settle(self) -> None:
        """Healthy, and seen healthy by the watchdog for confirm_s and a tick."""
        self.project.wait(lambda: self.verdict() == "healthy", 120, "ingest status to say healthy", interval=0.5)
        time.sleep(announced_within(self.s.confirm_s))

    def holders(self) -> dict[str, int]:
        states = self.project.wait_running(*WORKERS, "watch", timeout=60)
        self.result.children_seen |= {p["pid"] for p in states.values() if p.get("pid")}
        for worker in WORKERS:
            self.project.wait_held_by(worker, states[worker]["pid"], timeout=60)
        return {w: states[w]["pid"] for w in WORKERS}

    def wait_replaced(self, stop: Stop) -> None:
        bound = self.s.replace_bound_s + 30
        try:
            self.project.wait(lambda: (r := self.project.lease(stop.lease)) and r["holder_pid"] not in (None, stop.pid),
                              bound, f"a new {stop.lease} holder", 0.05)
            stop.replaced_s = time.time() - stop.at
        except AssertionError:
            stop.replaced_s = None
        finally:
            try:
                os.kill(stop.pid, signal.SIGCONT)  # not killed (a violation): do not leave it stopped
            except ProcessLookupError:
                pass
            self._stopped = None
        self.result.stops.append(stop)
        self.log(f"  {stop.kind}: {stop.lease} pid {stop.pid} replaced in "
                 f"{'never' if stop.replaced_s is None else f'{stop.replaced_s:.2f}s'}")

    # ------------------------------------------------------------ the faults

    def stopped_holder(self, lease: str) -> None:
        pid = self.holders()[lease]
        stop = Stop("no standby", lease, pid, time.time())
        self._stopped = pid
        os.kill(pid, signal.SIGSTOP)
        self.wait_replaced(stop)

    def stopped_lock_holder(self) -> None:
        pids = self.holders()
        ours = set(pids.values())
        deadline = time.monotonic() + self.s.lock_sample_s
        while time.monotonic() < deadline:
            pid = shm_lock_holder(self.project.db_path)
            if pid in ours:
                os.kill(pid, signal.SIGSTOP)
                self._stopped = pid
                if shm_lock_holder(self.project.db_path) == pid:   # still held once stopped
                    lease = next(w for w, p in pids.items() if p == pid)
                    self.wait_replaced(Stop("holding the write lock", lease, pid, time.time()))
                    return
                os.kill(pid, signal.SIGCONT)   # it let go in between: sample again
                self._stopped = None
            time.sleep(0.001)
        self.log("  no worker seen holding the write lock: not injected")

    def window_402(self) -> None:
        pids = self.holders()
        start = time.time()
        self.sim.app.faults.update({"force_402": [0, self.s.window_402_s]})
        while time.time() < start + self.s.window_402_s:
            time.sleep(0.5)
            states = self.project.states() or {}
            self.result.pids_through_402.append(all(
                (states.get(w) or {}).get("pid") == pids[w] and states[w]["state"] == "RUNNING" for w in WORKERS))
        self.result.windows.append((start, time.time()))
        self.log(f"  402 window {self.s.window_402_s:g}s")

    # ------------------------------------------------------------ the run

    def execute(self) -> WatchChaosResult:
        self.project.script("start", timeout=60)
        self.holders()
        self.settle()
        began = time.time()
        for i in range(self.s.stops):
            self.stopped_holder(WORKERS[i % 2])
            self.settle()
        self.stopped_lock_holder()
        self.settle()
        self.window_402()
        self.settle()
        end = self.result.windows[-1][1]
        try:  # the invariant judges when it came; here, only do not stop listening too early
            self.project.wait(lambda: any(m["kind"] == "recovered" and m["_received"] >= end for m in self.sink.messages),
                              30, "a recovered message")
        except AssertionError:
            pass
        self.result.messages = [m for m in self.sink.messages if m["_received"] >= began]
        self.result.actions = [dict(r) for r in self.project.query("SELECT * FROM watch_actions ORDER BY id")]
        self.result.verdict_at_end = self.verdict()
        return self.result

    def close(self) -> None:
        if self._stopped is not None:
            try:
                os.kill(self._stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.project.close()
        self.sink.__exit__(None, None, None)
        self.sim.stop()


# ---------------------------------------------------------------- the verdicts


def rows(result: WatchChaosResult, s: WatchChaosSettings) -> list[Row]:
    stops = result.stops
    plain = [x for x in stops if x.kind == "no standby"]
    locked = [x for x in stops if x.kind == "holding the write lock"]
    late = [(x.kind, x.lease, x.replaced_s) for x in stops if x.replaced_s is None or x.replaced_s > s.replace_bound_s]
    announced = [m for m in result.messages if m["kind"] in ("alert", "recovered", "repeat")]
    expected, unexplained = [], list(announced)
    for start, end in result.windows:
        slack = announced_within(s.confirm_s) + 5
        alerts = [m for m in announced if m["kind"] == "alert" and m["verdict"] == "down"
                  and start <= m["_received"] <= end + slack]
        back = [m for m in announced if m["kind"] == "recovered" and end <= m["_received"] <= end + slack + 30]
        expected.append((len(alerts), len(back)))
        for m in alerts[:1] + back[:1]:
            unexplained.remove(m)
    signalled = [a for a in result.actions if a["action"] != "alert_foreign_lock"]
    foreign = [a for a in signalled if a["pid"] not in result.children_seen]
    kills = sorted({a["action"] for a in result.actions})
    return [
        Row("stopped holder, no standby", str(len(plain)), "injected"),
        Row("SIGSTOP while holding the write lock", str(len(locked)), "injected"),
        Row("402 window", f"{sum(e - b for b, e in result.windows):.0f}s", "injected"),
        Row("watchdog actions", ", ".join(f"{k}: {sum(a['action'] == k for a in result.actions)}" for k in kills)
            or "none", "info"),
        Row(f"a stopped holder was replaced within TTL + one tick ({s.replace_bound_s:g}s)",
            "max " + (f"{max(x.replaced_s for x in stops if x.replaced_s is not None):.2f}s"
                      if any(x.replaced_s is not None for x in stops) else "-") + f" over {len(stops)}",
            verdict(bool(stops) and not late), str(late) if late else ""),
        Row("every injected down state: exactly one alert and one recovered message",
            ", ".join(f"{a} alert / {b} recovered" for a, b in expected) or "no window",
            verdict(bool(expected) and all(e == (1, 1) for e in expected) and not unexplained),
            f"other messages: {[(m['kind'], m['verdict']) for m in unexplained]}" if unexplained else ""),
        Row("both workers RUNNING, same pids, through the 402 window",
            f"{sum(result.pids_through_402)}/{len(result.pids_through_402)} samples",
            verdict(bool(result.pids_through_402) and all(result.pids_through_402))),
        Row("only supervisord's children signalled", f"{len(signalled) - len(foreign)}/{len(signalled)}",
            verdict(not foreign), str(foreign[:3]) if foreign else ""),
        Row("`ingest status` at the end", str(result.verdict_at_end), verdict(result.verdict_at_end == "healthy")),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stops", type=int, default=2)
    parser.add_argument("--window-402", type=float, default=20.0)
    parser.add_argument("--confirm", type=float, default=8.0)
    args = parser.parse_args(argv)
    settings = WatchChaosSettings(stops=args.stops, window_402_s=args.window_402, confirm_s=args.confirm)
    run = WatchChaos(settings)
    try:
        result = run.execute()
    finally:
        run.close()
    table = rows(result, settings)
    print(format_table(table))
    return 1 if any(r.failed for r in table) else 0


if __name__ == "__main__":
    sys.exit(main())
