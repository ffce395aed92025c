"""The deal query (a Keepa /deal selection): loading, the built-in default, validation.

Source, first found: `--query FILE`, env INGEST_QUERY (a file path), config [backfill] query
(a file path or an inline table), else DEFAULT_QUERY. Validated at start: a bad query is a
ConfigError with one line, before any token is spent.
"""

import copy
import hashlib
import json
import os
from pathlib import Path

from .errors import ConfigError

# Like the old system's query: used books (priceTypes 2 = USED) on amazon.com, recently
# dropped in price, with a sales rank that says they sell. Sorted newest first.
DEFAULT_QUERY: dict = {
    "domainId": 1,
    "priceTypes": [2],
    "dateRange": 1,
    "sortType": 1,
    "includeCategories": [283155],
    "isRangeEnabled": True,
    "currentRange": [500, 50000],
    "salesRankRange": [1, 3000000],
    "deltaPercentRange": [10, 100],
    "isFilterEnabled": False,
    "singleVariation": True,
}

DOMAINS = {1, 2, 3, 4, 5, 6, 8, 9, 10, 11}
RANGE_FIELDS = ("currentRange", "deltaRange", "deltaPercentRange", "deltaLastRange", "salesRankRange")
BOOL_FIELDS = ("isRangeEnabled", "isFilterEnabled", "singleVariation", "isLowest", "isLowest90",
               "isLowestOffer", "isOutOfStock", "titleSearch", "hasReviews", "filterErotic",
               "mustHaveAmazonOffer", "mustNotHaveAmazonOffer", "isPrimeExclusive")
INT_LIST_FIELDS = ("includeCategories", "excludeCategories", "warehouseConditions", "material",
                   "type", "manufacturer", "brand", "productGroup", "model", "color", "size",
                   "unitType", "scent", "itemForm", "pattern", "style", "itemTypeKeyword",
                   "targetAudienceKeyword", "edition", "format", "author", "binding", "languages",
                   "brandStoreName", "brandStoreUrlName", "websiteDisplayGroup", "websiteDisplayGroupName",
                   "salesRankDisplayGroup")
KNOWN_FIELDS = {"page", "domainId", "priceTypes", "dateRange", "sortType", "minRating", "title",
                "isBackInStock", "hasAmazonOffer", *RANGE_FIELDS, *BOOL_FIELDS, *INT_LIST_FIELDS}


def validate_query(query, where: str = "query") -> dict:
    """Return a normalised copy (priceTypes as a one-element list, no page) or raise ConfigError."""
    if not isinstance(query, dict):
        raise ConfigError(f"{where}: a deal query must be a JSON object")
    unknown = sorted(set(query) - KNOWN_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    q = copy.deepcopy(query)
    q.pop("page", None)
    domain = q.setdefault("domainId", 1)
    if domain not in DOMAINS:
        raise ConfigError(f"{where}: domainId {domain!r} is not a Keepa domain ({sorted(DOMAINS)})")
    price_types = q.get("priceTypes", [2])
    if isinstance(price_types, int) and not isinstance(price_types, bool):
        price_types = [price_types]
    if not (isinstance(price_types, list) and len(price_types) == 1 and isinstance(price_types[0], int)
            and 0 <= price_types[0] <= 35):
        raise ConfigError(f"{where}: priceTypes must be one csv type 0..35 (got {q.get('priceTypes')!r})")
    q["priceTypes"] = price_types
    if q.get("dateRange", 0) not in (0, 1, 2, 3, 4):
        raise ConfigError(f"{where}: dateRange must be 0..4 (got {q['dateRange']!r})")
    if q.get("sortType", 1) not in (1, 2, 3, 4, -1, -2, -3, -4):
        raise ConfigError(f"{where}: sortType must be +-1..4 (got {q['sortType']!r})")
    for name in RANGE_FIELDS:
        if name in q:
            value = q[name]
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)
                    and value[0] <= value[1]):
                raise ConfigError(f"{where}: {name} must be [min, max] integers with min <= max (got {value!r})")
    for name in BOOL_FIELDS:
        if name in q and not isinstance(q[name], bool):
            raise ConfigError(f"{where}: {name} must be true or false (got {q[name]!r})")
    for name in ("includeCategories", "excludeCategories", "warehouseConditions"):
        if name in q and not (isinstance(q[name], list) and all(isinstance(v, int) for v in q[name])):
            raise ConfigError(f"{where}: {name} must be a list of integers")
    return q


def load_query(option: str | None, config: dict) -> tuple[dict, str]:
    """(validated query, where it came from)."""
    path = option or os.environ.get("INGEST_QUERY")
    configured = (config.get("backfill") or {}).get("query")
    if path is None and isinstance(configured, dict):
        return validate_query(configured, "config [backfill] query"), "config [backfill] query"
    if path is None and isinstance(configured, str):
        path = configured
    if path is None:
        return validate_query(DEFAULT_QUERY, "built-in default query"), "built-in default query"
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"query file {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"query file {path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    return validate_query(data, f"query file {path}"), f"query file {path}"


def query_fingerprint(query: dict) -> str:
    """Identifies a query: the backfill cursor restarts from page 0 when the query changes."""
    canonical = json.dumps(query, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def page_selection(query: dict, page: int) -> dict:
    selection = dict(query)
    selection["page"] = page
    return selection
