"""Alerts: one message per change of the overall verdict, delivered to webhooks, email and a command.

The decision is a pure function, `advance(state, observation, now, settings)`: a verdict that
differs from the one last announced becomes a message once it has held for `confirm_s` (so a
flapping check does not storm); a 'down' still down after `repeat_h` is announced again; back to
healthy is a 'recovered' message. The watchdog (ingest/watch.py) calls it every tick with the
verdict of `ingest status` and hands the messages to an `Outbox`, a thread that records each
message, delivers it to every channel with retries and backoff, and records each delivery: the
watch loop never waits for a slow webhook or SMTP server.

Every text is passed through the log redaction, so the Keepa key never leaves in a message.
"""

import json
import logging
import queue
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from email.message import EmailMessage
from urllib.parse import urlsplit

import requests

from .errors import ConfigError
from .logs import redact
from .settings import setting
from .backends import backend_of, transaction
from .verdicts import HealthReport, ago

log = logging.getLogger(__name__)

KINDS = ("alert", "recovered", "repeat", "action", "test")
ANNOUNCED = ("alert", "recovered", "repeat")   # the kinds that say what the verdict is


@dataclass(frozen=True)
class AlertSettings:
    """[alerts]: when to send and where to."""

    confirm_s: float = setting(60.0, "a new verdict must hold this long before it is announced", min=0, max=86400)
    repeat_h: float = setting(6.0, "while down, announce it again this often (0: never)", min=0, max=24 * 365)
    webhooks: list = setting([], "URLs that get each message as a JSON POST (Slack/Mattermost/Discord style)")
    webhook: str | None = setting(None, "one more webhook URL; env INGEST_ALERT_WEBHOOK", kind=str)
    email_to: list = setting([], "addresses that get each message by email")
    email_from: str = setting("ingest@localhost", "the From: address")
    smtp_host: str | None = setting(None, "SMTP server (needed for email_to)", kind=str)
    smtp_port: int = setting(25, "SMTP port (587 with STARTTLS, usually)", min=1, max=65535)
    smtp_starttls: bool = setting(False, "upgrade the SMTP connection with STARTTLS before login")
    smtp_ca_file: str | None = setting(None, "CA file the SMTP server's certificate is checked against"
                                       " (else the system's)", kind=str)
    smtp_user: str | None = setting(None, "SMTP login name", kind=str)
    smtp_password: str | None = setting(None, "SMTP password; env INGEST_SMTP_PASSWORD (preferred)", kind=str)
    command: list = setting([], "argv of a program that gets each message's JSON on stdin")
    attempts: int = setting(4, "tries per message and channel before it counts as failed", min=1, max=100)
    backoff_s: float = setting(5.0, "wait after a failed try, doubled each time", min=0, max=3600)
    timeout_s: float = setting(10.0, "timeout of one delivery (HTTP, SMTP, command)", above=0, max=600)

    def __post_init__(self):
        for url in self.webhook_urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"webhook URL must be http(s)://host/..., not {_host_of(url)!r}")
        if self.email_to and not self.smtp_host:
            raise ConfigError("email_to needs smtp_host")
        if bool(self.smtp_user) != bool(self.smtp_password):
            raise ConfigError("smtp_user and smtp_password go together")

    @property
    def webhook_urls(self) -> list[str]:
        return [*self.webhooks, *([self.webhook] if self.webhook else [])]

    @classmethod
    def from_config(cls, config: dict) -> "AlertSettings":
        from .settings import parse, with_environment

        merged, _ = with_environment(config)
        return parse(cls, merged.get("alerts"), "alerts")


# ------------------------------------------------------------------ the messages


@dataclass(frozen=True)
class Problem:
    check: str
    verdict: str
    detail: str
    next_step: str = ""


@dataclass(frozen=True)
class Message:
    kind: str
    verdict: str | None
    previous: str | None
    text: str
    problems: tuple[Problem, ...]
    host: str
    database: str
    at: float

    def to_json(self) -> dict:
        out = asdict(self)
        out["problems"] = [asdict(p) for p in self.problems]
        return out

    @property
    def subject(self) -> str:
        what = {"recovered": "recovered", "test": "test message", "action": "watchdog action"}.get(self.kind)
        return f"[ingest {self.host}] {what or (self.verdict or '?').upper()}"


