"""Every setting ingest reads: declared once, typed, range-checked, with where it came from.

A section of the config file is a frozen dataclass whose fields are declared with `setting()`:
the default, the type, the range and a line of doc. `parse(cls, table)` checks a table against
it (unknown keys refused with the nearest known name, wrong types, values out of range) and then
builds the dataclass, whose `__post_init__` checks the rules between fields (LeaseTiming's
ttl >= 2 x renew, the ledger's min_wait <= max_wait...). `load_settings()` does that for the whole
file and the environment and returns one `Settings`, or raises one ConfigError line naming the
first problem; `check()` returns every problem for `ingest config check`.

The sections that belong to one module are declared there (LeaseTiming in leases.py,
LedgerPolicy in token_model.py, AnalyticsParams in analytics.py, WorkerSettings in
workers/base.py, JanitorSettings in workers/janitor.py); the small ones live here.
"""

import difflib
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

ENVIRONMENT = {  # variable -> (section, key); the environment wins over the file
    "INGEST_DB": ("store", "db"),
    "KEEPA_API_KEY": ("keepa", "api_key"),
    "KEEPA_BASE_URL": ("keepa", "base_url"),
    "INGEST_QUERY": ("backfill", "query"),
    "INGEST_ALERT_WEBHOOK": ("alerts", "webhook"),
    "INGEST_SMTP_PASSWORD": ("alerts", "smtp_password"),
}
# shown as "(set)": a webhook URL carries its own credential
SECRET_KEYS = {("keepa", "api_key"), ("alerts", "webhooks"), ("alerts", "webhook"), ("alerts", "smtp_password")}


@dataclass(frozen=True)
class Rule:
    """What one key accepts. `kind` is int, float, bool, str, list (of str) or dict (a table);
    a tuple of kinds accepts any of them. Bounds are inclusive unless `above`/`below` are used."""

    kind: Any
    doc: str = ""
    min: float | None = None
    max: float | None = None
    above: float | None = None   # exclusive lower bound
    choices: tuple = ()
    optional: bool = False       # None (absent) is allowed


def setting(default, doc: str = "", *, kind=None, min=None, max=None, above=None, choices=(), optional=False):
    """A dataclass field that is also a setting (see Rule)."""
    rule = Rule(kind or type(default), doc, min, max, above, tuple(choices), optional or default is None)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def rules(cls) -> dict[str, Rule]:
    return {f.name: f.metadata["rule"] for f in fields(cls) if "rule" in f.metadata}


# ------------------------------------------------------------------ checking one value

_KIND_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text",
               list: "a list of text", dict: "a table"}


def _kind_ok(value, kind) -> bool:
    if isinstance(kind, tuple):
        return any(_kind_ok(value, k) for k in kind)
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def check_value(where: str, value, rule: Rule):
    """The value as the program uses it (ints widened to float where a float is wanted), or
    ConfigError naming the key, what it must be and what it is."""
    if value is None and rule.optional:
        return None
    kinds = rule.kind if isinstance(rule.kind, tuple) else (rule.kind,)
    if not _kind_ok(value, rule.kind):
        want = " or ".join(_KIND_WORDS.get(k, k.__name__) for k in kinds)
        raise ConfigError(f"{where} must be {want}, not {_shown(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, not {value!r}")
        if rule.above is not None and not value > rule.above:
            raise ConfigError(f"{where} must be more than {rule.above:g}, not {value!r}")
        if rule.min is not None and value < rule.min:
            raise ConfigError(f"{where} must be at least {rule.min:g}, not {value!r}")
        if rule.max is not None and value > rule.max:
            raise ConfigError(f"{where} must be at most {rule.max:g}, not {value!r}")
        if float in kinds and int not in kinds:
            value = float(value)
    if rule.choices and value not in rule.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, rule.choices))}, not {_shown(value)}")
    if isinstance(value, str) and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ConfigError(f"{where} contains a control character (a CR from a file saved on Windows?)")
    return value


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def nearest(name: str, known) -> str:
    """' (did you mean X?)' for the closest known name, or ''."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def unknown_key(section: str, key: str, known) -> ConfigError:
    return ConfigError(f"unknown setting [{section}] {key}{nearest(key, known)}")


def parse(cls, table: dict | None, section: str, *, extra: dict[str, Rule] | None = None):
    """Build `cls` from one config table. Unknown keys, wrong types and values out of range
    raise ConfigError naming the key; the dataclass's own checks run last."""
    table = table if table is not None else {}
    if not isinstance(table, dict):
        raise ConfigError(f"config section [{section}] must be a table")
    known = rules(cls)
    allowed = {**known, **(extra or {})}
    values = {}
    for key, value in table.items():
        if key not in allowed:
            raise unknown_key(section, key, allowed)
        checked = check_value(f"[{section}] {key}", value, allowed[key])
        if key in known:
            values[key] = checked
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"[{section}] {e}" if not str(e).startswith("[") else str(e)) from None


