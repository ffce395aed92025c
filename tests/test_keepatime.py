from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.keepatime import (
    datetime_to_keepa_minutes,
    keepa_minutes_to_datetime,
    keepa_minutes_to_unix_seconds,
    unix_seconds_to_keepa_minutes,
)

UTC = timezone.utc


def test_keepa_epoch_is_2011_01_01_utc():
    assert keepa_minutes_to_datetime(0) == datetime(2011, 1, 1, tzinfo=UTC)
    assert datetime_to_keepa_minutes(datetime(2011, 1, 1, tzinfo=UTC)) == 0


@pytest.mark.parametrize(
    "minute, expected",
    [
        # 2024-01-01 is Unix 1704067200 s; 1704067200 / 60 - 21564000 = 6837120.
        (6_837_120, datetime(2024, 1, 1, tzinfo=UTC)),
        # 2020-02-29 12:34 UTC (a leap day) is Unix 1582979640 s.
        (1_582_979_640 // 60 - 21_564_000, datetime(2020, 2, 29, 12, 34, tzinfo=UTC)),
        # one year after the epoch: 365 days of minutes.
        (365 * 1440, datetime(2012, 1, 1, tzinfo=UTC)),
    ],
)
def test_known_dates_both_ways(minute, expected):
    assert keepa_minutes_to_datetime(minute) == expected
    assert datetime_to_keepa_minutes(expected) == minute


def test_the_unix_formula_from_the_api_notes():
    assert keepa_minutes_to_unix_seconds(6_837_120) == 1_704_067_200
    assert unix_seconds_to_keepa_minutes(1_704_067_200) == 6_837_120
    assert unix_seconds_to_keepa_minutes(1_704_067_259.9) == 6_837_120


def test_result_is_aware_utc():
    dt = keepa_minutes_to_datetime(7_000_000)
    assert dt.utcoffset() == timedelta(0)


def test_other_zones_are_converted_not_relabelled():
    berlin_noon = datetime(2024, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=1)))
    assert datetime_to_keepa_minutes(berlin_noon) == 6_837_120 + 11 * 60


def test_seconds_round_down_to_the_minute():
    assert datetime_to_keepa_minutes(datetime(2024, 1, 1, 0, 0, 59, tzinfo=UTC)) == 6_837_120
    assert datetime_to_keepa_minutes(datetime(2010, 12, 31, 23, 59, 30, tzinfo=UTC)) == -1


def test_naive_datetime_is_refused():
    with pytest.raises(ValueError, match="naive"):
        datetime_to_keepa_minutes(datetime(2024, 1, 1))


@given(st.integers(min_value=-10_000_000, max_value=50_000_000))
def test_round_trip(minute):
    assert datetime_to_keepa_minutes(keepa_minutes_to_datetime(minute)) == minute
    assert unix_seconds_to_keepa_minutes(keepa_minutes_to_unix_seconds(minute)) == minute
