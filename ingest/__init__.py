"""ingest: Keepa deals into SQLite, coordinated by lease rows and a shared token ledger."""

__version__ = "0.1.0"
