"""The long-running workers: backfill and upsert (with the janitor)."""
