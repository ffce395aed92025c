"""The project-local supervisord, seen from ingest: where its config is, and what state each
program is in (read over its unix socket with XML-RPC, as supervisorctl does).

`supervisor_states()` is what `ingest status` hands to `ingest.health.assess_health`:
program name -> {state, pid, start, uptime_s, exitstatus, spawnerr, description, ...},
or None when supervisord is not running (no config, no socket, nobody listening).
"""

import configparser
import http.client
import os
import socket
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

from .errors import EXIT_MEANINGS, IngestError

CONFIG_ENV = "INGEST_SUPERVISOR_CONF"
CONFIG_RELATIVE = Path("supervisor.d") / "supervisord.conf"
RPC_TIMEOUT_S = 5.0


class SupervisorError(IngestError):
    """supervisord's config cannot be read, or its socket answered with an error."""


def find_config(conf_path: str | os.PathLike | None = None) -> Path | None:
    """The supervisord config: `conf_path`, else $INGEST_SUPERVISOR_CONF, else
    ./supervisor.d/supervisord.conf, else the one in the checkout this package runs from
    (an editable install). None when there is none."""
    if conf_path:
        return Path(conf_path)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = root / CONFIG_RELATIVE
        if candidate.is_file():
            return candidate
    return None


def server_url(conf_path: str | os.PathLike) -> str:
    """[supervisorctl] serverurl with %(here)s expanded, as supervisorctl reads it."""
    path = Path(conf_path)
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise SupervisorError(f"cannot read supervisord config {path}: {e.strerror}") from None
    except configparser.Error as e:
        raise SupervisorError(f"supervisord config {path} is not valid: {str(e).splitlines()[0]}") from None
    url = parser.get("supervisorctl", "serverurl", fallback=None)
    if not url:
        raise SupervisorError(f"supervisord config {path} has no [supervisorctl] serverurl")
    here = str(path.resolve().parent)
    url = url.strip().replace("%(here)s", here)
    if url.startswith("unix://"):
        url = "unix://" + os.path.normpath(os.path.expanduser(url[len("unix://"):]))
    return url


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket, with a timeout (supervisor's own connection has none, and a
    hung supervisord must not hang `ingest status`)."""

    def __init__(self, socket_path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def rpc(url: str, timeout: float = RPC_TIMEOUT_S) -> xmlrpc.client.ServerProxy:
    """An XML-RPC proxy to supervisord at `url` (unix://... or http://...)."""
    transport = SupervisorTransport(None, None, url)
    if url.startswith("unix://"):
        path = url[len("unix://"):]
        transport._get_connection = lambda: _UnixConnection(path, timeout)
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


@dataclass
class SupervisorView:
    """One look at supervisord: `running` False with `error` saying why when it cannot be asked."""

    config: Path | None
    url: str | None
    running: bool
    programs: dict[str, dict] = field(default_factory=dict)
    error: str | None = None
    supervisord_state: str | None = None
    supervisord_pid: int | None = None


def program_name(info: dict) -> str:
    """'backfill' for a program in its own group (the usual case), 'group:name' otherwise."""
    name, group = info.get("name", "?"), info.get("group")
    return name if not group or group == name else f"{group}:{name}"


def describe_exit(status: int | None) -> str:
    if status is None:
        return ""
    return f"exit {status}" + (f": {EXIT_MEANINGS[status]}" if status in EXIT_MEANINGS else "")


def program_state(info: dict) -> dict:
    """The fields of getProcessInfo that matter, plus uptime_s (None unless RUNNING)."""
    state = info.get("statename", "UNKNOWN")
    start, now = info.get("start") or 0, info.get("now") or 0
    running = state == "RUNNING" and start > 0
    return {
        "state": state,
        "pid": info.get("pid") or None,
        "start": start or None,
        "stop": info.get("stop") or None,
        "uptime_s": max(0, now - start) if running else None,
        "exitstatus": info.get("exitstatus"),
        "spawnerr": info.get("spawnerr") or "",
        "description": info.get("description", ""),
        "logfile": info.get("stdout_logfile") or info.get("logfile") or "",
    }


def last_error_line(logfile: str, tail_bytes: int = 16_384) -> str:
    """The last error line of a program's log (what a FATAL or EXITED worker died of), or ''."""
    if not logfile:
        return ""
    try:
        with open(logfile, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        for marker in (" ERROR ", " CRITICAL "):
            if marker in line:  # drop the timestamp and program prefix: "ERROR logger: message"
                return line[line.index(marker) + 1:].strip()[:300]
        if line.startswith(("ingest: error:", "Traceback")):
            return line.strip()[:300]
    return ""


def probe(conf_path: str | os.PathLike | None = None, timeout: float = RPC_TIMEOUT_S) -> SupervisorView:
    """Ask supervisord for every program's state. Never raises: problems land in `error`."""
    config = find_config(conf_path)
    if config is None:
        return SupervisorView(None, None, False, error=f"no supervisord config ({CONFIG_RELATIVE} not found)")
    try:
        url = server_url(config)
    except SupervisorError as e:
        return SupervisorView(config, None, False, error=str(e))
    try:
        proxy = rpc(url, timeout)
        state = proxy.supervisor.getState()
        pid = proxy.supervisor.getPID()
        infos = proxy.supervisor.getAllProcessInfo()
    except (FileNotFoundError, ConnectionRefusedError):
        return SupervisorView(config, url, False, error="supervisord is not running")
    except PermissionError:
        return SupervisorView(config, url, False, error=f"no permission to use {url} (another user's supervisord?)")
    except (OSError, http.client.HTTPException, xmlrpc.client.Error) as e:
        return SupervisorView(config, url, False, error=f"supervisord at {url} did not answer: {e}")
    programs = {program_name(info): program_state(info) for info in infos}
    for proc in programs.values():
        if proc["state"] in ("BACKOFF", "FATAL", "EXITED"):
            proc["last_error"] = last_error_line(proc["logfile"])
    return SupervisorView(config, url, True, programs, None, state.get("statename"), pid)


def supervisor_states(conf_path: str | os.PathLike | None = None) -> dict[str, dict] | None:
    """program name -> state dict (see program_state), or None when supervisord is not running."""
    view = probe(conf_path)
    return view.programs if view.running else None
