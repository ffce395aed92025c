"""A second "host" on this machine, for the two-host tests (tests/test_two_hosts.py).

    Host(argv, hostname="host-b")               # its own UTS, pid and mount namespaces
    Host(argv, hostname="host-b", netns=link.netns)  # ... and the network namespace of a Link
    link = Link.create()                        # a network namespace, reaching us over a veth pair
    link.cut() / link.heal() / link.destroy()
    TcpPgServer.on(link.outer_ip, link.network) # a PostgreSQL server also listening on the veth

A Host runs `unshare --uts --pid --fork --mount-proc --kill-child` (inside `ip netns exec NETNS`
when given a netns): the command is pid 1 of a new pid namespace under its own hostname, so a
lease it takes names another host, another pid namespace, and a pid that means nothing here;
the leases see it as remote (ingest/procinfo.py: Identity.is_local), as they would a real
second machine sharing the PostgreSQL server. Only the boot id and CLOCK_MONOTONIC stay shared,
so the tests can compare the processes' monotonic readings with their own.

A Link is a network namespace and a veth pair: the outer end in ours with OUTER_IP, the inner end
in the namespace with INNER_IP (a /24 of 10.231.0.0/16 picked from our pid). `cut()` sets the
inner end down: the host in the namespace can no longer reach the server (its packets are
dropped, its TCP connections stall, as on a real partition) while everything on our side goes
on. `heal()` sets it up again.

Everything is removed by `destroy()`/`stop()`, called by the tests' finalizers and at exit.
"""

import atexit
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .pg_server import PORT, SUPERUSER, PgServer

UNSHARE = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "--kill-child"]
COMMAND_TIMEOUT_S = 10


def mono() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=COMMAND_TIMEOUT_S)


def _probe(what: str, *argv: str) -> str | None:
    """None when `argv` works here, else why not (one line)."""
    try:
        result = _run(*argv)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{what}: {e}"
    if result.returncode != 0:
        output = result.stdout.strip().splitlines()
        return f"{what} failed here ({' '.join(argv)}): {output[-1] if output else f'exit {result.returncode}'}"
    return None


def why_no_namespaces() -> str | None:
    """Why a Host cannot be made here (the skip reason), or None."""
    if os.geteuid() != 0:
        return "needs root to make UTS, pid and mount namespaces (unshare)"
    if shutil.which("unshare") is None:
        return "no unshare(1) (util-linux) to make namespaces"
    return _probe("unshare --uts --pid --fork --mount-proc", *UNSHARE, "hostname", "ingest-probe")


def why_no_network_namespaces() -> str | None:
    """Why a Link cannot be made here (the skip reason), or None."""
    reason = why_no_namespaces()
    if reason:
        return reason
    if shutil.which("ip") is None:
        return "no ip(8) (iproute2) to make network namespaces and veth pairs"
    name = f"ingest-probe-{os.getpid()}"
    reason = _probe("ip netns add", "ip", "netns", "add", name)
    if reason:
        return reason
    try:
        return _probe("a veth pair", "ip", "link", "add", f"ipr{os.getpid() % 100000}a", "type", "veth",
                      "peer", "name", f"ipr{os.getpid() % 100000}b", "netns", name)
    finally:
        _run("ip", "netns", "del", name)  # takes the veth pair with it


