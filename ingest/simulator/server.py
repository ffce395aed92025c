"""HTTP plumbing: a ThreadingHTTPServer on loopback in a background thread.

HTTP/1.1 with keep-alive (Keepa's Java client keeps connections open), Content-Length on
every answer, gzip when the request's Accept-Encoding mentions gzip (errors included, as the
Java client gunzips every body). Delays (slow/timeout faults) wait on the stop event, so
stop() never hangs on a sleeping handler.
"""

import gzip
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from ..logs import redact
from .app import Reply, SimApp
from .config import SimConfig

log = logging.getLogger("ingest.simulator")
MAX_BODY = 1 << 20


DRIP_EVERY_S = 0.5  # the drip fault sends a piece of the body this often

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client that hung up (timeouts, chaos kills) is normal here: one debug line.
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("connection from %s ended abruptly", client_address[0])
        else:
            log.exception("simulator error while serving %s", client_address[0])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "KeepaSim/1.0"
    timeout = 60  # idle keep-alive connections are closed after this
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms stall
    wbufsize = 1 << 16  # ...and are buffered into one write where they fit (flushed per request)

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def _serve(self, method: str) -> None:
        sim: Simulator = self.server.simulator
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.send_error(413)
            return
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        try:
            reply = sim.app.handle(method, url.path, url.query, body, self.headers.get("Content-Type", ""))
        except Exception:  # a simulator bug: say so like Keepa would, and keep serving
            log.exception("simulator error on %s", redact(self.path))
            reply = Reply(500, {"error": {"type": "internalServerError", "message": "simulator error",
                                          "details": None}})
        if reply.delay_s and sim.stop_event.wait(reply.delay_s):
            self.close_connection = True
            return  # shutting down: drop the held answer
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        data = json.dumps(reply.payload, separators=(",", ":")).encode()
        if reply.truncate:
            data = data[: max(1, len(data) // 2)]
        gzipped = "gzip" in (self.headers.get("Accept-Encoding") or "").lower()
        if gzipped:
            data = gzip.compress(data, compresslevel=5)
        if reply.location is not None:
            data, gzipped = b"", False
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json;charset=UTF-8")
            if reply.location is not None:
                self.send_header("Location", reply.location)
            if gzipped:
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if reply.drip_s:
                self._drip(data, reply.drip_s)
            else:
                self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. the timeout fault)

    def _drip(self, data: bytes, seconds: float) -> None:
        """Send `data` in pieces every DRIP_EVERY_S so that the whole takes `seconds`."""
        pieces = max(1, int(seconds / DRIP_EVERY_S))
        size = max(1, -(-len(data) // pieces))
        stop = self.server.simulator.stop_event
        for start in range(0, len(data), size):
            self.wfile.write(data[start:start + size])
            self.wfile.flush()
            if stop.wait(DRIP_EVERY_S):
                self.close_connection = True
                return

    def log_message(self, fmt, *args):  # the URL carries the key: redact, and only at debug
        log.debug(redact(fmt % args))


class Simulator:
    """A Keepa-compatible server. `start()` serves in a background thread; `url` is its base."""

    def __init__(self, cfg: SimConfig | None = None):
        self.cfg = cfg or SimConfig()
        self.app = SimApp(self.cfg)
        self.stop_event = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "Simulator":
        self._server = _Server((self.cfg.host, self.cfg.port), _Handler)
        self._server.simulator = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="keepa-sim", daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("simulator not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host = self.cfg.host if ":" not in self.cfg.host else f"[{self.cfg.host}]"
        return f"http://{host}:{self.port}"

    def stats(self) -> dict:
        """Same as GET /_sim/stats."""
        return self.app.stats()

    def set_faults(self, **changes) -> dict:
        """Same as POST /_sim/faults, e.g. set_faults(fault_500=0.3, force_429=[0, 10])."""
        return self.app.faults.update(changes)

    def set_tokens(self, **changes) -> dict:
        """Same as POST /_sim/tokens, e.g. set_tokens(tokens=-20, refill_rate=5)."""
        return self.app.update_tokens(changes)

    def stop(self) -> None:
        self.stop_event.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "Simulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
