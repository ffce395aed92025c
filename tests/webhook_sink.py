"""A real HTTP receiver on loopback for alert webhooks: records every JSON body POSTed to it.

    with WebhookSink() as sink:       # sink.url -> http://127.0.0.1:PORT/hook
        ...
        sink.messages                 # the bodies, in arrival order, each with "_received" (time.time())
`fail_first=N` answers the first N requests with HTTP 500 (the retry path)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookSink:
    def __init__(self, fail_first: int = 0):
        self.messages: list[dict] = []
        self.requests = 0
        self.fail_first = fail_first
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with sink._lock:
                    sink.requests += 1
                    failing = sink.requests <= sink.fail_first
                    if not failing:
                        message = json.loads(body)
                        message["_received"] = time.time()
                        message["_content_type"] = self.headers.get("Content-Type")
                        sink.messages.append(message)
                self.send_response(500 if failing else 200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def kinds(self, since: float = 0.0) -> list[str]:
        with self._lock:
            return [m["kind"] for m in self.messages if m["_received"] >= since]

    def of_kind(self, kind: str, since: float = 0.0) -> list[dict]:
        with self._lock:
            return [m for m in self.messages if m["kind"] == kind and m["_received"] >= since]

    def __enter__(self) -> "WebhookSink":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
