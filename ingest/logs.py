"""Logging: one line per event, and no registered secret ever reaches a handler.

The Keepa key travels in every URL; `register_secret(key)` makes every log record (message,
arguments and exception text) pass through `redact()` before it is formatted.
"""

import errno
import logging
import re
import sys
import threading

_secrets: set[str] = set()
_lock = threading.Lock()
REDACTED = "<redacted>"
# Belt and braces: a key=... query parameter is scrubbed even if nobody registered the key.
_KEY_PARAM = re.compile(r"(?i)(\bkey=)[^&\s'\"]+")


def register_secret(secret: str | None) -> None:
    if secret:
        with _lock:
            _secrets.add(secret)


def redact(text: str) -> str:
    if not text:
        return text
    for secret in list(_secrets):
        text = text.replace(secret, REDACTED)
    return _KEY_PARAM.sub(r"\1" + REDACTED, text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact(formatted)
            record.exc_info = None
        return True


class LineHandler(logging.StreamHandler):
    """A stream handler that drops a line it cannot write because the disk is full (stderr
    redirected to a file), instead of printing a traceback for every record."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return
        super().handleError(record)


def setup_logging(process_name: str, level: int = logging.INFO) -> logging.Logger:
    """One line per record on stderr (supervisord captures it), secrets redacted."""
    handler = LineHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {process_name}[%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger("ingest")
