"""Errors that end a command, and the exit codes operators and supervisord see.

The one table of exit codes: the constants below, `EXIT_MEANINGS` (what a worker's exit status
means, shown by `ingest status`) and `EXIT_BY_VERDICT` (what status commands exit with).
README.md documents the same table for operators.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_DATABASE = 4
EXIT_LEASE_LOST = 5

EXIT_MEANINGS = {
    EXIT_OK: "stopped cleanly",
    EXIT_FAILURE: "failed",
    EXIT_USAGE: "usage error",
    EXIT_CONFIG: "configuration error",
    EXIT_DATABASE: "database error",
    EXIT_LEASE_LOST: "lost its lease",
}

# `ingest status` and `ingest diagnose stall` exit with the verdict (ingest/verdicts.py)
EXIT_BY_VERDICT = {"healthy": EXIT_OK, "degraded": EXIT_FAILURE, "down": EXIT_USAGE}


class IngestError(Exception):
    """An error with a one-line message meant for an operator."""

    exit_code = EXIT_FAILURE


class ConfigError(IngestError):
    exit_code = EXIT_CONFIG


class StoreError(IngestError):
    exit_code = EXIT_DATABASE


class DiskFull(StoreError):
    """A write failed because the disk (or the filesystem of the database) is full; the
    transaction was rolled back whole. Workers wait and retry instead of exiting."""
