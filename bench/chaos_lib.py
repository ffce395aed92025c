"""The chaos run's driver: the whole system under a real supervisord, the simulator with faults
on, and a seeded schedule of kill -9, SIGSTOP past the TTL, a forced lease release and
supervisord restarts; then a settle phase. bench/chaos_checks.py judges what it leaves behind.
See docs/chaos.md for what is injected and how each invariant is defined.

    run = ChaosRun(ChaosSettings(duration_s=90))
    try:
        result = run.execute()          # RunResult: timeline, samples, sim stats, db path
    finally:
        run.close()                     # stops supervisord, the workers and the simulator, even
                                        # when execute() was interrupted half-way
"""

import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from bench.chaos_observe import LeaseSampler, holds_write_lock
from bench.chaos_sim import SimProcess, wait_for
from ingest.backends import Store
from tests.hostile_server import KeyTrap
from tests.supervised import SupervisedProject

LEASES = ("backfill", "upsert")


@dataclass
class ChaosSettings:
    duration_s: float = 600.0
    seed: int = 1
    ttl_s: float = 6.0
    renew_s: float = 2.0
    retry_s: float = 0.5
    products: int = 6000
    refill_rate: int = 1200          # tokens/min at start; cap = 60 x rate
    start_tokens: int = 1500         # low: the workers wait for refills, as against Keepa
    rate_after: int = 900            # the refill-rate change, at ~60% of the run
    fault_500: float = 0.08
    fault_timeout: float = 0.04
    fault_malformed: float = 0.04
    fault_no_history: float = 0.05
    fault_drip: float = 0.01         # the body trickles out over drip_s, past the client's deadline_s
    fault_redirect: float = 0.01     # a 302 to another host: never followed, the key stays home
    drip_s: float = 6.0              # ... and the client abandons it after deadline_s
    deadline_s: float = 3.0
    sim_timeout_s: float = 4.0       # a timed-out answer is held this long ...
    read_timeout_s: float = 2.0      # ... and the client gives up after this
    window_429_s: float = 20.0
    action_gap_s: tuple[float, float] = (8.0, 20.0)
    settle_timeout_s: float = 300.0
    standby: bool = True             # a second copy of each worker, waiting for the lease
    sample_s: float = 0.25
    db: str | None = None            # a postgresql:// URL (given as INGEST_DB in ingest.env); None: var/ingest.db

    @property
    def stall_bound_s(self) -> float:
        return self.ttl_s + self.renew_s

    def toml(self) -> str:
        return (f"[leases]\nttl_s = {self.ttl_s}\nrenew_s = {self.renew_s}\nretry_s = {self.retry_s}\n"
                f"[keepa]\nread_timeout_s = {self.read_timeout_s}\nconnect_timeout_s = 2.0\n"
                f"deadline_s = {self.deadline_s}\n"
                "[backfill]\npass_pause_s = 2.0\n[metrics]\nlisten = \"127.0.0.1:0\"\n")


@dataclass
class Event:
    at: float                 # wall clock (lease_events and fenced_commits use it too)
    kind: str                 # kill9 | sigstop | sigcont | force_release | supervisord_restart | ...
    lease: str | None = None
    pid: int | None = None
    fence: int | None = None  # the lease's fence when the holder was disrupted
    detail: str = ""
    ref_at: float | None = None   # when the next holder could start: stall gaps count from here


@dataclass
class Window:
    kind: str                 # forced_429 | supervisord_down | write_locked_stop
    start: float
    end: float


@dataclass
class RunResult:
    settings: ChaosSettings
    store: Store                     # the database the run left behind (SQLite file or PostgreSQL)
    log_dir: Path
    events: list[Event]
    windows: list[Window]
    unowned: dict[str, list[tuple[float, float]]]   # per lease: sampled intervals without a live holder
    min_balance: float | None
    sim_stats: dict
    start_tokens: int
    settle_at: float
    settled_at: float | None
    settle_state: dict
    status_json: dict | None
    programs_at_end: dict            # program -> supervisord state just before the final stop
    max_balance: float | None = None
    cap: float | None = None
    redirect_target_hits: int = 0    # requests that reached the redirect fault's target (the key left home)


