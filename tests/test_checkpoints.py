"""Checkpoints as typed records, on a real migrated database: what older versions stored loads."""

import json

import pytest

from ingest import checkpoints
from ingest.checkpoints import BackfillCursor, UpsertWatermark
from ingest.deals import Listing, WriteContext
from ingest.store import open_db, transaction


@pytest.fixture
def conn(db_path):
    return open_db(db_path)


def store_raw(conn, name: str, value: dict) -> None:
    with transaction(conn):
        conn.execute("INSERT INTO checkpoints (name, value, updated_at, fence) VALUES (?, ?, 1, 1)",
                     (name, json.dumps(value)))


def test_backfill_cursor_stored_by_the_previous_version_loads(conn):
    # the exact shape the dict-based worker wrote
    store_raw(conn, "backfill", {
        "query": "q1", "pass": 3, "page": 2, "pass_started_at": 100.0,
        "pending": [{"asin": "A1", "title": "t", "category": 5, "sales_rank": 9, "used_price_cents": 100,
                     "new_price_cents": None, "last_update": 77}],
        "last_page": True, "next_pass_at": None, "last_complete_pass_started_at": 50.0})
    cursor = checkpoints.load_backfill(conn)
    assert cursor == BackfillCursor(query="q1", pass_number=3, page=2, pass_started_at=100.0,
                                    pending=(Listing("A1", "t", 5, 9, 100, None, 77),), last_page=True,
                                    last_complete_pass_started_at=50.0)


def test_partial_old_json_takes_defaults(conn):
    store_raw(conn, "backfill", {"pass": 1, "page": 3, "pending": None})
    store_raw(conn, "upsert", {"watermark": 12, "pending": [{"asin": "B"}]})
    cursor, mark = checkpoints.load_backfill(conn), checkpoints.load_upsert(conn)
    assert (cursor.query, cursor.pending, cursor.last_complete_pass_started_at) == (None, None, None)
    assert mark == UpsertWatermark(watermark=12, at_watermark=(), pending=(Listing("B"),), next_poll_at=0.0)


def test_missing_checkpoints_load_as_none(conn):
    assert checkpoints.load_backfill(conn) is None and checkpoints.load_upsert(conn) is None


def test_saved_checkpoints_round_trip_with_the_same_json_keys(conn):
    cursor = BackfillCursor(query="q", pass_number=2, page=4, pass_started_at=10.0, pending=(Listing("X", last_update=3),),
                            next_pass_at=99.0)
    mark = UpsertWatermark(watermark=5, at_watermark=("X", "Y"), pending=(), next_poll_at=60.0)
    with transaction(conn):
        ctx = WriteContext("backfill", 7, 1000.0, "backfill")
        checkpoints.save(conn, ctx, cursor)
        checkpoints.save(conn, ctx, mark)
    assert checkpoints.load_backfill(conn) == cursor and checkpoints.load_upsert(conn) == mark
    raw = json.loads(conn.execute("SELECT value FROM checkpoints WHERE name = 'backfill'").fetchone()[0])
    # the checkpoint_progress view and older readers use these keys
    assert set(raw) == {"query", "pass", "page", "pass_started_at", "pending", "last_page", "next_pass_at",
                        "last_complete_pass_started_at"}
    assert tuple(conn.execute("SELECT fence, updated_at FROM checkpoints WHERE name = 'upsert'").fetchone()) == (7, 1000.0)


def test_between_passes_only_before_the_next_pass():
    assert BackfillCursor(next_pass_at=100.0).between_passes(99.0)
    assert not BackfillCursor(next_pass_at=100.0).between_passes(100.0)
    assert not BackfillCursor().between_passes(0.0)
