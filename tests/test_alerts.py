"""Alerts: the verdict-change state machine with an injected clock, and each channel against a
real receiver on loopback (an HTTP server, an SMTP server from aiosmtpd, a real command)."""

import json
import sys
import threading

import pytest

from ingest.alerts import (AlertSettings, AlertState, CommandChannel, EmailChannel, Outbox, Problem,
                           WebhookChannel, advance, compose, deliver, recent_alerts, state_from_history)
from ingest.errors import ConfigError
from ingest.logs import register_secret
from ingest.settings import parse, problems
from ingest.store import open_db

from .webhook_sink import WebhookSink

SETTINGS = AlertSettings(confirm_s=60, repeat_h=6)
T0 = 1_700_000_000.0


def run(verdicts_at: list[tuple[float, str]], settings=SETTINGS, state=None) -> list[tuple[float, str, str]]:
    """Feed (seconds after T0, verdict) observations; returns (t, kind, verdict) of each message."""
    state = state or AlertState()
    sent = []
    for t, verdict in verdicts_at:
        state, kind = advance(state, verdict, T0 + t, settings)
        if kind:
            sent.append((t, kind, verdict))
    return sent


def every(step: float, until: float, verdict_of) -> list[tuple[float, str]]:
    return [(t, verdict_of(t)) for t in [i * step for i in range(int(until / step) + 1)]]


# ---------------------------------------------------------------- the state machine


def test_a_healthy_start_says_nothing_and_a_down_state_is_announced_once_after_confirm_s():
    sent = run(every(5, 600, lambda t: "healthy" if t < 100 else "down"))
    assert sent == [(160, "alert", "down")]   # held 60 s (100 -> 160), then once


