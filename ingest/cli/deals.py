"""`ingest deals` commands (placeholder until its issue lands)."""

commands = []
