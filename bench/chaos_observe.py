"""What the chaos run watches while it runs: lease ownership sampled from the database (SQLite or
PostgreSQL), the simulator's balance, and whether a paused process holds SQLite's write lock
(/proc/locks; PostgreSQL has no such lock: a row lock is the server's, ended with the session)."""

import threading
import time

from bench.chaos_sim import SimProcess
from ingest.backends import Store
from ingest.errors import StoreError
from ingest.watch import lock_file_holder

LEASES = ("backfill", "upsert")


class LeaseSampler(threading.Thread):
    """Every sample_s: is each lease held by a holder whose heartbeat is younger than the TTL?
    Intervals where it is not are kept (judged later against the excused windows)."""

    def __init__(self, store: Store, sample_s: float, sim: SimProcess):
        super().__init__(daemon=True, name="lease-sampler")
        self.store, self.sample_s, self.sim = store, sample_s, sim
        self.stop_event = threading.Event()
        self.unowned: dict[str, list[tuple[float, float]]] = {name: [] for name in LEASES}
        self._open: dict[str, float] = {}
        self.min_balance: float | None = None
        self.max_balance: float | None = None
        self.cap: float | None = None

    def run(self):
        conn = None
        last_balance = 0.0
        while not self.stop_event.wait(self.sample_s):
            try:
                if conn is None:
                    if not self.store.backend.exists(self.store.target):
                        continue
                    conn = self.store.connect(busy_timeout_ms=1000)
                rows = {r[0]: r for r in conn.execute("SELECT name, holder_nonce, renewed_mono, ttl_s FROM leases")}
            except self.store.backend.errors + (StoreError,):
                if conn is not None and getattr(conn, "lost", False):
                    conn.close()
                    conn = None
                continue  # locked, not migrated yet or the server away: try again at the next sample
            now_mono, now = time.monotonic(), time.time()
            for name in LEASES:
                row = rows.get(name)
                served = row is not None and row[1] is not None and now_mono - row[2] <= row[3]
                if served and name in self._open:
                    self.unowned[name].append((self._open.pop(name), now))
                elif not served and name not in self._open:
                    self._open[name] = now
            if now_mono - last_balance >= 1.0:
                last_balance = now_mono
                try:
                    tokens = self.sim.tokens()
                    left, self.cap = tokens["tokensLeft"], tokens["cap"]
                    self.min_balance = left if self.min_balance is None else min(self.min_balance, left)
                    self.max_balance = left if self.max_balance is None else max(self.max_balance, left)
                except OSError:
                    pass
        now = time.time()
        for name, since in self._open.items():
            self.unowned[name].append((since, now))
        if conn is not None:
            conn.close()


def holds_write_lock(store: Store, pid: int) -> bool:
    """Does `pid` hold SQLite's WAL write lock (byte 120 of the -shm file, /proc/locks)? The
    watchdog's own reading of /proc/locks (ingest.watch.lock_file_holder). Never on PostgreSQL."""
    lock_file = store.backend.write_lock_file(store.target)
    return lock_file is not None and lock_file_holder(lock_file) == pid