@dataclass
class Link:
    netns: str
    outer: str       # interface in our namespace
    inner: str       # interface in netns
    subnet: int      # 10.231.SUBNET.0/24

    @property
    def outer_ip(self) -> str:
        return f"10.231.{self.subnet}.1"

    @property
    def inner_ip(self) -> str:
        return f"10.231.{self.subnet}.2"

    @property
    def network(self) -> str:
        return f"10.231.{self.subnet}.0/24"

    @classmethod
    def create(cls) -> "Link":
        tag = f"{os.getpid() % 100000}"
        link = cls(f"ingest-host-b-{tag}", f"ih{tag}a", f"ih{tag}b", os.getpid() % 250 + 1)
        link.destroy()  # a leftover of a killed run of ours under the same pid
        atexit.register(link.destroy)
        try:
            for argv in link._setup():
                result = _run(*argv)
                if result.returncode != 0:
                    raise RuntimeError(f"{' '.join(argv)}: {result.stdout.strip()}")
        except BaseException:
            link.destroy()
            raise
        return link

    def _setup(self) -> list[list[str]]:
        inside = ["ip", "netns", "exec", self.netns]
        return [
            ["ip", "netns", "add", self.netns],
            ["ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner, "netns", self.netns],
            ["ip", "addr", "add", f"{self.outer_ip}/24", "dev", self.outer],
            ["ip", "link", "set", self.outer, "up"],
            [*inside, "ip", "link", "set", "lo", "up"],
            [*inside, "ip", "addr", "add", f"{self.inner_ip}/24", "dev", self.inner],
            [*inside, "ip", "link", "set", self.inner, "up"],
        ]

    def _set_inner(self, state: str) -> None:
        result = _run("ip", "netns", "exec", self.netns, "ip", "link", "set", self.inner, state)
        if result.returncode != 0:
            raise RuntimeError(f"ip link set {self.inner} {state}: {result.stdout.strip()}")

    def cut(self) -> None:
        self._set_inner("down")

    def heal(self) -> None:
        self._set_inner("up")

    def destroy(self) -> None:
        """Idempotent: deleting the namespace deletes the inner end, and so the pair."""
        _run("ip", "netns", "del", self.netns)
        if Path(f"/sys/class/net/{self.outer}").exists():
            _run("ip", "link", "del", self.outer)


class Host:
    """A command run as pid 1 of its own pid namespace under its own hostname, whose stdout
    lines (tests/lease_worker.py's events) we can wait for."""

    def __init__(self, argv: list[str], *, hostname: str, netns: str | None = None):
        prefix = ["ip", "netns", "exec", netns] if netns else []
        # sh sets the hostname inside the new UTS namespace, then becomes the command (pid 1)
        self.proc = subprocess.Popen(
            [*prefix, *UNSHARE, "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.hostname = hostname
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[list[str]] = []
        threading.Thread(target=self._pump, daemon=True).start()
        atexit.register(self.stop)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.split())

    def expect(self, word: str, timeout: float = 15.0) -> list[str]:
        end = mono() + timeout
        while True:
            try:
                parts = self.lines.get(timeout=max(0.01, end - mono()))
            except queue.Empty:
                raise AssertionError(f"no {word} from {self.hostname} within {timeout}s; saw {self.seen}; "
                                     f"stderr {self._stderr_tail()}") from None
            self.seen.append(parts)
            if parts[0] == word:
                return parts

    def _stderr_tail(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()[-2000:]

    def init_pid(self, timeout: float = 5.0) -> int:
        """Our pid for the command (pid 1 inside): unshare's one child."""
        end = mono() + timeout
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        while mono() < end:
            try:
                found = children.read_text().split()
            except OSError:
                found = []
            if found:
                return int(found[0])
            time.sleep(0.02)
        raise AssertionError(f"{self.hostname}: no process inside the namespace after {timeout}s")

    def signal(self, signum: int) -> None:
        """Signal the command (pid 1 inside: it gets only the signals it handles, and SIGKILL)."""
        os.kill(self.init_pid(), signum)

    def wait(self, timeout: float) -> int:
        """The command's exit status (unshare passes it on)."""
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Kill unshare; --kill-child kills the command, and with pid 1 its whole namespace."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass


class TcpPgServer(PgServer):
    """tests/pg_server.py's server, also listening on one TCP address and trusting one network
    (pg_hba.conf), so a host in another network namespace can reach it over a veth pair."""

    address: ClassVar[str] = ""
    network: ClassVar[str] = ""

    @classmethod
    def on(cls, address: str, network: str) -> "TcpPgServer":
        return type(cls.__name__, (cls,), {"address": address, "network": network}).start()

    def _initdb(self) -> None:
        super()._initdb()
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.network} trust\n")

    def _pg_ctl_start(self, settings: dict) -> None:
        super()._pg_ctl_start({**settings, "listen_addresses": f"'{self.address}'"})

    def tcp_url(self, unix_url: str) -> str:
        """The TCP URL of the database a unix-socket URL of this server names."""
        database = unix_url.split("/")[3].split("?")[0]
        return f"postgresql://{SUPERUSER}@{self.address}:{PORT}/{database}?connect_timeout=3"


def lease_worker(db: str, name: str, *, ttl: float, renew: float, retry: float, write_every: float) -> list[str]:
    """The argv of a tests/lease_worker.py holder."""
    helper = str(Path(__file__).with_name("lease_worker.py"))
    return [sys.executable, helper, db, name, "hold", "--ttl", str(ttl), "--renew", str(renew),
            "--retry", str(retry), "--write-every", str(write_every)]
