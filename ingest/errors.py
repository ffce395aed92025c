"""Errors that end a command, and the exit codes operators and supervisord see.

Exit codes (documented in README.md):
  0  success / healthy
  1  failure, or "degraded" for status commands
  2  usage error (click), or "down" for status commands
  3  configuration error (bad config file, bad query, missing key)
  4  database error (cannot open, read-only, not SQLite, newer schema)
  5  lease lost: another process holds our lease now
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_DATABASE = 4
EXIT_LEASE_LOST = 5


class IngestError(Exception):
    """An error with a one-line message meant for an operator."""

    exit_code = EXIT_FAILURE


class ConfigError(IngestError):
    exit_code = EXIT_CONFIG


class StoreError(IngestError):
    exit_code = EXIT_DATABASE
