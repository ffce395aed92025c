"""The deals table helpers, on a real migrated database."""

import pytest

from ingest import deals
from ingest.store import open_db, transaction


@pytest.fixture
def conn(db_path):
    return open_db(db_path)


def ctx(now=1000.0, source="backfill"):
    return deals.WriteContext("backfill", 1, now, source)


def test_retry_backoff_doubles_caps_and_gives_up():
    backoff = deals.RetryBackoff(base_s=60, cap_s=600, max_attempts=6)
    assert [backoff.delay(n) for n in range(1, 7)] == [60, 120, 240, 480, 600, None]
    assert backoff.next_retry_at(1000, 1) == 1060 and backoff.next_retry_at(1000, 6) is None


def test_unfetched_deal_is_incomplete_with_cause_never_rejected(conn):
    listing = deals.Listing("A1", title="t", last_update=5)
    with transaction(conn):
        deals.record_unfetched(conn, ctx(), "A1", listing, "not_returned", deals.RetryBackoff())
        deals.record_unfetched(conn, ctx(2000), "A1", listing, "not_returned", deals.RetryBackoff())
    row = conn.execute("SELECT status, reason, fetch_attempts, next_retry_at, first_seen, last_seen FROM deals").fetchone()
    assert tuple(row) == ("incomplete", "not_returned", 2, 2120.0, 1000.0, 2000.0)
    assert [tuple(r) for r in conn.execute("SELECT outcome, reason FROM decisions")] == [("incomplete", "not_returned")] * 2
    assert deals.due_for_retry(conn, 2119, 10) == [] and deals.due_for_retry(conn, 2120, 10) == ["A1"]


def test_already_current_only_for_complete_deals_at_least_as_new_as_the_listing(conn):
    with transaction(conn):
        for asin, status in (("OLD", "accepted"), ("NEW", "rejected"), ("INC", "incomplete")):
            conn.execute(
                "INSERT INTO deals (asin, status, reason, first_seen, last_seen, last_fetched, deal_last_update,"
                " source, fence, writer) VALUES (?, ?, 'x', 0, 0, 0, 10, 'backfill', 1, 'backfill')", (asin, status))
    listings = [deals.Listing("OLD", last_update=11), deals.Listing("NEW", last_update=10),
                deals.Listing("INC", last_update=9), deals.Listing("MISSING", last_update=1)]
    assert deals.already_current(conn, listings) == {"NEW"}


def test_janitor_candidates_are_bounded_by_share(conn):
    with transaction(conn):
        for i in range(40):
            conn.execute(
                "INSERT INTO deals (asin, status, reason, first_seen, last_seen, source, fence, writer)"
                " VALUES (?, 'accepted', 'ok', 0, ?, 'backfill', 1, 'backfill')", (f"A{i:02d}", float(i)))
    assert deals.janitor_candidates(conn, unseen_before=30, max_share=0.05) == ["A00", "A01"]
    with transaction(conn):
        assert deals.remove_deals(conn, ctx(), ["A00", "A01", "nope"], "unseen_72h") == 2
    assert conn.execute("SELECT count(*) FROM decisions WHERE outcome = 'removed'").fetchone()[0] == 2


def test_progress_counters_add_and_fields_set(conn):
    with transaction(conn):
        deals.update_progress(conn, "upsert", 1.0, state="working", counters={"accepted": 2})
        deals.update_progress(conn, "upsert", 2.0, counters={"accepted": 1}, detail={"watermark": 7})
        # tokens come from the ledger's call log, a charged failure included
        for actual, status in ((3, "ok"), (2, "transient"), (None, "rate_limited")):
            conn.execute("INSERT INTO keepa_calls (at, worker, endpoint, actual, status) VALUES (1, 'upsert', 'product', ?, ?)",
                         (actual, status))
        conn.execute("INSERT INTO keepa_calls (at, worker, endpoint, actual, status) VALUES (1, 'backfill', 'deal', 9, 'ok')")
    row = deals.progress_rows(conn)[0]
    assert (row["state"], row["accepted"], row["tokens_spent"], row["updated_at"], row["detail"]) == (
        "working", 3, 5, 2.0, '{"watermark":7}')
    with pytest.raises(ValueError):
        deals.update_progress(conn, "upsert", 3.0, counters={"bogus": 1})
    with pytest.raises(ValueError):  # a second count of the tokens cannot creep back in
        deals.update_progress(conn, "upsert", 3.0, counters={"tokens_spent": 1})


def test_retry_count_written_after_a_batch_was_prepared_is_not_lost(conn, db_path):
    """Outcomes are prepared before the write transaction; the other worker may retry the same
    deal in between. The count is read inside the transaction, so both attempts count."""
    backoff = deals.RetryBackoff()
    prepared = [deals.unfetched_outcome("A1", None, "not_returned"), deals.unfetched_outcome("NEW", None, "not_returned")]
    other = open_db(db_path)  # the other worker, committing first
    with transaction(other):
        deals.record_unfetched(other, ctx(500.0, "retry"), "A1", None, "not_returned", backoff)
    with transaction(conn):
        deals.store_outcomes(conn, ctx(), prepared, backoff)
    attempts = dict(conn.execute("SELECT asin, fetch_attempts FROM deals").fetchall())
    assert attempts == {"A1": 2, "NEW": 1}
    assert conn.execute("SELECT next_retry_at FROM deals WHERE asin = 'A1'").fetchone()[0] == 1000.0 + backoff.delay(2)