# ------------------------------------------------------------------ the small sections


def check_base_url(url: str) -> str:
    """http(s)://host[:port][/path], nothing else: a bad URL is a config error, not a retry loop."""
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise ConfigError("Keepa base URL contains a space or control character (a CR from a file saved on Windows?)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"Keepa base URL must start with http:// or https:// (got scheme {parts.scheme or 'none'!r})")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError("Keepa base URL has a port outside 1-65535") from None
    if not parts.hostname or port == 0:
        raise ConfigError("Keepa base URL must name a host (and a port in 1-65535, if any)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError("Keepa base URL must not carry a query, fragment or credentials")
    return url.rstrip("/")


KEEPA_DOMAINS = (1, 2, 3, 4, 5, 6, 8, 9, 10, 11)
DEFAULT_BASE_URL = "https://api.keepa.com"


@dataclass(frozen=True)
class StoreSettings:
    db: str | None = setting(None, "SQLite file (else var/ingest.db); env INGEST_DB, --db", kind=str)

    def __post_init__(self):
        if self.db is not None and not self.db.strip():
            raise ConfigError("db must not be empty (leave it out for var/ingest.db)")


@dataclass(frozen=True)
class KeepaSettings:
    api_key: str | None = setting(None, "Keepa API key; env KEEPA_API_KEY (preferred)", kind=str)
    base_url: str = setting(DEFAULT_BASE_URL, "API base URL; env KEEPA_BASE_URL")
    domain: int = setting(1, "marketplace (1 .com, 2 .co.uk, 3 .de ...)", choices=KEEPA_DOMAINS)
    connect_timeout_s: float = setting(10.0, "TCP connect timeout", above=0, max=120)
    read_timeout_s: float = setting(60.0, "timeout of each read", above=0, max=600)
    deadline_s: float = setting(30.0, "one HTTP attempt, connect to last byte, is abandoned after this"
                                " (well under supervisord's stopwaitsecs = 90)", above=0, max=600)
    max_body_mb: float = setting(64.0, "a response body (decoded, gzip included) larger than this is abandoned",
                                 above=0, max=4096)

    def __post_init__(self):
        object.__setattr__(self, "base_url", check_base_url(self.base_url))
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key must not be empty")


@dataclass(frozen=True)
class HealthSettings:
    stall_minutes: float = setting(10.0, "no commit for this long while tokens are available: stalled",
                                   above=0, max=7 * 24 * 60)


@dataclass(frozen=True)
class QuerySetting:
    """[backfill] query: the deal query as an inline table, or the path of a JSON file."""

    query: dict | str | None = setting(None, "deal query: inline table or JSON file path; env INGEST_QUERY",
                                       kind=(dict, str))


# ------------------------------------------------------------------ the whole file


def _sections() -> dict[str, type]:
    """Section name -> its dataclass (imported here, late, to keep imports one-way)."""
    from .alerts import AlertSettings
    from .analytics import AnalyticsParams
    from .backup import BackupSettings
    from .leases import LeaseTiming
    from .metrics import MetricsSettings
    from .retention import RetentionSettings
    from .token_model import LedgerPolicy
    from .watch import WatchSettings
    from .workers.backfill import BackfillSettings
    from .workers.base import WorkerSettings
    from .workers.janitor import JanitorSettings
    from .workers.upsert import UpsertSettings

    return {  # one section per line
        "store": StoreSettings,
        "keepa": KeepaSettings,
        "leases": LeaseTiming,
        "ledger": LedgerPolicy,
        "worker": WorkerSettings,
        "backfill": BackfillSettings,
        "upsert": UpsertSettings,
        "janitor": JanitorSettings,
        "analytics": AnalyticsParams,
        "health": HealthSettings,
        "metrics": MetricsSettings,
        "backup": BackupSettings,
        "retention": RetentionSettings,
        "watch": WatchSettings,
        "alerts": AlertSettings,
    }


def section_extra(name: str) -> dict[str, Rule]:
    """Keys a section accepts beyond its own: [backfill] and [upsert] override [worker] keys,
    and [backfill] holds the query both workers use."""
    from .workers.base import WorkerSettings

    if name in ("backfill", "upsert"):
        extra = dict(rules(WorkerSettings))
        if name == "backfill":
            extra.update(rules(QuerySetting))
        return extra
    return {}


@dataclass(frozen=True)
class Entry:
    section: str
    key: str
    value: Any
    source: str  # 'default', 'file', 'environment (NAME)'


@dataclass(frozen=True)
class Settings:
    """The whole validated config: one dataclass per section, plus where each value came from."""

    sections: dict
    entries: tuple
    raw: dict  # the file's tables with the environment applied (what modules' from_config read)

    def __getitem__(self, name: str):
        return self.sections[name]


def with_environment(config: dict, environ=None) -> tuple[dict, dict[tuple[str, str], str]]:
    """The config with ENVIRONMENT applied, and {(section, key): variable} for what it set."""
    environ = os.environ if environ is None else environ
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    sources = {}
    for variable, (section, key) in ENVIRONMENT.items():
        value = environ.get(variable)
        if value:
            table = merged.setdefault(section, {})
            if isinstance(table, dict):
                table[key] = value
                sources[(section, key)] = variable
    return merged, sources


def problems(config: dict, environ=None) -> list[str]:
    """Every problem in the config (one line each); [] when it is valid."""
    return _load(config, environ)[1]


def _load(config: dict, environ=None) -> tuple[Settings | None, list[str]]:
    merged, env_sources = with_environment(config, environ)
    known = _sections()
    found, built = [], {}
    for name in merged:
        if name not in known:
            found.append(f"unknown config section [{name}]{nearest(name, known)}")
    for name, cls in known.items():
        try:
            built[name] = parse(cls, merged.get(name), name, extra=section_extra(name))
        except ConfigError as e:
            found.append(str(e))
    for name in ("backfill", "upsert"):  # the [worker] keys they override, checked in context
        if name in built and "worker" in built:
            try:
                worker_settings(merged, name)
            except ConfigError as e:
                found.append(str(e))
    if found:
        return None, found
    entries = []
    for name, cls in known.items():
        table = merged.get(name) or {}
        for key in rules(cls):
            if key in table:
                variable = env_sources.get((name, key))
                source = f"environment ({variable})" if variable else "file"
            else:
                source = "default"
            value = getattr(built[name], key)
            if (name, key) in SECRET_KEYS and value not in (None, [], ""):
                value = "(set)"
            entries.append(Entry(name, key, value, source))
        for key in section_extra(name):
            if key in table:  # [backfill] query, and [worker] keys overridden per worker
                variable = env_sources.get((name, key))
                entries.append(Entry(name, key, table[key], f"environment ({variable})" if variable else "file"))
    return Settings(built, tuple(entries), merged), []


def worker_settings(config: dict, worker: str):
    """[worker] with [backfill]/[upsert] overriding it, for one worker."""
    from .workers.base import WorkerSettings

    shared = config.get("worker") or {}
    own = {k: v for k, v in (config.get(worker) or {}).items() if k in rules(WorkerSettings)}
    return parse(WorkerSettings, {**shared, **own}, worker)


def load_settings(config: dict, environ=None) -> Settings:
    """The validated settings, or ConfigError: the first problem, and how many more."""
    settings, found = _load(config, environ)
    if found:
        more = f" (and {len(found) - 1} more: ingest config check lists them)" if len(found) > 1 else ""
        raise ConfigError(f"bad config: {found[0]}{more}")
    return settings
