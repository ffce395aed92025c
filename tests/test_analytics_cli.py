"""`ingest analyze` as an operator runs it: the real command in a subprocess."""

import json
import subprocess

import pytest

from tests.conftest import INGEST
from tests.test_analytics import DAY, N, build, many_sales, one_sale

NOW = "2024-06-01T00:00:00Z"


def run(*args, stdin=None):
    return subprocess.run([INGEST, "analyze", *args], input=stdin, capture_output=True, text=True, timeout=60)


@pytest.fixture
def response(tmp_path):
    accepted = one_sale(price=1500, asin="A1")
    accepted["csv"][2] += [N - DAY, 1100]
    products = [
        accepted,
        many_sales([1000, 1100, 1200, 9000]) | {"asin": "A2"},
        {"asin": "A3", "csv": None},
        build(used=[(300, 1000)], rank=[(300, 5000)], count=[(300, 2)], asin="A4"),
    ]
    path = tmp_path / "response.json"
    path.write_text(json.dumps({"products": products, "tokensLeft": 10}))
    return path


def test_json_lists_value_reason_sales_status(response):
    result = run(str(response), "--json", "--now", NOW)
    assert result.returncode == 0, result.stderr
    rows = {row["asin"]: row for row in json.loads(result.stdout)}
    assert {a: (r["value"], r["reason"], r["sales"], r["status"], r["status_reason"]) for a, r in rows.items()} == {
        "A1": (1500, "ok", 1, "accepted", "ok"),
        "A2": (1100, "ok", 3, "rejected", "not_below_average"),
        "A3": (None, "no_history", 0, "incomplete", "no_history"),
        "A4": (None, "no_sales", 0, "rejected", "no_sales"),
    }
    assert rows["A2"]["outliers"] == [9000]


def test_text_output_one_line_per_product_with_reason(response):
    result = run(str(response), "--now", NOW)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("A1  accepted: ok  avg 15.00 from 1 sale ")
    assert "incomplete: no_history" in lines[2] and "missing csv" in lines[2]


def test_stdin_and_a_single_product_object():
    product = one_sale(price=1234, asin="S1")
    result = run("-", "--json", "--now", NOW, stdin=json.dumps(product))
    assert [(r["asin"], r["value"]) for r in json.loads(result.stdout)] == [("S1", 1234)]


def test_now_fixes_the_clock(response):
    before_the_sale = run(str(response), "--json", "--now", "2024-01-01T00:00:00+00:00")
    rows = {row["asin"]: row for row in json.loads(before_the_sale.stdout)}
    assert rows["A1"]["reason"] == "no_sales"


def test_explain_prints_the_steps(response):
    result = run(str(response), "--explain", "--now", NOW)
    first = json.loads(result.stdout)[0]
    assert first["sales"][0]["price_cents"] == 1500 and first["evaluation"]["status"] == "accepted"


def test_config_section_is_used(response, tmp_path):
    config = tmp_path / "ingest.toml"
    config.write_text("[analytics]\nmin_discount_pct = 50\n")
    rows = json.loads(subprocess.run([INGEST, "--config", str(config), "analyze", str(response), "--json", "--now", NOW], capture_output=True, text=True).stdout)
    assert rows[0]["status_reason"] == "not_below_average"


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"products": [', "is not JSON"),
        ('{"tokensLeft": 5}', "neither a /product response"),
        ('{"products": 3}', "'products' is not a list"),
        ('{"products": [1]}', "product #0 is not an object"),
        ('{"error": {"type": "invalidKey", "message": "bad"}}', "a Keepa error response"),
    ],
)
def test_malformed_input_is_one_line_exit_1(text, message):
    result = run("-", "--now", NOW, stdin=text)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_unreadable_file_exits_3(tmp_path):
    result = run(str(tmp_path / "missing.json"))
    assert result.returncode == 3
    assert result.stderr.startswith("ingest: error: cannot read") and result.stderr.count("\n") == 1
    result = run(str(tmp_path))  # a directory
    assert result.returncode == 3


def test_bad_now_is_a_usage_error(response):
    result = run(str(response), "--now", "yesterday")
    assert result.returncode == 2 and "ISO" in result.stderr