def problems_of(report: HealthReport, programs: dict | None = None) -> tuple[Problem, ...]:
    """The checks that are not ok, worst first, and programs of supervisord that are not running
    with what they died of (a FATAL or EXITED program: its exit status and last log error)."""
    bad = sorted((c for c in report.checks if c.verdict != "ok"), key=lambda c: c.verdict != "fail")
    out = [Problem(c.name, c.verdict, redact(c.summary), redact(c.next_step)) for c in bad]
    from .supervisor import describe_exit

    for name, proc in sorted((programs or {}).items()):
        if proc.get("state") in ("FATAL", "EXITED", "BACKOFF"):
            why = proc.get("spawnerr") or describe_exit(proc.get("exitstatus"))
            if proc.get("last_error"):
                why = f"{why}; log: {proc['last_error']}" if why else f"log: {proc['last_error']}"
            out.append(Problem(f"program {name}", "fail" if proc["state"] != "BACKOFF" else "warn",
                               redact(f"{name} {proc['state']}" + (f" ({why})" if why else "")),
                               "read its log; supervisorctl -c supervisor.d/supervisord.conf start " + name))
    return tuple(out)


def compose(kind: str, verdict: str | None, previous: str | None, problems: tuple[Problem, ...], *,
            host: str, database: str, at: float, since: float | None = None, note: str = "") -> Message:
    """The message, with a one-paragraph `text` that reads well in a chat channel. Every text
    is redacted (the Keepa key, any registered secret)."""
    problems = tuple(Problem(p.check, p.verdict, redact(p.detail), redact(p.next_step)) for p in problems)
    if kind == "recovered":
        lasted = f" after {ago(at - since)}" if since is not None else ""
        text = f"ingest on {host} has recovered: healthy again{lasted} (was {previous})."
    elif kind == "test":
        text = f"ingest on {host}: test message; this channel works. The verdict is {verdict}."
    elif kind == "action":
        text = f"ingest on {host}, watchdog: {note}"
    else:
        still = f"still {verdict}" if kind == "repeat" else f"{verdict}"
        lasted = f" for {ago(at - since)}" if kind == "repeat" and since is not None else ""
        was = f" (was {previous})" if previous else " (first verdict since the watchdog started)"
        text = f"ingest on {host} is {still.upper() if kind != 'repeat' else still}{lasted}{was}."
        if problems:
            text += " " + " ".join(f"{p.check}: {p.detail}." for p in problems[:4])
            if len(problems) > 4:
                text += f" (and {len(problems) - 4} more)"
            first = next((p.next_step for p in problems if p.next_step), "")
            if first:
                text += f" Next: {first}."
    text += f" Database {database}."
    return Message(kind, verdict, previous, redact(text), problems, host, database, at)


# ------------------------------------------------------------------ the state machine (pure)


@dataclass(frozen=True)
class AlertState:
    """What was announced last (None: nothing yet), and a different verdict waiting to be
    confirmed. `since`: when the announced verdict began (for 'down for 3h')."""

    reported: str | None = None
    reported_at: float | None = None
    since: float | None = None
    pending: str | None = None
    pending_since: float | None = None


def advance(state: AlertState, verdict: str, now: float, settings: AlertSettings) -> tuple[AlertState, str | None]:
    """The next state, and the kind of message to send now (None: nothing).

    The first verdict ever confirmed is announced only when it is not healthy (a watchdog that
    starts on a healthy system says nothing; one that starts on a broken system says so)."""
    if verdict == state.reported:
        state = replace(state, pending=None, pending_since=None)
        due = settings.repeat_h > 0 and state.reported_at is not None and \
            now - state.reported_at >= settings.repeat_h * 3600
        if verdict == "down" and due:
            return replace(state, reported_at=now), "repeat"
        return state, None
    if state.pending != verdict:
        state = replace(state, pending=verdict, pending_since=now)
    if now - state.pending_since < settings.confirm_s:
        return state, None
    kind = None
    if verdict == "healthy":
        kind = "recovered" if state.reported is not None else None
    else:
        kind = "alert"
    return AlertState(verdict, now, state.pending_since, None, None), kind


def state_from_history(conn) -> AlertState:
    """Where the state machine starts: the last announced verdict in alert_messages (none yet
    in a file no v012 ingest has migrated)."""
    if "alert_messages" not in backend_of(conn).tables(conn):
        return AlertState()
    row = conn.execute(f"SELECT verdict, at FROM alert_messages WHERE kind IN ({', '.join('?' * len(ANNOUNCED))})"
                       " ORDER BY id DESC LIMIT 1", ANNOUNCED).fetchone()
    if row is None:
        return AlertState()
    return AlertState(row[0], row[1], row[1])


# ------------------------------------------------------------------ channels


class DeliveryError(Exception):
    """One failed try (the message says why, without the URL: a webhook URL is a secret)."""