def test_flapping_shorter_than_confirm_s_sends_nothing():
    sent = run(every(5, 1200, lambda t: "down" if (t // 30) % 2 else "healthy"))   # 30 s on, 30 s off
    assert sent == []


def test_recovered_follows_once_healthy_again_for_confirm_s():
    sent = run(every(5, 1000, lambda t: "down" if 100 <= t < 400 else "healthy"))
    assert sent == [(160, "alert", "down"), (460, "recovered", "healthy")]


def test_down_is_repeated_every_repeat_h_and_degraded_is_not():
    down = run(every(60, 13 * 3600, lambda t: "down"))
    assert [(t, k) for t, k, _ in down] == [(60, "alert"), (60 + 6 * 3600, "repeat"), (60 + 12 * 3600, "repeat")]
    degraded = run(every(60, 13 * 3600, lambda t: "degraded"))
    assert [k for _, k, _ in degraded] == ["alert"]
    never = run(every(60, 13 * 3600, lambda t: "down"), settings=AlertSettings(confirm_s=60, repeat_h=0))
    assert [k for _, k, _ in never] == ["alert"]


def test_each_change_of_verdict_is_one_message():
    plan = {0: "healthy", 100: "degraded", 300: "down", 500: "degraded", 700: "healthy"}
    sent = run(every(5, 900, lambda t: plan[max(k for k in plan if k <= t)]))
    assert [(k, v) for _, k, v in sent] == [("alert", "degraded"), ("alert", "down"), ("alert", "degraded"),
                                            ("recovered", "healthy")]


def test_confirm_s_zero_announces_at_once():
    sent = run([(0, "healthy"), (5, "down"), (10, "healthy")], settings=AlertSettings(confirm_s=0))
    assert sent == [(5, "alert", "down"), (10, "recovered", "healthy")]


def test_the_state_survives_a_restart_of_the_watchdog(db_path):
    conn = open_db(db_path)
    with WebhookSink() as sink:
        outbox = Outbox(lambda: open_db(db_path), [WebhookChannel(sink.url)], AlertSettings()).start()
        outbox.put(compose("alert", "down", "healthy", (), host="h", database="d", at=T0))
        outbox.drain()
        outbox.close()
    state = state_from_history(conn)
    assert state.reported == "down"
    # still down after the restart: no second alert (only the repeat, repeat_h after the first)
    assert run([(10, "down"), (3600, "down")], state=state) == []
    assert run([(6 * 3600, "down")], state=state) == [(6 * 3600, "repeat", "down")]


# ---------------------------------------------------------------- settings


def test_alert_settings_are_validated_like_the_rest():
    assert problems({"alerts": {"confirm_s": -1}}) == ["[alerts] confirm_s must be at least 0, not -1"]
    assert "did you mean webhooks" in problems({"alerts": {"webhoks": []}})[0]
    with pytest.raises(ConfigError, match="email_to needs smtp_host"):
        parse(AlertSettings, {"email_to": ["a@b"]}, "alerts")
    with pytest.raises(ConfigError, match="webhook URL"):
        parse(AlertSettings, {"webhooks": ["ftp://x/y"]}, "alerts")
    from ingest.settings import load_settings

    settings = load_settings({}, environ={"INGEST_ALERT_WEBHOOK": "https://hooks.example/T/secret"})
    assert settings["alerts"].webhook_urls == ["https://hooks.example/T/secret"]
    shown = {(e.section, e.key): e.value for e in settings.entries}
    assert shown[("alerts", "webhook")] == "(set)"   # the URL is its own credential


# ---------------------------------------------------------------- the message


def test_the_message_names_the_cause_and_never_the_key():
    key = "ALERTKEY-0123456789-SECRET"
    register_secret(key)
    problem = Problem("subscription", "fail", "backfill paused: Keepa subscription inactive (402)",
                      "renew the subscription")
    leaked = Problem("program backfill", "fail", f"backfill EXITED (log: GET /deal?key={key} failed)")
    message = compose("alert", "down", "healthy", (problem, leaked), host="box", database="/var/x.db", at=T0)
    payload = json.dumps(message.to_json())
    assert key not in payload
    assert "402" in message.text and "DOWN" in message.text and "renew the subscription" in message.text
    assert set(message.to_json()) == {"kind", "verdict", "previous", "text", "problems", "host", "database", "at"}
    assert set(message.to_json()["problems"][0]) == {"check", "verdict", "detail", "next_step"}


# ---------------------------------------------------------------- channels, real receivers


def test_webhook_posts_the_json_and_retries_a_failing_receiver(db_path):
    with WebhookSink(fail_first=2) as sink:
        settings = AlertSettings(attempts=4, backoff_s=0.01)
        outbox = Outbox(lambda: open_db(db_path), [WebhookChannel(sink.url, 5)], settings).start()
        outbox.put(compose("alert", "down", "healthy", (Problem("leases", "fail", "backfill lease free"),),
                           host="h", database="d", at=T0))
        outbox.drain()
        outbox.close()
    assert sink.requests == 3 and len(sink.messages) == 1
    got = sink.messages[0]
    assert got["kind"] == "alert" and got["verdict"] == "down" and got["problems"][0]["check"] == "leases"
    assert got["_content_type"] == "application/json"
    [m] = recent_alerts(open_db(db_path))
    assert [(d["channel"], d["target"], d["result"], d["attempts"]) for d in m["deliveries"]] == [
        ("webhook", "127.0.0.1", "sent", 3)]


def test_an_unreachable_webhook_is_recorded_failed_without_its_url(db_path):
    with WebhookSink() as sink:
        url = sink.url.replace("/hook", "/secret-token-path")
    # the sink is closed now: connection refused
    outbox = Outbox(lambda: open_db(db_path), [WebhookChannel(url, 2)], AlertSettings(attempts=2, backoff_s=0.01))
    outbox.start()
    outbox.put(compose("alert", "down", "healthy", (), host="h", database="d", at=T0))
    outbox.drain()
    outbox.close()
    [m] = recent_alerts(open_db(db_path))
    [d] = m["deliveries"]
    assert d["result"] == "failed" and d["attempts"] == 2 and "secret-token-path" not in (d["error"] + d["target"])


def test_email_reaches_a_real_smtp_server():
    from aiosmtpd.controller import Controller

    received = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            received.append(envelope)
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        settings = AlertSettings(email_to=["ops@example.org"], email_from="ingest@box", smtp_host="127.0.0.1",
                                 smtp_port=port)
        message = compose("alert", "down", "healthy", (Problem("subscription", "fail", "paused (402)", "renew"),),
                          host="box", database="d", at=T0)
        delivery = deliver(EmailChannel(settings), message, attempts=1, backoff_s=0)
    finally:
        controller.stop()
    assert delivery.result == "sent", delivery
    [mail] = received
    assert mail.rcpt_tos == ["ops@example.org"] and mail.mail_from == "ingest@box"
    body = mail.content.decode()
    assert "Subject: [ingest box] DOWN" in body and "paused (402)" in body and "next: renew" in body


def test_email_over_starttls_with_a_login(tmp_path):
    """STARTTLS, then AUTH (the server refuses AUTH before TLS), against aiosmtpd with a
    throwaway self-signed certificate."""
    import ssl
    import subprocess

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    received, logins = [], []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            received.append(envelope)
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=(auth_data.login, auth_data.password) == (b"ingest", b"s3cret"))

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True,
                            auth_required=True, auth_require_tls=True, authenticator=authenticator)
    controller.start()
    try:
        good = AlertSettings(email_to=["ops@example.org"], smtp_host="127.0.0.1", smtp_port=port, smtp_starttls=True,
                             smtp_user="ingest", smtp_password="s3cret", smtp_ca_file=str(cert))
        message = compose("test", None, None, (), host="box", database="d", at=T0)
        assert deliver(EmailChannel(good), message, attempts=1, backoff_s=0).result == "sent"
        wrong = AlertSettings(**{**good.__dict__, "smtp_password": "nope", "timeout_s": 3.0})
        refused = deliver(EmailChannel(wrong), message, attempts=1, backoff_s=0)
        plain = AlertSettings(**{**good.__dict__, "smtp_starttls": False})
        no_tls = deliver(EmailChannel(plain), message, attempts=1, backoff_s=0)
        untrusted = AlertSettings(**{**good.__dict__, "smtp_ca_file": None})   # self-signed: not trusted
        unverified = deliver(EmailChannel(untrusted), message, attempts=1, backoff_s=0)
    finally:
        controller.stop()
    assert len(received) == 1 and logins[0] == (b"ingest", b"s3cret")
    assert refused.result == "failed" and "nope" not in refused.error and len(received) == 1
    assert no_tls.result == "failed"   # the server wants TLS before AUTH: nothing sent in the clear
    assert unverified.result == "failed" and "SSLCertVerificationError" in unverified.error


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_email_to_a_closed_port_fails_with_one_line():
    settings = AlertSettings(email_to=["ops@example.org"], smtp_host="127.0.0.1", smtp_port=1, timeout_s=2)
    delivery = deliver(EmailChannel(settings), compose("test", None, None, (), host="h", database="d", at=T0),
                       attempts=2, backoff_s=0)
    assert delivery.result == "failed" and delivery.attempts == 2 and "127.0.0.1:1" in delivery.error


def test_command_gets_the_message_json_on_stdin(tmp_path):
    out = tmp_path / "got.json"
    argv = [sys.executable, "-c", f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"]
    message = compose("recovered", "healthy", "down", (), host="h", database="d", at=T0, since=T0 - 300)
    assert deliver(CommandChannel(argv), message, attempts=1, backoff_s=0).result == "sent"
    got = json.loads(out.read_text())
    assert got["kind"] == "recovered" and got["previous"] == "down" and "recovered" in got["text"]
    failing = CommandChannel([sys.executable, "-c", "import sys; sys.stderr.write('no route\\n'); sys.exit(4)"])
    delivery = deliver(failing, message, attempts=1, backoff_s=0)
    assert delivery.result == "failed" and delivery.error.endswith("exited 4: no route")


def test_a_slow_channel_never_blocks_put(db_path):
    release = threading.Event()

    class Slow:
        name, target = "command", "slow"

        def send(self, message):
            release.wait(10)

    outbox = Outbox(lambda: open_db(db_path), [Slow()], AlertSettings()).start()
    import time

    began = time.monotonic()
    for _ in range(5):
        outbox.put(compose("test", None, None, (), host="h", database="d", at=T0))
    assert time.monotonic() - began < 0.5
    release.set()
    outbox.drain()
    outbox.close()
    assert len(recent_alerts(open_db(db_path))) == 5


# ---------------------------------------------------------------- what the problems say, the CLI


def test_a_program_that_exited_on_a_bad_key_is_named_with_its_exit_meaning():
    from ingest.alerts import problems_of
    from ingest.verdicts import Check, HealthReport

    report = HealthReport("down", ["supervisor: not running: backfill EXITED"],
                          [Check("supervisor", "fail", "not running: backfill EXITED", "supervisorctl start")])
    programs = {"backfill": {"state": "EXITED", "exitstatus": 3, "spawnerr": "",
                             "last_error": "ERROR ingest.worker: configuration error: deal: HTTP 400 invalidAccessKey"},
                "upsert": {"state": "RUNNING", "exitstatus": 0, "spawnerr": ""}}
    problems = problems_of(report, programs)
    assert [p.check for p in problems] == ["supervisor", "program backfill"]
    assert problems[1].detail == ("backfill EXITED (exit 3: configuration error; log: ERROR ingest.worker:"
                                  " configuration error: deal: HTTP 400 invalidAccessKey)")


def test_alerts_test_sends_to_every_channel_and_alerts_lists_it(tmp_path):
    from click.testing import CliRunner

    from ingest.cli import main

    from ingest.store import open_db

    db = str(tmp_path / "x.db")
    open_db(db).close()  # no command but a worker creates a database
    runner = CliRunner()
    none = runner.invoke(main, ["--db", db, "alerts", "test"])
    assert none.exit_code == 1 and "no alert channel configured" in none.output
    with WebhookSink() as sink:
        sent = runner.invoke(main, ["--db", db, "alerts", "test"], env={"INGEST_ALERT_WEBHOOK": sink.url})
    assert sent.exit_code == 0, sent.output
    assert "webhook 127.0.0.1: sent after 1 attempt(s)" in sent.output and sink.kinds() == ["test"]
    assert "/hook" not in sent.output   # the URL is a credential: its host only
    listed = json.loads(runner.invoke(main, ["--db", db, "alerts", "--json"]).output)
    assert listed[0]["kind"] == "test" and listed[0]["deliveries"][0]["result"] == "sent"
    screen = runner.invoke(main, ["--db", db, "alerts"]).output
    assert "test" in screen and "webhook 127.0.0.1: sent after 1 attempt(s)" in screen
