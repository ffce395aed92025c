"""Keepa time: whole minutes since 2011-01-01 00:00 UTC.

`unix_seconds = (keepa_minute + 21564000) * 60`. A wrong epoch once shifted every date of a
deployment by 11 years, so tests pin both directions against known dates.
"""

from datetime import datetime, timedelta, timezone

KEEPA_EPOCH_OFFSET_MINUTES = 21_564_000  # minutes from 1970-01-01 to 2011-01-01
KEEPA_EPOCH = datetime(2011, 1, 1, tzinfo=timezone.utc)
MINUTES_PER_DAY = 24 * 60


def keepa_minutes_to_datetime(minutes: int) -> datetime:
    """An aware UTC datetime for a Keepa minute."""
    return KEEPA_EPOCH + timedelta(minutes=int(minutes))


def datetime_to_keepa_minutes(dt: datetime) -> int:
    """The Keepa minute containing `dt` (rounded down). Naive datetimes are refused: a naive
    value's zone is a guess, and guessing wrong is the kind of shift the epoch test exists for."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"naive datetime {dt.isoformat()}: Keepa time needs an aware datetime")
    return (dt - KEEPA_EPOCH) // timedelta(minutes=1)


def unix_seconds_to_keepa_minutes(seconds: float) -> int:
    return int(seconds // 60) - KEEPA_EPOCH_OFFSET_MINUTES


def keepa_minutes_to_unix_seconds(minutes: int) -> int:
    return (int(minutes) + KEEPA_EPOCH_OFFSET_MINUTES) * 60
