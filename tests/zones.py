"""Time zones for tests whose sends must fall inside (or outside) quiet hours whatever the hour."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo


def zone_where_it_is(hour: int) -> str:
    """A fixed-offset zone in which it is now about ``hour`` o'clock."""
    now = datetime.now(UTC)
    offset = (hour - now.hour + 12) % 24 - 12  # -12 … +11
    name = f"Etc/GMT{-offset:+d}" if offset else "Etc/GMT"  # Etc/GMT-3 is UTC+3
    assert abs(datetime.now(ZoneInfo(name)).hour - hour) <= 1
    return name
