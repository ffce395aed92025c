"""Every setting is declared, typed and range-checked; a bad config is exit 3 in one line, before
any lease is taken or any Keepa call is made."""

import json
import os
import subprocess

import pytest
from click.testing import CliRunner

from ingest.cli import main
from ingest.errors import ConfigError
from ingest.settings import load_settings, problems
from ingest.token_model import LedgerPolicy
from ingest.workers.janitor import JanitorSettings
from tests.conftest import INGEST
from tests.keepa_stub import KeepaStub

# (config file text, what the one line must say): each found by trying ingest as a new user would
BAD_CONFIGS = [
    ("[janitor]\nmax_share = 5", r"\[janitor\] max_share must be at most 0.2"),
    ("[ledger]\nmin_wait_s = 100\nmax_wait_s = -5", r"\[ledger\] min_wait_s must be at most 60"),
    ("[ledger]\nmin_wait_s = 30\nmax_wait_s = 20", r"min_wait_s \(30\) must be at most max_wait_s \(20\)"),
    ("[backfil]\npass_pause_s = 1", r"unknown config section \[backfil\] \(did you mean backfill\?\)"),
    ("[ledgr]\nmin_wait_s = 1", r"unknown config section \[ledgr\] \(did you mean ledger\?\)"),
    ("[worker]\nbackoff_s = -10", r"\[worker\] backoff_s must be at least"),
    ("[worker]\nmalformed_attempts = 0", r"\[worker\] malformed_attempts must be at least 1"),
    ("[backfill]\nquery = 5", r"\[backfill\] query must be a table or text, not 5"),
    ('[worker]\nstats_days = "abc"', r"\[worker\] stats_days must be a whole number"),
    ("[worker]\nworker = 5", r"unknown setting \[worker\] worker"),
    ("[store]\ndb = 5", r"\[store\] db must be text"),
    ('[health]\nstall_minutes = "abc"', r"\[health\] stall_minutes must be a number"),
    ("[keepa]\nread_timout_s = 5", r"unknown setting \[keepa\] read_timout_s \(did you mean read_timeout_s\?\)"),
    ('[upsert]\nstart_from = "yesterday"', r"\[upsert\] start_from must be one of"),
    ("[worker]\nbackoff_s = 5\n[upsert]\nbackoff_max_s = 1", r"\[upsert\] backoff_s \(5\) must be at most backoff_max_s"),
    ("[leases]\nttl_s = 15", r"ttl_s \(15.0\) must be at least 2 x renew_s"),
    ("[ledger.workers.backfill]\nmin_share = 1.5", r"\[ledger.workers.backfill\] min_share must be at most 1"),
    ('[keepa]\nbase_url = "ftp://api.keepa.com"', r"must start with http:// or https://"),
    ("[analytics]\nwindow_days = 0", r"window_days"),
    ("worker = 5", r"config section \[worker\] must be a table"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS)
def test_config_check_refuses_each_bad_config_in_one_line(tmp_path, text, message):
    (tmp_path / "ingest.toml").write_text(text)
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "ingest.toml"), "config", "check"])
    assert result.exit_code == 3
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert __import__("re").search(message, lines[0]), lines[0]


def test_every_problem_is_listed_not_only_the_first(tmp_path):
    found = problems({"janitor": {"max_share": 5}, "ledgr": {}, "worker": {"backoff_s": -1}})
    assert len(found) == 3
    with pytest.raises(ConfigError, match=r"and 2 more: ingest config check lists them"):
        load_settings({"janitor": {"max_share": 5}, "ledgr": {}, "worker": {"backoff_s": -1}})


@pytest.mark.parametrize("text, message", BAD_CONFIGS[:12])
def test_a_worker_with_a_bad_config_exits_3_before_any_keepa_call(tmp_path, text, message):
    (tmp_path / "ingest.toml").write_text(text)
    with KeepaStub() as stub:
        env = {**os.environ, "KEEPA_API_KEY": "k" * 64, "KEEPA_BASE_URL": stub.url,
               "INGEST_CONFIG": str(tmp_path / "ingest.toml")}
        env.pop("INGEST_DB", None)
        proc = subprocess.run([INGEST, "run", "backfill", "--once"], env=env,
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert stub.requests == []
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "var").exists()  # no lease taken: the database was never opened


def test_a_valid_config_passes_and_shows_where_each_value_came_from(tmp_path, monkeypatch):
    (tmp_path / "ingest.toml").write_text("[worker]\nbackoff_s = 0.5\n[janitor]\nmax_share = 0.1\n")
    monkeypatch.setenv("KEEPA_API_KEY", "secret-key-that-never-shows")
    monkeypatch.setenv("KEEPA_BASE_URL", "http://127.0.0.1:8080")
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "ingest.toml"), "config", "check", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["problems"] == []
    by_key = {(e["section"], e["key"]): e for e in report["settings"]}
    assert by_key[("worker", "backoff_s")] == {"section": "worker", "key": "backoff_s", "value": 0.5, "source": "file"}
    assert by_key[("janitor", "grace_s")]["source"] == "default"
    assert by_key[("keepa", "base_url")]["source"] == "environment (KEEPA_BASE_URL)"
    assert by_key[("keepa", "api_key")]["value"] == "(set)"
    assert "secret-key-that-never-shows" not in result.output


@pytest.mark.parametrize("url", ["not-a-url", "ftp://api.keepa.com", "http://127.0.0.1:99999", "https://api.keepa.com\r",
                                 "http://", "https://user:pw@api.keepa.com"])
def test_a_bad_base_url_is_a_config_error(monkeypatch, url):
    monkeypatch.setenv("KEEPA_BASE_URL", url)
    with pytest.raises(ConfigError, match="base URL|control character"):
        load_settings({})


def test_status_and_diagnose_read_the_same_health_setting(tmp_path):
    config = tmp_path / "ingest.toml"
    config.write_text('[health]\nstall_minutes = "abc"\n')
    for command in (["status"], ["diagnose", "stall"]):
        result = CliRunner().invoke(main, ["--config", str(config), "--db", str(tmp_path / "x.db"), *command])
        assert result.exit_code == 3 and "stall_minutes must be a number" in result.output


def test_empty_db_option_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["--db", "", "leases"])
    assert result.exit_code == 2 and "--db needs a path" in result.output


def test_the_settings_records_are_range_checked_when_built_directly():
    with pytest.raises(ConfigError):
        LedgerPolicy(min_wait_s=10, max_wait_s=5)
    assert JanitorSettings.from_config({"janitor": {"max_share": 0.2}}).max_share == 0.2
    assert LedgerPolicy.from_config({"ledger": {"workers": {"backfill": {"min_share": 0.5}}}}).worker("backfill").min_share == 0.5