def _host_of(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


@dataclass
class WebhookChannel:
    url: str = field(repr=False)
    timeout_s: float = 10.0
    name = "webhook"

    @property
    def target(self) -> str:
        return _host_of(self.url)

    def send(self, message: Message) -> None:
        try:
            response = requests.post(self.url, json=message.to_json(), timeout=self.timeout_s)
        except requests.RequestException as e:
            raise DeliveryError(f"{self.target}: {type(e).__name__}") from None
        if not 200 <= response.status_code < 300:
            raise DeliveryError(f"{self.target}: HTTP {response.status_code}")


@dataclass
class EmailChannel:
    settings: AlertSettings = field(repr=False)
    name = "email"

    @property
    def target(self) -> str:
        return ", ".join(self.settings.email_to)

    def send(self, message: Message) -> None:
        s = self.settings
        mail = EmailMessage()
        mail["Subject"] = message.subject
        mail["From"] = s.email_from
        mail["To"] = ", ".join(s.email_to)
        body = message.text + "\n\n" + "\n".join(
            f"- {p.verdict.upper()} {p.check}: {p.detail}" + (f"\n  next: {p.next_step}" if p.next_step else "")
            for p in message.problems)
        mail.set_content(body.rstrip() + "\n")
        try:
            with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.timeout_s) as smtp:
                if s.smtp_starttls:  # the server's certificate and name are checked
                    smtp.starttls(context=ssl.create_default_context(cafile=s.smtp_ca_file))
                if s.smtp_user:
                    smtp.login(s.smtp_user, s.smtp_password)
                smtp.send_message(mail)
        except (OSError, smtplib.SMTPException) as e:
            raise DeliveryError(f"{s.smtp_host}:{s.smtp_port}: {type(e).__name__}: {redact(str(e))[:160]}") from None


@dataclass
class CommandChannel:
    argv: list
    timeout_s: float = 10.0
    name = "command"

    @property
    def target(self) -> str:
        return self.argv[0] if self.argv else "?"

    def send(self, message: Message) -> None:
        try:
            done = subprocess.run(self.argv, input=json.dumps(message.to_json()), text=True, capture_output=True,
                                  timeout=self.timeout_s)
        except (OSError, subprocess.SubprocessError) as e:
            raise DeliveryError(f"{self.target}: {type(e).__name__}: {redact(str(e))[:160]}") from None
        if done.returncode != 0:
            tail = redact(done.stderr.strip().splitlines()[-1][:160]) if done.stderr.strip() else ""
            raise DeliveryError(f"{self.target} exited {done.returncode}" + (f": {tail}" if tail else ""))


def channels_from(settings: AlertSettings) -> list:
    out: list = [WebhookChannel(url, settings.timeout_s) for url in settings.webhook_urls]
    if settings.email_to:
        out.append(EmailChannel(settings))
    if settings.command:
        out.append(CommandChannel(list(settings.command), settings.timeout_s))
    return out


@dataclass(frozen=True)
class Delivery:
    channel: str
    target: str
    result: str        # sent | failed
    attempts: int
    error: str | None


def deliver(channel, message: Message, attempts: int, backoff_s: float, sleep=time.sleep,
            stop: threading.Event | None = None) -> Delivery:
    """Try up to `attempts` times, waiting backoff_s, 2 x backoff_s ... between tries."""
    error = None
    for attempt in range(1, attempts + 1):
        try:
            channel.send(message)
            return Delivery(channel.name, channel.target, "sent", attempt, None)
        except DeliveryError as e:
            error = str(e)
            log.warning("alert via %s failed (try %d of %d): %s", channel.name, attempt, attempts, error)
        if attempt < attempts:
            if stop is not None and stop.is_set():
                return Delivery(channel.name, channel.target, "failed", attempt, error)
            sleep(backoff_s * 2 ** (attempt - 1))
    return Delivery(channel.name, channel.target, "failed", attempts, error)


# ------------------------------------------------------------------ recording


def record_message(conn, message: Message) -> int:
    with transaction(conn):
        return insert_message(conn, message)


def insert_message(conn, message: Message) -> int:
    cur = conn.execute(
        "INSERT INTO alert_messages (at, kind, verdict, previous, text, payload) VALUES (?, ?, ?, ?, ?, ?)"
        " RETURNING id",
        (message.at, message.kind, message.verdict, message.previous, message.text,
         json.dumps(message.to_json(), separators=(",", ":"))))
    return cur.fetchone()[0]


def record_delivery(conn, message_id: int | None, message: Message, delivery: Delivery, now: float) -> None:
    conn.execute(
        "INSERT INTO alerts (at, message_id, kind, verdict, channel, target, result, attempts, error, text)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (now, message_id, message.kind, message.verdict, delivery.channel, delivery.target, delivery.result,
         delivery.attempts, delivery.error, message.text))


