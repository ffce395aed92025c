"""`ingest leases` commands (placeholder until its issue lands)."""

commands = []
