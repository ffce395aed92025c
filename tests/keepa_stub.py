"""A tiny scriptable Keepa on loopback (real HTTP) for the client's error paths.

    with KeepaStub() as stub:
        stub.script("product", Reply(429, envelope(tokensLeft=-5)))   # next /product answers 429
        stub.url  -> "http://127.0.0.1:PORT"

Unscripted requests get 200 with a token envelope and an empty result. `stub.requests` records
(endpoint, query) of every request; `Reply(close=True)` drops the connection without answering,
`delay_s` answers late (read timeouts), `gzip=True` compresses the body.
"""

import gzip as gzip_module
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def envelope(**fields) -> dict:
    body = {"timestamp": int(time.time() * 1000), "tokensLeft": 100, "refillIn": 30_000, "refillRate": 5,
            "tokenFlowReduction": 0, "tokensConsumed": 0, "processingTimeInMs": 1}
    body.update(fields)
    return body


@dataclass
class Reply:
    status: int = 200
    body: object = None          # dict -> JSON; str/bytes -> sent as is
    delay_s: float = 0.0
    close: bool = False
    gzip: bool = False


@dataclass
class KeepaStub:
    replies: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)

    def script(self, endpoint: str, *replies: Reply) -> None:
        self.replies.setdefault(endpoint, []).extend(replies)

    def __enter__(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def handle_one_request(self):
                try:
                    super().handle_one_request()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts)
                    self.close_connection = True

            def do_GET(self):
                parsed = urlparse(self.path)
                endpoint = parsed.path.strip("/")
                stub.requests.append((endpoint, parse_qs(parsed.query)))
                queue = stub.replies.get(endpoint) or []
                reply = queue.pop(0) if queue else Reply(200, _default_body(endpoint))
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.close:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                body = reply.body if reply.body is not None else _default_body(endpoint)
                data = json.dumps(body).encode() if isinstance(body, (dict, list)) else (
                    body.encode() if isinstance(body, str) else body)
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json")
                if reply.gzip:
                    data = gzip_module.compress(data)
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _default_body(endpoint: str) -> dict:
    if endpoint == "deal":
        return envelope(tokensConsumed=5, deals={"dr": [], "categoryIds": [], "categoryNames": []})
    if endpoint == "product":
        return envelope(tokensConsumed=1, products=[])
    return envelope()
