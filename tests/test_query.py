import json

import pytest
from click.testing import CliRunner

from ingest.errors import ConfigError
from ingest.query import DEFAULT_QUERY, load_query, page_selection, query_fingerprint, validate_query


def test_default_query_is_valid_and_normalised():
    query, source = load_query(None, {})
    assert source == "built-in default query"
    assert query["priceTypes"] == [2]
    assert "page" not in query


def test_price_types_scalar_becomes_list():
    assert validate_query({"priceTypes": 2})["priceTypes"] == [2]


@pytest.mark.parametrize(
    "query, message",
    [
        ([], "must be a JSON object"),
        ({"domainId": 7}, "not a Keepa domain"),
        ({"priceTypes": [1, 2]}, "priceTypes"),
        ({"currentRange": [10, 5]}, "min <= max"),
        ({"salesRankRange": "1-5"}, "salesRankRange"),
        ({"isRangeEnabled": 1}, "true or false"),
        ({"curentRange": [1, 2]}, "unknown field"),
        ({"includeCategories": ["books"]}, "list of integers"),
        ({"sortType": 9}, "sortType"),
    ],
)
def test_bad_queries_are_one_line_config_errors(query, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate_query(query)
    assert "\n" not in str(info.value)


def test_query_file_sources(tmp_path, monkeypatch):
    path = tmp_path / "q.json"
    path.write_text(json.dumps({**DEFAULT_QUERY, "currentRange": [100, 200]}))
    assert load_query(str(path), {})[0]["currentRange"] == [100, 200]
    monkeypatch.setenv("INGEST_QUERY", str(path))
    assert load_query(None, {})[1] == f"query file {path}"
    monkeypatch.delenv("INGEST_QUERY")
    assert load_query(None, {"backfill": {"query": {"priceTypes": 2}}})[1] == "config [backfill] query"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_query(str(path), {})
    with pytest.raises(ConfigError, match="No such file"):
        load_query(str(tmp_path / "missing.json"), {})


def test_fingerprint_ignores_key_order_and_page():
    a = validate_query({"priceTypes": 2, "dateRange": 1, "page": 3})
    b = validate_query({"dateRange": 1, "priceTypes": [2]})
    assert query_fingerprint(a) == query_fingerprint(b)
    assert page_selection(a, 4)["page"] == 4 and "page" not in a
