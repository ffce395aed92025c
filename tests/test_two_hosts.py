"""Two hosts sharing one PostgreSQL server: the lease across machines (docs/postgres.md).

Each "host" is a tests/lease_worker.py holder run as pid 1 of its own UTS, pid and mount
namespaces under its own hostname (tests/hosts.py), so the other sees its lease as remote: its
pid cannot be asked about, and a takeover waits until the row has not changed for a TTL on the
watcher's own monotonic clock (`taken_over_expired`), never for a liveness check
(`taken_over_dead`, the one-host rule of tests/test_leases_multiprocess.py).

The partition test adds a network namespace: host B reaches a second PostgreSQL server, listening
on a veth address, over the veth pair; host A reaches it from our side. Cutting B's end of the
link past the TTL lets A take over; after the link heals, B's stalled writes reach the server and
are refused by the fence, and B steps down.

Skipped, saying why, without root, unshare or ip, or where the namespaces cannot be made.
"""

import signal
import time

import pytest

from ingest.backends import open_store
from ingest.errors import EXIT_LEASE_LOST

from .hosts import Host, Link, TcpPgServer, lease_worker, mono, why_no_namespaces, why_no_network_namespaces
from .pg_server import why_unavailable

TTL, RENEW, RETRY, WRITE_EVERY = 2.0, 0.5, 0.1, 0.1
pytestmark = pytest.mark.timeout(120)


def query(db, sql: str, params: tuple = ()) -> list[tuple]:
    conn = open_store(db).connect()
    try:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def events(db, name="job") -> list[tuple]:
    return query(db, "SELECT event, fence, holder FROM lease_events WHERE name = ? ORDER BY id", (name,))


def holder_host(db, name="job") -> str:
    return query(db, "SELECT holder_host FROM leases WHERE name = ?", (name,))[0][0]


def work(db) -> list[tuple]:
    """The fenced writes in commit order: (fence, mono)."""
    return query(db, "SELECT fence, mono FROM lease_work ORDER BY id")


@pytest.fixture
def hosts():
    """Start Hosts; every one is killed (its whole pid namespace with it) at the end of the test."""
    started: list[Host] = []

    def start(db, *, hostname, netns=None):
        host = Host(lease_worker(str(db), "job", ttl=TTL, renew=RENEW, retry=RETRY, write_every=WRITE_EVERY),
                    hostname=hostname, netns=netns)
        started.append(host)
        return host

    yield start
    for host in started:
        host.stop()


@pytest.fixture
def namespaced_pg_url(pg_url):
    reason = why_no_namespaces()
    if reason:
        pytest.skip(reason)
    return pg_url


@pytest.fixture
def partitionable(request):
    """(link, server, TCP URL of a fresh database): host B's network namespace and a veth pair to a
    PostgreSQL server listening on the outer end's address. Removed at the end, also on failure."""
    reason = why_unavailable() or why_no_network_namespaces()
    if reason:
        pytest.skip(reason)
    link = Link.create()
    request.addfinalizer(link.destroy)
    server = TcpPgServer.on(link.outer_ip, link.network)
    request.addfinalizer(server.stop)
    return link, server, server.tcp_url(server.create_database())


def test_a_holder_on_another_host_is_taken_over_only_after_the_ttl(namespaced_pg_url, hosts):
    db = namespaced_pg_url
    b = hosts(db, hostname="host-b")
    assert b.expect("ACQUIRED")[1] == "1"
    a = hosts(db, hostname="host-a")
    a.expect("READY")
    assert holder_host(db) == "host-b"  # B's hostname, not ours: B's namespace is its own host
    time.sleep(4 * RETRY)  # A is polling now, and sees B renewing

    killed_at = mono()
    b.signal(signal.SIGKILL)  # pid 1 of B's namespace: the holder, and the whole "host" with it
    acquired = a.expect("ACQUIRED", timeout=TTL + 10)
    taken = float(acquired[2]) - killed_at
    # B's pid means nothing on A: A waits for a TTL of silence after B's last renewal (at most
    # renew_s before the kill), where one host would take a dead holder's lease at once
    assert TTL - RENEW - 0.2 <= taken <= TTL + 3
    assert acquired[1] == "2"
    last = events(db)[-1]
    assert last[:2] == ("taken_over_expired", 2) and last[2].startswith("host-a:")
    assert holder_host(db) == "host-a"
    assert b.wait(10) != 0  # unshare passes on the kill

    a.signal(signal.SIGTERM)
    a.expect("RELEASED")
    assert a.wait(10) == 0


