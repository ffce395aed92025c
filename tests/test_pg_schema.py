"""Schema parity: after migration, SQLite and PostgreSQL have the same tables, columns and views,
the views answer on both, the same rows give the same answers, and the rules the triggers keep
(running totals, append-only history) hold on both (docs/postgres.md)."""

import time

import pytest

from ingest.backends import open_store, transaction

from .pg_server import DB_ERRORS

BOOKKEEPING = {"ingest_schema"}  # PostgreSQL's record of applied versions (SQLite: user_version)
DAY = 86400.0


@pytest.fixture
def both(db_path, pg_url):
    """Migrated connections to a fresh SQLite file and a fresh PostgreSQL database."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conns = {"sqlite": open_store(db_path).open(), "postgresql": open_store(pg_url).open()}
    yield conns
    for conn in conns.values():
        conn.close()


def rows(conn, sql: str, params: tuple = ()) -> list[tuple]:
    return [tuple(r) for r in conn.execute(sql, params).fetchall()]


def sqlite_relations(conn, kind: str) -> dict[str, list[str]]:
    names = [r[0] for r in rows(conn, "SELECT name FROM sqlite_master WHERE type = ? AND name NOT LIKE 'sqlite_%'"
                                      " ORDER BY name", (kind,))]
    return {name: [c[1] for c in rows(conn, f'PRAGMA table_info("{name}")')] for name in names}


def pg_relations(conn, kind: str) -> dict[str, list[str]]:
    table_type = {"table": "BASE TABLE", "view": "VIEW"}[kind]
    names = [r[0] for r in rows(conn, "SELECT table_name FROM information_schema.tables WHERE table_schema ="
                                      " current_schema() AND table_type = ? ORDER BY table_name", (table_type,))]
    return {
        name: [c[0] for c in rows(conn, "SELECT column_name FROM information_schema.columns WHERE table_schema ="
                                        " current_schema() AND table_name = ? ORDER BY ordinal_position", (name,))]
        for name in names if name not in BOOKKEEPING
    }


def test_every_sqlite_version_is_ported_under_the_same_number_and_name():
    from ingest.backends.postgres import migrations as pg_migrations
    from ingest.store import migrations as sqlite_migrations

    assert [(v, n) for v, n, _ in pg_migrations()] == [(v, n) for v, n, _ in sqlite_migrations()]


@pytest.mark.parametrize("kind", ["table", "view"])
def test_both_dialects_have_the_same_tables_views_and_columns(both, kind):
    sqlite_side = sqlite_relations(both["sqlite"], kind)
    pg_side = pg_relations(both["postgresql"], kind)
    assert sorted(pg_side) == sorted(sqlite_side)
    for name, columns in sqlite_side.items():
        assert pg_side[name] == columns, name  # same names, same order


def test_every_view_answers_on_an_empty_database(both):
    views = sorted(sqlite_relations(both["sqlite"], "view"))
    assert len(views) == 7
    for dialect, conn in both.items():
        for view in views:
            assert rows(conn, f"SELECT * FROM {view}") == [], (dialect, view)


# ---------------------------------------------------------------- the same rows, the same answers

HOUR = 1_700_000_000.0 - 1_700_000_000.0 % 3600  # 2023-11-14 22:00 UTC
CALLS = [  # at, worker, endpoint, asins, estimated, actual, status, http_status, latency_ms, tokens_left
    (HOUR + 10, "backfill", "deal", 0, 5.0, 5, "ok", 200, 120.0, 295),
    (HOUR + 20, "backfill", "product", 10, 10.25, 12, "ok", 200, 300.0, 283),
    (HOUR + 30, "backfill", "product", 10, 10.0, None, "rate_limited", 429, 40.0, 0),
    (HOUR + 3700, "upsert", "deal", 0, 5.0, 5, "ok", 200, 99.0, 290),
    (HOUR + 3710, "upsert", "product", 3, 3.0, None, "error", None, None, None),
]
DECISIONS = [  # at, worker, asin, outcome, reason, one_year_avg_cents, fence
    (HOUR + 1, "backfill", "A1", "accepted", "ok", 1000, 1),
    (HOUR + 2, "backfill", "A2", "rejected", "price_above_avg", 900, 1),
    (HOUR + 3, "backfill", "A3", "incomplete", "no_history", None, 1),
    (HOUR + 4, "backfill", "A3", "incomplete", "no_history", None, 1),
    (HOUR + 3601, "upsert", "A1", "removed", "unlisted", None, 2),
    (HOUR + 3602, "upsert", "A4", "accepted", "ok", 500, 2),
]


def fill(conn) -> None:
    with transaction(conn):
        for call in CALLS:
            conn.execute("INSERT INTO keepa_calls (at, worker, endpoint, asins, estimated, actual, status,"
                         " http_status, latency_ms, tokens_left) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", call)
        for decision in DECISIONS:
            conn.execute("INSERT INTO decisions (at, worker, asin, outcome, reason, one_year_avg_cents, fence)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?)", decision)


@pytest.mark.parametrize("sql", [
    "SELECT * FROM token_flow_hourly ORDER BY hour, worker",
    "SELECT * FROM rejections_hourly ORDER BY hour, outcome, reason",
    "SELECT * FROM funnel ORDER BY hour",
    "SELECT * FROM keepa_call_totals ORDER BY worker, endpoint, code",
    "SELECT * FROM decision_totals ORDER BY outcome, reason",
])
def test_the_same_rows_give_the_same_answers_on_both(both, sql):
    for conn in both.values():
        fill(conn)
    sqlite_answer = rows(both["sqlite"], sql)
    assert sqlite_answer  # rows to compare
    pg_answer = rows(both["postgresql"], sql)
    assert pg_answer == sqlite_answer
    assert types(pg_answer) == types(sqlite_answer)  # ints stay ints (no Decimal), reals floats


def types(answer: list[tuple]) -> list[tuple]:
    return [tuple(type(v).__name__ for v in row) for row in answer]


def test_the_hour_of_a_call_is_its_utc_hour_on_both(both):
    for conn in both.values():
        fill(conn)
        assert [r[0] for r in rows(conn, "SELECT hour FROM funnel ORDER BY hour")] == ["2023-11-14 22:00",
                                                                                       "2023-11-14 23:00"]


def test_the_clock_views_judge_ages_by_the_wall_clock_on_both(both):
    now = time.time()
    checkpoint = ('{"pass": 3, "page": 7, "pending": ["A1", "A2"], "next_pass_at": %f,'
                  ' "watermark": 7000000, "next_poll_at": %f}') % (now + 600, now + 60)
    for conn in both.values():
        with transaction(conn):
            conn.execute("INSERT INTO checkpoints (name, value, updated_at, fence) VALUES ('backfill', ?, ?, 1)",
                         (checkpoint, now - 120))
            conn.execute("INSERT INTO deals (asin, status, reason, first_seen, last_seen, last_fetched, source,"
                         " fence, writer) VALUES ('A1', 'accepted', 'ok', ?, ?, ?, 'backfill', 1, 'w')",
                         (now - 2 * DAY, now - 1800, now - 7200))
            conn.execute("INSERT INTO worker_progress (worker, state, updated_at, last_commit_at) VALUES"
                         " ('backfill', 'working', ?, ?)", (now - 5, now - 30))
    for conn in both.values():
        name, age, fence, pass_, page, pending, next_pass_in, watermark, lag, next_poll_in = rows(
            conn, "SELECT * FROM checkpoint_progress")[0]
        assert (name, fence, pass_, page, pending, watermark) == ("backfill", 1, 3, 7, 2, 7000000)
        assert 119 <= age <= 125 and 595 <= next_pass_in <= 600 and 55 <= next_poll_in <= 60
        assert abs(lag - (now - (7000000 + 21564000) * 60)) < 10
        freshness = rows(conn, "SELECT status, deals, fetched_last_hour, fetched_last_day, never_fetched,"
                               " oldest_fetch_h, newest_seen_min FROM deal_freshness")
        assert freshness == [("accepted", 1, 0, 1, 0, 2.0, 30.0)]
        activity = rows(conn, "SELECT worker, updated_age_s, last_commit_age_s, tokens_spent FROM worker_activity")
        assert activity[0][0] == "backfill" and 5 <= activity[0][1] <= 10 and 30 <= activity[0][2] <= 35
        assert activity[0][3] == 0
    for view in ("checkpoint_progress", "deal_freshness", "worker_activity"):
        answers = [rows(conn, f"SELECT * FROM {view}") for conn in both.values()]
        assert types(answers[1]) == types(answers[0]), view


# ---------------------------------------------------------------- append-only history


@pytest.mark.parametrize("table, values", [
    ("watch_actions", "(at, action) VALUES (?, 'kill_hung')"),
    ("alert_messages", "(at, kind, text, payload) VALUES (?, 'alert', 't', '{}')"),
    ("alerts", "(at, kind, channel, result, attempts) VALUES (?, 'alert', 'email', 'sent', 1)"),
])
def test_watch_history_cannot_be_edited_and_only_day_old_rows_can_be_pruned(both, table, values):
    now = time.time()
    for dialect, conn in both.items():
        with transaction(conn):
            conn.execute(f"INSERT INTO {table} {values}", (now - 2 * DAY,))
            conn.execute(f"INSERT INTO {table} {values}", (now - 60,))
        for statement in (f"UPDATE {table} SET at = at + 1", f"DELETE FROM {table}"):
            with pytest.raises(DB_ERRORS, match=f"{table} is append-only"):
                with transaction(conn):
                    conn.execute(statement)
        with transaction(conn):  # retention's prune: only the old row goes
            conn.execute(f"DELETE FROM {table} WHERE at < ?", (now - DAY,))
        assert len(rows(conn, f"SELECT id FROM {table}")) == 1, dialect


def test_lease_events_older_than_a_day_can_be_pruned_on_both(both):
    now = time.time()
    for conn in both.values():
        with transaction(conn):
            for at in (now - 2 * DAY, now - 60):
                conn.execute("INSERT INTO lease_events (name, at, event, fence) VALUES ('job', ?, 'acquired', 1)",
                             (at,))
        with pytest.raises(DB_ERRORS, match="only rows older than a day may be pruned"):
            with transaction(conn):
                conn.execute("DELETE FROM lease_events")
        with transaction(conn):
            conn.execute("DELETE FROM lease_events WHERE at < ?", (now - DAY,))
        assert [r[0] for r in rows(conn, "SELECT at FROM lease_events")] == [now - 60]


def test_a_truncate_cannot_empty_the_history_on_postgresql(both):
    import psycopg  # PostgreSQL cases only run with it installed

    conn = both["postgresql"]
    for table in ("lease_events", "watch_actions", "alert_messages", "alerts"):
        with pytest.raises(psycopg.Error, match=f"{table} is append-only"):
            with transaction(conn):
                conn.execute(f"TRUNCATE {table} CASCADE")


def test_a_database_of_the_first_slice_is_brought_up_to_parity(db_path, pg_url):
    """A PostgreSQL database made when only v001, v002 and v005 were ported gets the versions
    ported since (below its newest), in order, and then matches SQLite."""
    from ingest.backends.postgres import _SCHEMA_TABLE, applied_versions, migrate, migrations

    conn = open_store(pg_url).connect()
    with transaction(conn):
        conn.execute(_SCHEMA_TABLE)
        for version, name, sql in migrations():
            if version in (1, 2, 5):
                conn.execute(sql)
                conn.execute("INSERT INTO ingest_schema (version, name) VALUES (?, ?)", (version, name))
        conn.execute("INSERT INTO keepa_calls (at, worker, endpoint, status, http_status, actual)"
                     " VALUES (1.0, 'backfill', 'deal', 'ok', 200, 5)")
    assert migrate(conn) == [3, 4, 8, 9, 10, 11, 12]
    assert applied_versions(conn) == [1, 2, 3, 4, 5, 8, 9, 10, 11, 12]
    assert rows(conn, "SELECT worker, calls, tokens FROM keepa_call_totals") == [("backfill", 1, 5)]  # seeded
    db_path.parent.mkdir(parents=True, exist_ok=True)
    sqlite_conn = open_store(db_path).open()
    for kind in ("table", "view"):
        assert pg_relations(conn, kind) == sqlite_relations(sqlite_conn, kind)
    sqlite_conn.close()
    conn.close()
