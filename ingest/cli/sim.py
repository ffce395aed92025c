"""`ingest sim` commands (placeholder until its issue lands)."""

commands = []
