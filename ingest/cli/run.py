"""`ingest run` commands (placeholder until its issue lands)."""

commands = []
