"""Time in UTC, and the one format the API shows it in."""

from __future__ import annotations

import datetime as dt

API_TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%SZ"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(moment: dt.datetime) -> dt.datetime:
    """An aware UTC datetime; naive values (SQLite stores no zone) are UTC by construction."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def format_api_timestamp(moment: dt.datetime | None) -> str | None:
    """'2020-07-30 17:09:33Z', or None for "never"."""
    return None if moment is None else as_utc(moment).strftime(API_TIMESTAMP_FORMAT)
