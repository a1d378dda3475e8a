"""Times of day in a timezone: the instants a daily time falls on across daylight-saving changes,
the cron strings Dagster's schedules take for them, and the next such instant after a moment.

The bottom layer for the registry's reservations and the nightly schedule: Python's zoneinfo,
nothing of the project.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # date.weekday() order
CLOCK_PATTERN = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


def parse_clock(text: str) -> dt.time:
    """`HH:MM` (24 h) as a time; ValueError otherwise."""
    if not re.fullmatch(CLOCK_PATTERN, text):
        raise ValueError(f"expected a time of day HH:MM, 00:00 to 23:59 (got {text!r})")
    hours, minutes = text.split(":")
    return dt.time(int(hours), int(minutes))


def zone(name: str) -> ZoneInfo:
    """The IANA timezone `name`; ValueError naming it otherwise."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"expected an IANA timezone such as UTC or Europe/Berlin "
                         f"(got {name!r})") from exc


def cron(at: dt.time, weekdays: Iterable[str] = WEEKDAYS) -> str:
    """The cron string of `at` on `weekdays` (cron counts Sunday as 0)."""
    days = sorted((WEEKDAYS.index(day) + 1) % 7 for day in set(weekdays))
    return f"{at.minute} {at.hour} * * {'*' if len(days) == 7 else ','.join(map(str, days))}"


def on_day(day: dt.date, at: dt.time, tz: ZoneInfo) -> dt.datetime:
    """The instant `at` falls on, on `day` in `tz`; a time skipped by a daylight-saving change
    counts as the same wall time before the change (02:30 becomes 03:30)."""
    return dt.datetime.combine(day, at, tzinfo=tz)


def instants(at: dt.time, tz: ZoneInfo, start: float, weekdays: Iterable[str] = WEEKDAYS
             ) -> Iterator[float]:
    """Every instant (a timestamp) at or after `start` on which `at` falls on one of
    `weekdays` in `tz`, in order."""
    allowed = {WEEKDAYS.index(d) for d in weekdays}
    if not allowed:
        return
    day = dt.datetime.fromtimestamp(start, tz).date() - dt.timedelta(days=1)
    while True:
        if day.weekday() in allowed:
            moment = on_day(day, at, tz).timestamp()
            if moment >= start:
                yield moment
        day += dt.timedelta(days=1)


def next_instant(at: dt.time, tz: ZoneInfo, after: float,
                 weekdays: Iterable[str] = WEEKDAYS) -> float:
    """The first instant strictly after `after` on which `at` falls (on one of `weekdays`)."""
    return next(moment for moment in instants(at, tz, after, weekdays) if moment > after)


def local(moment: float, tz: ZoneInfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(moment, tz)


def shown(moment: float, tz: ZoneInfo) -> str:
    """`2026-03-09 08:00 EDT`: how a person in `tz` reads the instant."""
    return local(moment, tz).strftime("%Y-%m-%d %H:%M %Z")
