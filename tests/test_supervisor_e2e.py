"""ingest under a real supervisord, against the simulator: the shipped supervisor.d/ and scripts/
in a throwaway copy of the project (tests/supervised.py), with short lease timings.

What operators rely on: both workers run; a killed worker is restarted and takes its lease back at
once; `supervisorctl stop` releases the lease without a SIGKILL; restarts never leave the work
unowned for longer than the lease TTL; stopping and starting supervisord resumes where it was.
"""

import configparser
import inspect
import json
import os
import signal
import stat
import sys
import time

import pytest

from ingest.keepa import KeepaClient
from ingest.simulator import SimConfig, Simulator

from .supervised import ROOT, TTL_S, SupervisedProject

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; supervisord is POSIX-only"),
]

WORKERS = ("backfill", "upsert")
ACQUIRED = ("acquired", "taken_over_dead", "taken_over_expired")
# 60,000 products list 10,000 deals (Keepa's cap, 67 pages): one backfill pass outlasts each test,
# and tokens never run short (cap 60 x 6000)
SIM = dict(refill_rate=6000, products=60_000, seed=3)


@pytest.fixture
def sim():
    simulator = Simulator(SimConfig(port=0, **SIM)).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def project(sim):
    p = SupervisedProject(sim.url)
    yield p
    p.close()


def start(project) -> dict[str, int]:
    """scripts/start; returns program -> pid once both workers hold their leases."""
    done = project.script("start", check=False, timeout=60)
    assert done.returncode == 0, f"scripts/start exited {done.returncode}:\n{done.stdout}{done.stderr}"
    states = project.wait_running(*WORKERS)
    pids = {w: states[w]["pid"] for w in WORKERS}
    for worker, pid in pids.items():
        project.wait_held_by(worker, pid)
    return pids


def commits(project, lease: str, fence: int | None = None) -> list:
    sql, args = "SELECT at, fence FROM fenced_commits WHERE lease = ?", [lease]
    if fence is not None:
        sql += " AND fence = ?"
        args.append(fence)
    return project.query(sql + " ORDER BY id", *args)


def checkpoint(project, name: str) -> dict | None:
    rows = project.query("SELECT value FROM checkpoints WHERE name = ?", name)
    return json.loads(rows[0][0]) if rows else None


# ---------------------------------------------------------------- the files themselves