def recent_alerts(conn, limit: int = 20) -> list[dict]:
    """The newest messages, each with its deliveries (what `ingest alerts` lists)."""
    messages = [dict(r) for r in conn.execute(
        "SELECT id, at, kind, verdict, previous, text FROM alert_messages ORDER BY id DESC LIMIT ?", (limit,))]
    for m in messages:
        m["deliveries"] = [dict(r) for r in conn.execute(
            "SELECT at, channel, target, result, attempts, error FROM alerts WHERE message_id = ? ORDER BY id",
            (m["id"],))]
    return messages


def last_message(conn) -> dict | None:
    """The newest message with its deliveries (ingest status's alerts line)."""
    found = recent_alerts(conn, 1)
    return found[0] if found else None


def failed_deliveries(conn, since: float) -> list[dict]:
    return [dict(r) for r in conn.execute(
        "SELECT at, kind, channel, target, attempts, error FROM alerts WHERE result = 'failed' AND at >= ?"
        " ORDER BY id DESC", (since,))]


# ------------------------------------------------------------------ the outbox thread


class Outbox:
    """Messages in, deliveries out: `put()` never blocks the caller. One thread sends each message
    to every channel (retries with backoff); a second records the message, its deliveries and
    any row that goes with it, retrying while the database is locked. A foreign holder of the
    write lock is exactly when an alert matters: it is sent at once and recorded once the lock
    is free, and the messages after it are not held up."""

    RECORD_TRIES = 120   # ~ 10 minutes of a locked database (busy timeout + 1 s apart)

    def __init__(self, connect, channels: list, settings: AlertSettings, *, sleep=time.sleep):
        self._connect = connect
        self.channels = channels
        self.settings = settings
        self._sleep = sleep
        self._outgoing: queue.Queue = queue.Queue()
        self._records: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, daemon=True, name="alerts-send")
        self._recorder = threading.Thread(target=self._record_loop, daemon=True, name="alerts-record")
        self._conn = None

    def start(self) -> "Outbox":
        self._sender.start()
        self._recorder.start()
        return self

    def put(self, message: Message, record=None) -> None:
        """Queue a message; `record(conn)`, if given, is written in the same transaction as the
        message's rows (the watchdog's action row: its loop never writes to the database)."""
        self._outgoing.put((message, record))

    def close(self, timeout: float = 5.0) -> None:
        self._outgoing.put(None)
        self._sender.join(timeout)
        self._recorder.join(timeout)
        self.stop.set()

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until everything queued so far is sent and recorded (tests, `ingest alerts test`)."""
        done = threading.Event()
        self._outgoing.put(done)
        done.wait(timeout)

    def _send_loop(self) -> None:
        while True:
            item = self._outgoing.get()
            if item is None or isinstance(item, threading.Event):
                self._records.put(item)   # in order: set (or stop) once the records before it are written
                if item is None:
                    return
                continue
            message, record = item
            try:
                log.info("alert %s: %s", message.kind, message.text)
                deliveries = [(deliver(channel, message, self.settings.attempts, self.settings.backoff_s,
                                       self._sleep, self.stop), time.time()) for channel in self.channels]
            except Exception as e:  # the outbox must outlive any one message
                log.error("could not send alert %s: %s", message.kind, redact(str(e)))
                deliveries = []
            self._records.put((message, record, deliveries))

    def _record_loop(self) -> None:
        while True:
            item = self._records.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            self._with_db(lambda conn: write_records(conn, *item))

    def _with_db(self, write):
        from .errors import IngestError

        for attempt in range(self.RECORD_TRIES):
            try:
                if self._conn is None:
                    self._conn = self._connect()
                return write(self._conn)
            except Exception as e:  # a database error of either store, or one of ours
                ours = isinstance(e, IngestError)
                if not ours and (self._conn is None or not isinstance(e, backend_of(self._conn).errors)):
                    raise
                if attempt == self.RECORD_TRIES - 1 or self.stop.is_set():
                    log.error("could not record an alert: %s", e)
                    return None
                self._sleep(1.0)
        return None


def write_records(conn, message: Message, record, deliveries: list) -> None:
    """One transaction: the row that goes with the message (an action), the message, its deliveries."""
    with transaction(conn):
        if record is not None:
            record(conn)
        message_id = insert_message(conn, message)
        for delivery, at in deliveries:
            record_delivery(conn, message_id, message, delivery, at)


def host_name() -> str:
    return socket.gethostname()
