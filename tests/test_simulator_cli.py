"""`ingest sim` as a real process: URL on the first stdout line, serves, exits 0 on signals,
one line and exit 2 on a bad flag, every knob in --help, keys never in its output."""

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

INGEST = str(Path(sys.executable).parent / "ingest")


def start_sim(*args):
    proc = subprocess.Popen([INGEST, "sim", "--port", "0", "--products", "300", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=20)
    if not line:
        proc.kill()
        pytest.fail("ingest sim printed no URL within 20 s")
    return proc, line[0].strip()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_until_signalled_and_exits_0(sig):
    proc, url = start_sim("--refill-rate", "300")
    try:
        assert url.startswith("http://127.0.0.1:")
        body = requests.get(f"{url}/token", params={"key": "k"}, timeout=10).json()
        assert body["refillRate"] == 300 and body["tokensLeft"] == 18000
        assert requests.get(f"{url}/_sim/stats", timeout=10).json()["requests"]["/token"] == 1
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_keys_never_reach_its_output():
    proc, url = start_sim("--keys", "sekritkey123", "--expired-keys", "oldkey456", "--verbose")
    try:
        assert requests.get(f"{url}/token", params={"key": "sekritkey123"}, timeout=10).status_code == 200
        assert requests.get(f"{url}/token", params={"key": "oldkey456"}, timeout=10).status_code == 402
        assert requests.get(f"{url}/token", params={"key": "other"}, timeout=10).status_code == 400
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert "/token" in err  # --verbose logs requests...
        assert "sekritkey123" not in out + err and "oldkey456" not in out + err  # ...redacted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args", [["--bogus"], ["--fault-500", "1.5"], ["--force-429", "soon"],
                                  ["--rate-change", "10"], ["--port", "99999"]])
def test_a_bad_flag_is_one_line_and_exit_2(args):
    done = subprocess.run([INGEST, "sim", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_help_documents_every_knob():
    done = subprocess.run([INGEST, "sim", "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for flag in ("--host", "--port", "--refill-rate", "--start-tokens", "--token-flow-reduction", "--seed",
                 "--products", "--keys", "--expired-keys", "--fault-500", "--fault-slow", "--slow-s",
                 "--fault-timeout", "--timeout-s", "--fault-malformed", "--fault-no-history", "--force-429",
                 "--rate-change", "--deal-updates-per-min", "--deal-new-per-min", "--deal-share",
                 "--deal-cache-s", "--verbose", "/_sim/stats", "/_sim/faults"):
        assert flag in done.stdout, flag
