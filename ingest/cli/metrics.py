"""`ingest metrics serve | print`: the Prometheus series of ingest/metrics.py, over HTTP or as text.

    ingest metrics serve [--listen HOST:PORT]     /metrics over HTTP (default [metrics] listen, 127.0.0.1:9464)
    ingest metrics print [--textfile PATH]        the same text on stdout, or written atomically for
                                                  node_exporter's textfile collector (mode 0644)

Each scrape reads the database read-only (never creates or migrates it): a missing database is
a scrape saying down (ingest_health_verdict 2), not an error, so the endpoint can start before
the workers have created the file.
"""

import signal
import socket
import sys
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import click

from ..backends import open_store
from ..errors import EXIT_FAILURE, EXIT_OK, IngestError
from ..logs import setup_logging
from ..metrics import IngestCollector, exposition, parse_listen, registry_for, write_textfile

METRICS_PATH = "/metrics"
INDEX = (b"<html><head><title>ingest metrics</title></head>"
         b"<body><a href=\"/metrics\">/metrics</a></body></html>\n")


class ListenError(IngestError):
    """The address cannot be bound (in use, not local, no permission): exit 1, so supervisord retries."""

    exit_code = EXIT_FAILURE


def _collector(app, supervisor_conf: str | None) -> IngestCollector:
    return IngestCollector(app.db_path, supervisor_conf=supervisor_conf,
                           stall_minutes=app.settings["health"].stall_minutes, config=app.config)


def make_server(host: str, port: int, collector: IngestCollector) -> ThreadingHTTPServer:
    """A threaded HTTP server answering /metrics (and / with a link to it); other paths 404."""
    from prometheus_client.exposition import MetricsHandler

    base = MetricsHandler.factory(registry_for(collector))

    class Handler(base):
        def do_GET(self):
            path = urlsplit(self.path).path
            if path == METRICS_PATH:
                return super().do_GET()
            if path == "/":
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.end_headers()
                self.wfile.write(INDEX)
                return None
            self.send_error(404, f"only {METRICS_PATH} is served")
            return None

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    try:
        return Server((host, port), Handler)
    except OSError as e:
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _stop_on_sigterm() -> None:
    def stop(_signo, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)


@click.group("metrics")
def metrics():
    """Prometheus metrics read from the database at scrape time (see docs/prometheus/)."""


SUPERVISOR_CONF_HELP = "supervisord config the health verdict asks (else $INGEST_SUPERVISOR_CONF, ./supervisor.d/supervisord.conf)."


@metrics.command("serve")
@click.option("--listen", metavar="HOST:PORT", help="Address to listen on (default: [metrics] listen, 127.0.0.1:9464;"
                                                    " port 0: any free port, printed at start).")
@click.option("--supervisor-conf", metavar="PATH", help=SUPERVISOR_CONF_HELP)
@click.pass_obj
def serve(app, listen, supervisor_conf):
    """Serve /metrics over HTTP until SIGTERM or Ctrl-C (then exit 0).

    Exit 1 when the address cannot be bound, 2 for a malformed --listen, 3 for a bad config."""
    try:
        host, port = parse_listen(listen or app.settings["metrics"].listen)
    except IngestError as e:
        raise click.BadParameter(str(e), param_hint="--listen") from None
    server = make_server(host, port, _collector(app, supervisor_conf))
    log = setup_logging("metrics")
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("serving http://%s:%s%s (database %s)", shown, bound_port, METRICS_PATH, open_store(app.db_path).label)
    _stop_on_sigterm()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()
    sys.exit(EXIT_OK)


@metrics.command("print")
@click.option("--textfile", type=click.Path(dir_okay=False, path_type=Path), metavar="PATH",
              help="Write atomically to PATH (must end in .prom, as node_exporter's textfile collector needs; mode 0644).")
@click.option("--supervisor-conf", metavar="PATH", help=SUPERVISOR_CONF_HELP)
@click.pass_obj
def print_command(app, textfile, supervisor_conf):
    """The metrics in the Prometheus text format, once: on stdout, or into a textfile."""
    text = exposition(_collector(app, supervisor_conf))
    if textfile is None:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
        return
    if textfile.suffix != ".prom":
        raise click.BadParameter(f"{textfile} does not end in .prom: node_exporter's textfile collector would"
                                 " ignore it", param_hint="--textfile")
    if not textfile.parent.is_dir():
        raise click.BadParameter(f"folder {textfile.parent} does not exist", param_hint="--textfile")
    try:
        write_textfile(textfile, text)
    except OSError as e:
        raise IngestError(f"cannot write {textfile}: {e.strerror or e}") from None


commands = [metrics]
