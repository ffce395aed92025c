"""The optional config file (TOML).

Looked up from `ingest --config PATH`, else env INGEST_CONFIG, else ./ingest.toml when it exists.
Sections are named after the module they configure: [store], [keepa], [leases], [ledger],
[backfill], [upsert], [analytics], [janitor]. Environment variables win over the file where a
module documents one (INGEST_DB, KEEPA_API_KEY, KEEPA_BASE_URL, INGEST_QUERY).
"""

import os
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_CONFIG_NAME = "ingest.toml"


def config_path(explicit: str | None = None) -> Path | None:
    if explicit:
        return Path(explicit)
    if os.environ.get("INGEST_CONFIG"):
        return Path(os.environ["INGEST_CONFIG"])
    default = Path.cwd() / DEFAULT_CONFIG_NAME
    return default if default.exists() else None


def load_config(explicit: str | None = None) -> dict[str, Any]:
    """Parse the config file; {} when there is none. A bad file is a ConfigError (one line)."""
    path = config_path(explicit)
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a TOML table")
    return data


def section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"config section [{name}] must be a table")
    return value
