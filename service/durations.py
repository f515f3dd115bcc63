"""Durations and windows as the monitoring settings and query parameters spell them: `15m`,
`2h`, `1d` (also `s` and `w`), or a plain count of predictions (`500`). No service imports: the
settings parse CALIB_MONITORING_RETENTION with it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Optional

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_DURATION = re.compile(r"(\d{1,9})([smhdw])")
_COUNT = re.compile(r"\d{1,9}")


def parse_duration(text: str) -> float:
    """Seconds of `<n><unit>`; ValueError naming the accepted forms."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration: use a positive number and a unit, e.g. 90s, 15m, 2h, 1d, 1w")
    return float(int(match.group(1)) * UNITS[match.group(2)])


@dataclass(frozen=True)
class Window:
    """`count`: the last `value` predictions; `duration`: those of the last `value` seconds."""

    kind: str
    value: float
    text: str


def parse_window(text: str) -> Window:
    text = text.strip().lower()
    if _COUNT.fullmatch(text):
        if int(text) == 0:
            raise ValueError("window must be at least 1 prediction")
        return Window("count", int(text), text)
    try:
        return Window("duration", parse_duration(text), text)
    except ValueError:
        raise ValueError(f"window {text!r} is neither a count of predictions (e.g. 500) nor a duration "
                         f"(e.g. 15m, 2h, 1d)") from None


def parse_since(text: str, now: Optional[datetime] = None) -> datetime:
    """An ISO 8601 instant (a naive one is UTC) or a duration back from now."""
    now = now or datetime.now(timezone.utc)
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"since {text!r} is neither an ISO 8601 time (e.g. 2026-12-14T10:00:00Z) nor a "
                         f"duration (e.g. 2h, 1d)") from None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


@dataclass(frozen=True)
class Retention:
    """At most `max_rows` predictions per model and version, none older than `max_age_s` (None: no bound)."""

    max_rows: Optional[int]
    max_age_s: Optional[float]


def parse_retention(text: str) -> Retention:
    """`100000`, `30d`, or both comma-separated (`100000,30d`)."""
    max_rows, max_age = None, None
    for part in filter(None, (p.strip().lower() for p in str(text).split(","))):
        if _COUNT.fullmatch(part):
            if max_rows is not None or int(part) == 0:
                raise ValueError(f"CALIB_MONITORING_RETENTION: one positive row count at most, got {text!r}")
            max_rows = int(part)
        else:
            if max_age is not None:
                raise ValueError(f"CALIB_MONITORING_RETENTION: one duration at most, got {text!r}")
            max_age = parse_duration(part)
    if max_rows is None and max_age is None:
        raise ValueError("CALIB_MONITORING_RETENTION needs a row count per model (e.g. 100000), a duration "
                         "(e.g. 30d), or both (100000,30d)")
    return Retention(max_rows, max_age)