class ChaosRun:
    def __init__(self, settings: ChaosSettings, log=print):
        self.s = settings
        self.log = log
        self.rng = random.Random(settings.seed)
        self.events: list[Event] = []
        self.windows: list[Window] = []
        self.sim: SimProcess | None = None
        self.project: SupervisedProject | None = None
        self.sampler: LeaseSampler | None = None
        self.t0 = 0.0
        self._log_file = None
        self._paused: int | None = None   # a worker we SIGSTOPped and have not SIGCONTed yet
        self.trap: KeyTrap | None = None  # where the redirect fault points: another loopback host

    # ------------------------------------------------------------ setup and teardown

    def setup(self) -> None:
        s = self.s
        self.project = SupervisedProject("http://127.0.0.1:1", toml=s.toml(), db=s.db)  # Keepa URL set below
        root = self.project.root
        (root / "var" / "log").mkdir(parents=True, exist_ok=True)
        self.trap = KeyTrap().__enter__()
        self.sim = SimProcess(root / ".venv" / "bin" / "ingest", refill_rate=s.refill_rate,
                              start_tokens=s.start_tokens, products=s.products, seed=s.seed,
                              timeout_s=s.sim_timeout_s, log_path=root / "var" / "log" / "sim.log",
                              drip_s=s.drip_s, redirect_to=self.trap.url)
        self.project.env["KEEPA_BASE_URL"] = self.sim.url
        if os.environ.get("CHAOS_PYTHONPATH"):  # try a fix to ingest/ before it lands (docs/chaos.md)
            self.project.env["PYTHONPATH"] = os.environ["CHAOS_PYTHONPATH"]
        if s.standby:
            self._add_standby_programs()
        self.sampler = LeaseSampler(self.project.store, s.sample_s, self.sim)

    def _add_standby_programs(self) -> None:
        """A second copy of each worker, from the shipped program file with the names changed:
        the lease decides which copy works; the other waits and takes over."""
        programs = self.project.root / "supervisor.d" / "programs"
        for name in LEASES:
            text = (programs / f"{name}.conf").read_text()
            text = text.replace(f"[program:{name}]", f"[program:{name}-standby]")
            text = text.replace(f"var/log/{name}.log", f"var/log/{name}-standby.log")
            (programs / f"{name}-standby.conf").write_text(text)

    def programs(self) -> list[str]:
        return [f"{n}{suffix}" for n in LEASES for suffix in (("", "-standby") if self.s.standby else ("",))]

    def close(self, keep_to: Path | None = None) -> None:
        """Stop everything the run started, whatever state execute() was left in: a paused worker
        is continued (a stopped process ignores SIGTERM), supervisord is shut down (its workers
        with it), the simulator stopped, and then any process still running from the project's
        copy (found by command line or working directory) is killed with its process group."""
        if self._paused is not None:
            _signal(self._paused, signal.SIGCONT)
            self._paused = None
        if self.sampler is not None and self.sampler.is_alive():
            self.sampler.stop_event.set()
            self.sampler.join(5)
        root = self.project.root if self.project is not None else None
        try:
            if self.project is not None:
                try:
                    if keep_to is not None:
                        self.project.script("stop", check=False, timeout=180)
                        shutil.copytree(self.project.root / "var", keep_to, dirs_exist_ok=True)
                finally:
                    self.project.close()
        finally:
            try:
                if self.trap is not None:
                    self.trap.__exit__(None, None, None)
                if self.sim is not None:
                    self.sim.stop()
            finally:
                if root is not None:
                    kill_processes_of(root)

    # ------------------------------------------------------------ the run

    def execute(self) -> RunResult:
        s = self.s
        self.setup()
        self.t0 = time.time()
        self._start_supervisord()
        self.sampler.start()
        wait_for(lambda: all(self._lease(n) and self._lease(n)["holder_pid"] for n in LEASES), 30)
        self.sim.set_faults(fault_500=s.fault_500, fault_timeout=s.fault_timeout,
                            fault_malformed=s.fault_malformed, fault_no_history=s.fault_no_history,
                            fault_drip=s.fault_drip, fault_redirect=s.fault_redirect)
        self.note(Event(time.time(), "faults_on", detail=f"500 {s.fault_500}, timeout {s.fault_timeout}, "
                        f"malformed {s.fault_malformed}, no_history {s.fault_no_history}, "
                        f"drip {s.fault_drip}, redirect {s.fault_redirect}"))
        self._chaos_loop()
        settle_at = time.time()
        self.sim.set_faults(fault_500=0, fault_timeout=0, fault_malformed=0, fault_no_history=0, fault_drip=0,
                            fault_redirect=0, force_429=None)
        self.note(Event(settle_at, "faults_off"))
        settled_at, state = self._settle(settle_at)
        status = self._status_json()
        programs = {name: st.get("state") for name, st in (self.project.states() or {}).items()}
        self.windows.append(Window("supervisord_down", time.time(), float("inf")))
        self.project.script("stop", timeout=240)   # graceful: the checks read a quiet database
        self.note(Event(time.time(), "stopped"))
        self.sampler.stop_event.set()
        self.sampler.join(5)
        stats = self.sim.stats()
        return RunResult(s, self.project.store, self.project.root / "var" / "log", self.events, self.windows,
                         self.sampler.unowned, self.sampler.min_balance, stats, s.start_tokens, settle_at,
                         settled_at, state, status, programs, self.sampler.max_balance, self.sampler.cap,
                         len(self.trap.queries))

    def note(self, event: Event) -> None:
        self.events.append(event)
        where = f" {event.lease}" if event.lease else ""
        pid = f" pid {event.pid}" if event.pid else ""
        self.log(f"[{event.at - self.t0:7.1f}s] {event.kind}{where}{pid} {event.detail}".rstrip())

    def _plan(self) -> list[tuple[float, str]]:
        """Fixed moments for the actions each run must contain; kills fill the gaps."""
        d = self.s.duration_s
        plan = [(0.12 * d, "sigstop"), (0.30 * d, "force_release"), (0.45 * d, "supervisord_restart"),
                (0.55 * d, "window_429"), (0.62 * d, "rate_change"), (0.75 * d, "sigstop")]
        if d >= 300:
            plan += [(0.85 * d, "supervisord_restart"), (0.92 * d, "force_release")]
        return sorted(plan)

    def _chaos_loop(self) -> None:
        plan = self._plan()
        end = self.t0 + self.s.duration_s
        next_kill = time.time() + self.rng.uniform(*self.s.action_gap_s)
        while time.time() < end:
            now = time.time()
            if plan and now >= self.t0 + plan[0][0]:
                getattr(self, f"do_{plan.pop(0)[1]}")()
            elif now >= next_kill:
                self.do_kill9()
                next_kill = time.time() + self.rng.uniform(*self.s.action_gap_s)
            time.sleep(0.1)
        if any(self.t0 + at < end + 1 for at, _ in plan):
            for _, action in plan:  # a slow machine: still inject every planned fault once
                getattr(self, f"do_{action}")()

    # ------------------------------------------------------------ actions

    def _lease(self, name: str) -> dict | None:
        try:
            return self.project.lease(name) if self.project.db_exists() else None
        except self.project.db_errors:
            return None

    def do_kill9(self) -> None:
        states = self.project.states() or {}
        holders = {self._lease(n)["holder_pid"]: n for n in LEASES if self._lease(n)}
        running = [(p, st["pid"]) for p, st in states.items() if st.get("state") == "RUNNING" and st.get("pid")]
        if not running:
            return
        held = [(p, pid) for p, pid in running if pid in holders]
        program, pid = self.rng.choice(held if held and self.rng.random() < 0.7 else running)
        lease = holders.get(pid)
        fence = self._lease(lease)["fence"] if lease else None
        at = time.time()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.note(Event(at, "kill9", lease, pid, fence, f"({program}{', holder' if lease else ''})", ref_at=at))

    def do_sigstop(self) -> None:
        name = self.rng.choice(LEASES)
        row = self._lease(name)
        if not row or not row["holder_pid"]:
            return
        pid, fence = row["holder_pid"], row["fence"]
        pause = self.s.ttl_s + self.rng.uniform(1.5, 3.0)
        at = time.time()
        self._paused = pid
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.05)
        locked = holds_write_lock(self.project.store, pid)
        self.note(Event(at, "sigstop", name, pid, fence, f"for {pause:.1f}s" + (" holding the write lock" if locked else ""),
                        ref_at=at))
        time.sleep(pause)
        cont = time.time()
        if not _signal(pid, signal.SIGCONT):  # the watchdog (docs/watch.md) killed it first
            self.events[-1].detail += ", killed by the watchdog"
        self._paused = None
        if locked:
            self.windows.append(Window("write_locked_stop", at, cont))
            self.events[-1].ref_at = cont
        self.note(Event(cont, "sigcont", name, pid))

    def do_force_release(self) -> None:
        name = self.rng.choice(LEASES)
        row = self._lease(name)
        at = time.time()
        done = self.project.ingest("leases", "release", name, "--force", timeout=30)
        self.note(Event(at, "force_release", name, row["holder_pid"] if row else None, row["fence"] if row else None,
                        f"exit {done.returncode}: {done.stdout.strip() or done.stderr.strip()}", ref_at=time.time()))

    def do_supervisord_restart(self) -> None:
        fences = {n: (self._lease(n) or {}).get("fence") for n in LEASES}
        down = time.time()
        self.project.script("stop", timeout=240)
        up = time.time()
        self.windows.append(Window("supervisord_down", down, up))
        self._start_supervisord()
        for name in LEASES:
            self.note(Event(down, "supervisord_restart", name, None, fences[name],
                            f"down {up - down:.1f}s", ref_at=up))

    def _start_supervisord(self) -> None:
        done = self.project.script("start", check=False, timeout=90)
        if done.returncode != 0:
            self.log(f"scripts/start exited {done.returncode}: {done.stdout.strip()} {done.stderr.strip()}")
        # tests/test_chaos.py reads this line to know what to look for after an interruption
        self.log(f"[{time.time() - self.t0:7.1f}s] supervisord up: pid {self.project.supervisord_pid} in {self.project.root}")

    def do_window_429(self) -> None:
        duration = min(self.s.window_429_s, max(5.0, 0.1 * self.s.duration_s))
        before = time.time()
        self.sim.set_faults(force_429=[0, duration])
        after = time.time()
        self.windows.append(Window("forced_429", before, after + duration))
        self.note(Event(before, "window_429", detail=f"{duration:.0f}s"))

    def do_rate_change(self) -> None:
        self.sim.set_tokens(refill_rate=self.s.rate_after)
        self.note(Event(time.time(), "rate_change", detail=f"{self.s.refill_rate} -> {self.s.rate_after}/min"))

    # ------------------------------------------------------------ settling

    def _settle(self, since: float) -> tuple[float | None, dict]:
        """Wait until backfill completed a pass that began after `since`, upsert polled after it
        with nothing pending, and both leases are held. Returns (when, last state seen)."""
        state: dict = {}

        def settled():
            try:
                conn = self.project.db()
                cps = {r[0]: json.loads(r[1]) for r in conn.execute("SELECT name, value FROM checkpoints")}
                polled = conn.execute("SELECT max(at) FROM fenced_commits WHERE lease = 'upsert' AND what = 'upsert poll'"
                                      ).fetchone()[0]
            except self.project.db_errors:
                return None
            backfill, upsert = cps.get("backfill") or {}, cps.get("upsert") or {}
            state.update(backfill_complete_pass_started=backfill.get("last_complete_pass_started_at"),
                         backfill_pass=backfill.get("pass"), backfill_page=backfill.get("page"),
                         upsert_pending=len(upsert.get("pending") or []), upsert_last_poll=polled)
            done = ((backfill.get("last_complete_pass_started_at") or 0) >= since and polled and polled >= since
                    and not upsert.get("pending") and all((self._lease(n) or {}).get("holder_pid") for n in LEASES))
            return time.time() if done else None

        settled_at = wait_for(settled, self.s.settle_timeout_s, 1.0)
        self.note(Event(time.time(), "settled" if settled_at else "settle_timeout", detail=json.dumps(state)))
        return settled_at, state

    def _status_json(self) -> dict | None:
        done = self.project.ingest("status", "--json", timeout=60)
        try:
            return json.loads(done.stdout)
        except ValueError:
            return None