def _ini(path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read(path)
    return parser


def test_config_choices_hold_together():
    main = _ini(ROOT / "supervisor.d/supervisord.conf")
    assert main.get("unix_http_server", "chmod") == "0700"
    assert not any(s.startswith("inet_http_server") for s in main.sections()), "no TCP server"
    for section, key in [("unix_http_server", "file"), ("supervisord", "logfile"), ("supervisord", "pidfile"),
                         ("supervisord", "childlogdir")]:
        assert main.get(section, key).startswith("%(here)s/../var/"), (section, key)

    programs = {w: dict(_ini(ROOT / f"supervisor.d/programs/{w}.conf").items(f"program:{w}")) for w in WORKERS}
    swapped = {k: v.replace("upsert", "backfill") for k, v in programs["upsert"].items()}
    assert swapped == programs["backfill"], "backfill.conf and upsert.conf differ beyond their names"

    backfill = programs["backfill"]
    assert backfill["stopsignal"] == "TERM" and backfill["stopasgroup"] == backfill["killasgroup"] == "true"
    # a lost lease (5) and crashes restart; a configuration error (3) must not loop against Keepa
    assert backfill["autorestart"] == "unexpected" and set(backfill["exitcodes"].split(",")) == {"0", "3"}
    # SIGTERM waits for at most one HTTP attempt (connect + read timeout) plus the release
    defaults = inspect.signature(KeepaClient).parameters
    longest_call = defaults["connect_timeout_s"].default + defaults["read_timeout_s"].default
    assert int(backfill["stopwaitsecs"]) >= longest_call + 10
    assert "INGEST_DB=" in backfill["environment"]
    assert all(v.startswith("%(here)s/") for k, v in backfill.items() if k in ("directory", "stdout_logfile"))


# ---------------------------------------------------------------- a real supervisord


def test_start_runs_both_workers_and_status_reports_healthy(project):
    pids = start(project)
    sock = project.root / "var" / "supervisor.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o700

    # supervisorctl with the project's config works from the project root
    listing = project.ctl("status").stdout
    for worker in WORKERS:
        assert f"pid {pids[worker]}" in listing

    project.wait(lambda: sum(n for (n,) in project.query("SELECT count(*) FROM deals")), 60, "deals stored")

    def healthy():
        done = project.script("status", "--json", check=False)
        state = json.loads(done.stdout)
        return (done.returncode, state) if state["verdict"] == "healthy" else None
    code, state = project.wait(healthy, 60, "ingest status to say healthy", interval=0.5)
    assert code == 0 and state["problems"] == []
    assert {name: p["state"] for name, p in state["supervisor"]["programs"].items()} == {
        "backfill": "RUNNING", "upsert": "RUNNING", "metrics": "RUNNING", "watch": "RUNNING"}


def test_kill_9_worker_is_restarted_and_takes_its_lease_back_at_once(project):
    pids = start(project)
    upsert_fence = project.lease("upsert")["fence"]
    since = project.last_event_id()

    killed_at = time.time()
    os.kill(pids["backfill"], signal.SIGKILL)
    new_pid = project.wait(lambda: (p := project.pid("backfill")) not in (None, pids["backfill"]) and p,
                           15, "supervisord to restart backfill")
    row = project.wait_held_by("backfill", new_pid, timeout=TTL_S)

    taken = [e for e in project.events("backfill", since) if e["event"] in ACQUIRED]
    assert taken[0]["event"] == "taken_over_dead", taken  # not waited out: the holder was dead
    assert f"pid {pids['backfill']}" in taken[0]["detail"]
    assert taken[0]["at"] - killed_at < TTL_S
    assert project.lease("upsert")["fence"] == upsert_fence, "upsert was disturbed"
    project.wait(lambda: commits(project, "backfill", row["fence"]), 60, "backfill committing with its new fence")


def test_supervisorctl_stop_releases_the_lease_without_sigkill(project):
    pids = start(project)
    fence = project.lease("backfill")["fence"]
    since = project.last_event_id()

    began = time.monotonic()
    project.ctl("stop", "backfill", timeout=120)
    took = time.monotonic() - began

    proc = project.states()["backfill"]
    assert proc["state"] == "STOPPED" and proc["exitstatus"] == 0, proc
    events = project.events("backfill", since)
    assert [(e["event"], e["fence"]) for e in events] == [("released", fence)]
    assert f":{pids['backfill']}:" in events[0]["holder"]
    assert project.lease("backfill")["holder_pid"] is None
    log = (project.root / "var/log/supervisord.log").read_text()
    assert "SIGKILL" not in log
    assert took < 30, f"stop took {took:.1f}s"  # stopwaitsecs is 90: it was SIGTERM that ended it

    project.ctl("start", "backfill")
    new_pid = project.pid("backfill")
    row = project.wait_held_by("backfill", new_pid)
    assert row["fence"] == fence + 1
    assert project.events("backfill", since)[-1]["event"] == "acquired"


def _gaps(events: list[dict]) -> list[float]:
    """Seconds the lease stayed free between each release and the next acquisition."""
    out, released_at = [], None
    for e in events:
        if e["event"] == "released":
            released_at = e["at"]
        elif e["event"] in ACQUIRED and released_at is not None:
            out.append(e["at"] - released_at)
            released_at = None
    return out


@pytest.mark.timeout(400)
def test_twenty_restarts_release_every_lease_and_never_leave_work_unowned_long(project):
    start(project)
    since = project.last_event_id()
    first = time.time()
    for _ in range(20):
        project.ctl("restart", "all", timeout=200)
    states = project.wait_running(*WORKERS)
    for worker in WORKERS:
        project.wait_held_by(worker, states[worker]["pid"])

    for worker in WORKERS:
        events = project.events(worker, since)
        kinds = {e["event"] for e in events}
        assert kinds <= {"released", "acquired"}, f"{worker}: {kinds} (a stop that did not release?)"
        gaps = _gaps(events)
        assert len(gaps) == 20
        print(f"{worker}: lease free between holders max {max(gaps):.2f}s, mean {sum(gaps) / 20:.2f}s")
        # every stop released its lease, so a gap is only the next process starting (about 2 s
        # alone, more on a loaded machine): never a wait for expiry, which the events rule out
        assert max(gaps) < 30.0

    # ingestion went on through the restarts. A holder that lives ~4 s may commit nothing (upsert
    # has the tokens first while both are busy), so the measure is the longest pause between
    # commits, against the production lease TTL (30 s); and the last holder commits too.
    stamps = [at for at, _ in commits(project, "backfill") if at >= first]
    fences = {f for at, f in commits(project, "backfill") if at >= first}
    longest = max(b - a for a, b in zip(stamps, stamps[1:]))
    print(f"backfill: {len(stamps)} commits under {len(fences)} of 21 fences, longest pause {longest:.2f}s")
    assert longest < 30.0
    final = project.lease("backfill")["fence"]
    project.wait(lambda: commits(project, "backfill", final), 60, "the last backfill holder committing")


def test_supervisord_stopped_and_started_again_resumes(project):
    start(project)
    project.wait(lambda: (c := checkpoint(project, "backfill")) and c["page"] >= 2 and c, 60, "backfill page 2")
    fences = {w: project.lease(w)["fence"] for w in WORKERS}
    since = project.last_event_id()

    project.script("stop", timeout=120)
    assert project.supervisord_pid is None or not os.path.exists(f"/proc/{project.supervisord_pid}")
    for worker in WORKERS:
        assert project.lease(worker)["holder_pid"] is None
        assert [e["event"] for e in project.events(worker, since)] == ["released"]
    before = checkpoint(project, "backfill")
    deals_before = project.query("SELECT count(*) FROM deals")[0][0]

    pids = start(project)
    for worker in WORKERS:
        row = project.lease(worker)
        assert row["holder_pid"] == pids[worker] and row["fence"] == fences[worker] + 1
    project.wait(lambda: commits(project, "backfill", fences["backfill"] + 1), 60, "backfill committing again")
    after = checkpoint(project, "backfill")
    assert (after["pass"], after["page"]) >= (before["pass"], before["page"]), (before, after)
    assert project.query("SELECT count(*) FROM deals")[0][0] >= deals_before


@pytest.mark.timeout(200)
def test_demo_shows_deals_within_a_minute_and_stops_everything(project):
    """scripts/demo with no key: simulator + both workers under supervisord (demo.conf), a status
    screen every few seconds, then (DEMO_SECONDS instead of Ctrl-C) a clean stop."""
    for name in ("KEEPA_API_KEY", "KEEPA_BASE_URL"):
        project.env.pop(name)
    project.env.update(DEMO_SECONDS="45", DEMO_INTERVAL="3")
    done = project.script("demo", timeout=180)

    totals = [int(line.rsplit("(total ", 1)[1].rstrip(")")) for line in done.stdout.splitlines()
              if line.startswith("deals ")]
    assert totals and totals[-1] > 0, done.stdout[-3000:]
    assert "the workers call the simulator" in done.stdout
    assert "sim" in done.stdout and "supervisord stopped" in done.stdout
    assert not (project.root / "var" / "supervisord.pid").exists()
    # the simulator's deals went to the demo's own file (one database, one source), not var/ingest.db
    project.use_database(project.root / "var" / "demo.db")
    assert [tuple(r) for r in project.query("SELECT source FROM db_source")] == [("simulator",)]
    assert not (project.root / "var" / "ingest.db").exists()
    for worker in WORKERS:
        assert project.lease(worker)["holder_pid"] is None
        assert project.events(worker)[-1]["event"] == "released"