def test_cut_off_holder_is_taken_over_and_fenced_out_when_the_link_heals(partitionable, hosts):
    link, server, db = partitionable
    b = hosts(db, hostname="host-b", netns=link.netns)  # reaches the server over the veth pair
    assert b.expect("ACQUIRED", timeout=20)[1] == "1"
    a = hosts(db, hostname="host-a")                   # our network: the server's side of the link
    a.expect("READY", timeout=20)
    time.sleep(4 * RETRY)
    assert holder_host(db) == "host-b"

    cut_at = mono()
    link.cut()
    acquired = a.expect("ACQUIRED", timeout=TTL + 15)
    taken_at = float(acquired[2])
    assert acquired[1] == "2"
    # B's last renewal reached the server at most renew_s before the cut
    assert TTL - RENEW - 0.2 <= taken_at - cut_at <= TTL + 6
    assert events(db)[-1][:2] == ("taken_over_expired", 2)
    time.sleep(0.5)  # A writes under fence 2 while B is still cut off, believing it holds fence 1
    assert b.proc.poll() is None  # B has not stepped down: it cannot reach the server to learn

    link.heal()
    healed_at = mono()
    lost = b.expect("LOST", timeout=40)  # stalled TCP retransmits reach the server again
    # the fence check refused B: its next fenced write (seen every run here: its session was
    # ended by the server, the write fails once and is tried again on a new connection) or, had
    # it arrived first, its heartbeat's renewal, which checks the same fence in its transaction
    assert lost[1] == "1" and lost[3] in ("fenced", "heartbeat")
    assert b.wait(10) == EXIT_LEASE_LOST
    assert float(lost[2]) >= healed_at

    # no write of B's committed once A held the lease: every fence-1 write is older than A's first
    rows = work(db)
    fences = [fence for fence, _ in rows]
    assert fences == sorted(fences) and 2 in fences
    assert all(at < taken_at for fence, at in rows if fence == 1)
    assert events(db)[-1][:2] == ("lost", 1)  # B recorded its loss, once healed
    assert holder_host(db) == "host-a"

    a.signal(signal.SIGTERM)
    a.expect("RELEASED")
    assert a.wait(10) == 0


def test_a_backfill_worker_on_another_host_is_taken_over_and_the_pass_finishes_once(namespaced_pg_url, tmp_path):
    """The real backfill worker on both hosts: B's holder is killed mid-pass; A's worker, waiting
    for the lease, takes it over after the TTL (`taken_over_expired`: B's pid means nothing on
    A) and finishes the pass with every listed ASIN stored and decided exactly once."""
    from ingest.simulator import SimConfig, Simulator

    from .workers_support import INGEST, query as rows, scalar, start_worker, stop, wait_for, worker_env, write_config

    db = namespaced_pg_url
    simulator = Simulator(SimConfig(port=0, refill_rate=6000, seed=7, products=1200, fault_slow=1.0, slow_s=1.5))  # every call 1.5 s: B is killed mid-pass
    simulator.start()
    env = worker_env(simulator.url, db, write_config(tmp_path))
    settings = [f"{k}={env[k]}" for k in ("KEEPA_BASE_URL", "KEEPA_API_KEY", "INGEST_DB", "INGEST_CONFIG")]
    log_b = tmp_path / "backfill-b.log"
    # host B: the worker as pid 1 of its namespace, its output to a file (nothing reads a pipe)
    b = Host(["sh", "-c", f'exec "$@" >>{log_b} 2>&1', "backfill", "env", *settings, INGEST, "run", "backfill", "--once"],
             hostname="host-b")
    a = None
    try:
        wait_for(lambda: (scalar(db, "SELECT count(*) FROM deals") or 0) > 0, 60, 0.1, "host B's first deals")
        assert scalar(db, "SELECT holder_host FROM leases WHERE name = 'backfill'") == "host-b"
        a = start_worker("backfill", env, "--once", log=tmp_path / "backfill-a.log")  # host A: this one
        time.sleep(1.0)  # A is waiting for the lease, and sees B renewing
        b.signal(signal.SIGKILL)
        assert b.wait(10) != 0
        assert a.wait(120) == 0, (tmp_path / "backfill-a.log").read_text()[-3000:]
    finally:
        b.stop()
        if a is not None:
            stop(a, signal.SIGKILL)
        listed = set(simulator.stats()["listed_asins"])
        simulator.stop()
    taken = rows(db, "SELECT event, fence, holder FROM lease_events WHERE name = 'backfill' ORDER BY id")
    assert ("taken_over_expired", 2) in [t[:2] for t in taken], taken
    assert not [t for t in taken if t[0] == "taken_over_dead"], taken  # never judged by a pid across hosts
    stored = [asin for (asin,) in rows(db, "SELECT asin FROM deals")]
    assert len(stored) == len(set(stored)) and set(stored) == listed
    assert rows(db, "SELECT asin, count(*) FROM decisions GROUP BY asin HAVING count(*) > 1") == []
    fences = [f for (f,) in rows(db, "SELECT fence FROM fenced_commits WHERE lease = 'backfill' ORDER BY id")]
    assert fences[0] == 1 and fences[-1] == 2 and fences == sorted(fences)  # B's epoch, then A's
