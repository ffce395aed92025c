"""`ingest analyze` commands (placeholder until its issue lands)."""

commands = []
