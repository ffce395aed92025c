"""`ingest tokens` commands (placeholder until its issue lands)."""

commands = []