# ---------------------------------------------------------------- cleanup

def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def processes_of(root: Path) -> list[int]:
    """Pids of the processes running from the project copy at `root` (other than this one): its
    path on their command line (workers, simulator) or as their working directory (supervisord,
    scripts). Reads /proc."""
    prefix = str(root)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd").removesuffix(" (deleted)")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if prefix + "/" in cmdline or cwd == prefix or cwd.startswith(prefix + "/"):
            found.append(int(entry.name))
    return found


def kill_processes_of(root: Path, grace_s: float = 5.0) -> list[int]:
    """SIGTERM, then after `grace_s` SIGKILL, every process of the project copy at `root` and
    its process group (supervisord's programs each lead their own group); returns the pids found."""
    pids = processes_of(root)
    if not pids:
        return []
    own_group = os.getpgrp()

    def send(sig: int) -> None:
        for pid in processes_of(root):
            _signal(pid, signal.SIGCONT)
            try:
                group = os.getpgid(pid)
            except ProcessLookupError:
                continue
            if group != own_group:
                try:
                    os.killpg(group, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            _signal(pid, sig)

    send(signal.SIGTERM)
    if wait_for(lambda: not processes_of(root), grace_s, 0.1) is None:
        send(signal.SIGKILL)
        wait_for(lambda: not processes_of(root), 5.0, 0.1)
    return pids
