"""A hostile Keepa look-alike on loopback (real HTTP), and a trap on another loopback host.

    with KeyTrap() as trap, HostileServer(upstream=sim.url) as server:
        server.script("product", Redirect(307, trap.url))    # the next /product answers 307
        server.script("product", Drip(interval_s=0.2), times=None)   # every /product from now
        server.url   -> "http://127.0.0.1:PORT"

Unscripted requests are forwarded to `upstream` (a simulator) and its answer passed back, so a
worker sees a working Keepa between the misbehaviours; without an upstream they get a sane token
envelope. Misbehaviours: `Redirect` (any 3xx, to any URL), `Drip` (a body fed a byte at a time),
`Endless` (a body that never ends), `GzipBomb` (a small gzip body that decodes huge), `Stall`
(headers, then silence), `Mangle` (the upstream's answer with an absurd member), `Answer` (any status and JSON or raw text: absurd envelopes, deep JSON).

`KeyTrap` listens on 127.0.0.2 (another loopback host) and records every request it gets: where a
redirect would have carried the key.
"""

import json
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

REDIRECTS = (300, 301, 302, 303, 304, 305, 307, 308)


def sane_envelope(**fields) -> dict:
    body = {"timestamp": int(time.time() * 1000), "tokensLeft": 100, "refillIn": 30_000, "refillRate": 5,
            "tokenFlowReduction": 0, "tokensConsumed": 0, "processingTimeInMs": 1}
    body.update(fields)
    return body


@dataclass
class Answer:
    body: object = None          # dict/list -> JSON; str/bytes -> sent as is; None -> a sane envelope
    status: int = 200


@dataclass
class Redirect:
    status: int
    to: str                      # the Location (a full URL: another host, port and path)


@dataclass
class Drip:
    interval_s: float = 0.2      # one byte this often, of a body announced as `length` bytes
    length: int = 100_000


@dataclass
class Endless:
    chunk_bytes: int = 64 * 1024  # chunked transfer, as fast as the client reads


@dataclass
class GzipBomb:
    decoded_mb: int = 256         # zeros, gzip-compressed (about 1/1000 of that on the wire)


@dataclass
class Stall:
    seconds: float = 30.0         # headers, then nothing


@dataclass
class Mangle:
    """The upstream's answer with one more member appended to its JSON object (a later duplicate
    key wins in Python's json): `members`, raw JSON text like '"refillIn": 1e12', used in turn."""

    members: list
    used: int = 0

    def next_member(self) -> str:
        member = self.members[self.used % len(self.members)]
        self.used += 1
        return member


def deep_json(levels: int) -> str:
    return '{"tokensLeft": 1, "x": ' + "[" * levels + "]" * levels + "}"


_BOMBS: dict[int, bytes] = {}


def gzip_bomb(decoded_mb: int) -> bytes:
    if decoded_mb not in _BOMBS:
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip container
        zeros = bytes(2**20)
        _BOMBS[decoded_mb] = b"".join(packer.compress(zeros) for _ in range(decoded_mb)) + packer.flush()
    return _BOMBS[decoded_mb]


@dataclass
class Script:
    behaviour: object
    times: int | None            # None: every request from now on


@dataclass
class HostileServer:
    upstream: str | None = None
    scripts: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)   # (endpoint, behaviour name) of every request

    def script(self, endpoint: str, behaviour, *, times: int | None = 1) -> None:
        with self._lock:
            self.scripts.setdefault(endpoint, []).append(Script(behaviour, times))

    def clear(self, endpoint: str | None = None) -> None:
        with self._lock:
            if endpoint is None:
                self.scripts.clear()
            else:
                self.scripts.pop(endpoint, None)

    def served(self, endpoint: str, name: str) -> int:
        return sum(1 for e, n in list(self.requests) if e == endpoint and n == name)

    def _next(self, endpoint: str):
        with self._lock:
            queue = self.scripts.get(endpoint) or []
            if not queue:
                return None
            head = queue[0]
            if head.times is not None:
                head.times -= 1
                if head.times <= 0:
                    queue.pop(0)
            return head.behaviour

    def __post_init__(self):
        self._lock = threading.Lock()

    def __enter__(self):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True, name="hostile-server").start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


def _handler(server: HostileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def handle_one_request(self):
            try:
                super().handle_one_request()
            except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client gave up
                self.close_connection = True

        def do_GET(self):
            endpoint = urlparse(self.path).path.strip("/")
            behaviour = server._next(endpoint)
            server.requests.append((endpoint, type(behaviour).__name__ if behaviour else "forwarded"))
            if behaviour is None:
                self._forward()
            elif isinstance(behaviour, Mangle):
                self._forward(behaviour.next_member())
            elif isinstance(behaviour, Answer):
                self._answer(behaviour)
            elif isinstance(behaviour, Redirect):
                self._head(behaviour.status, {"Location": behaviour.to, "Content-Length": "0"})
            elif isinstance(behaviour, Drip):
                self._head(200, {"Content-Length": str(behaviour.length)})
                for _ in range(behaviour.length):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(behaviour.interval_s)
            elif isinstance(behaviour, Endless):
                self._head(200, {"Transfer-Encoding": "chunked"})
                chunk = b"[" * behaviour.chunk_bytes
                frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
                while True:
                    self.wfile.write(frame)
            elif isinstance(behaviour, GzipBomb):
                data = gzip_bomb(behaviour.decoded_mb)
                self._head(200, {"Content-Encoding": "gzip", "Content-Length": str(len(data))})
                self.wfile.write(data)
            elif isinstance(behaviour, Stall):
                self._head(200, {"Content-Length": "100"})
                time.sleep(behaviour.seconds)
                self.close_connection = True

        def _head(self, status: int, headers: dict) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.flush()

        def _answer(self, answer: Answer) -> None:
            body = sane_envelope() if answer.body is None else answer.body
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else (
                body.encode() if isinstance(body, str) else body)
            self._head(answer.status, {"Content-Length": str(len(data))})
            self.wfile.write(data)

        def _forward(self, member: str | None = None) -> None:
            if server.upstream is None:
                return self._answer(Answer())
            request = urllib.request.Request(server.upstream + self.path, headers={"Accept-Encoding": "identity"})
            try:
                with urllib.request.urlopen(request, timeout=30) as reply:
                    status, data = reply.status, reply.read()
            except urllib.error.HTTPError as e:
                status, data = e.code, e.read()
            if member is not None:
                data = data.rstrip()[:-1] + b", " + member.encode() + b"}"
            self._head(status, {"Content-Length": str(len(data))})
            self.wfile.write(data)

    return Handler


@dataclass
class KeyTrap:
    """A server on another loopback host that records the query of every request it gets."""

    host: str = "127.0.0.2"
    queries: list = field(default_factory=list)

    def got(self, key: str) -> bool:
        return any(key in "".join(sum(q.values(), [])) or key in raw for q, raw in self.queries)

    def __enter__(self):
        trap = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                trap.queries.append((parse_qs(urlparse(self.path).query), self.path))
                data = json.dumps(sane_envelope()).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_HEAD = do_GET

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True, name="key-trap").start()
        self.url = f"http://{self.host}:{self._server.server_address[1]}/trap"
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
