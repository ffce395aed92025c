"""`ingest diagnose` commands (placeholder until its issue lands)."""

commands = []
