"""`ingest status` commands (placeholder until its issue lands)."""

commands = []
