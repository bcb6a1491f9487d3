"""Time in UTC, and the one format the API shows it in."""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(moment: dt.datetime) -> dt.datetime:
    """An aware UTC datetime; a naive value is taken as UTC, never as local time (the
    database columns give aware ones: core/schema.py's UtcTimestamp)."""
    if moment.tzinfo is dt.UTC:
        return moment
    if moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def iso_text(moment: dt.datetime) -> str:
    """ISO 8601 at full precision, in UTC: '2020-07-30T17:09:33.123456+00:00'."""
    # NOTE: timespec, or isoformat() leaves out ".000000" when a time falls on a whole second.
    return as_utc(moment).isoformat(timespec="microseconds")


def api_timestamp(iso: str | None) -> str | None:
    """The API's form of an iso_text() time: '2020-07-30 17:09:33Z' (whole seconds), or None
    for "never".

    NOTE: cut from the ISO text rather than formatted again: GET / sends a time both ways, and
    formatting one cost it 3 us (strftime("%Y-%m-%d %H:%M:%SZ") 5 us)."""
    return None if iso is None else f"{iso[:10]} {iso[11:19]}Z"


def format_api_timestamp(moment: dt.datetime | None) -> str | None:
    """'2020-07-30 17:09:33Z' (whole seconds, UTC), or None for "never"."""
    return None if moment is None else api_timestamp(iso_text(moment))
