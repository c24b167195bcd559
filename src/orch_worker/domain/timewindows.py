"""Trading and blackout windows: `[DAYS ]HH:MM-HH:MM`, always in UTC.

Examples: `"08:00-17:00"` (every day), `"Mon-Fri 07:00-21:00"`, `"Sun,Mon 22:00-02:00"`. The
start is inclusive and the end exclusive; `24:00` is accepted as an end. A window whose end is
before its start wraps past midnight, and its days name the day the window *starts*: `Fri
22:00-02:00` covers Friday 22:00 to Saturday 02:00. Parsed once when the configuration loads, so
a bad window is a configuration error, never a surprise at planning time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(
    r"^\s*(?:(?P<days>[A-Za-z]{3}(?:\s*[-,]\s*[A-Za-z]{3})*)\s+)?"
    r"(?P<sh>\d{2}):(?P<sm>\d{2})\s*-\s*(?P<eh>\d{2}):(?P<em>\d{2})\s*$"
)


@dataclass(frozen=True, slots=True)
class Window:
    start: int
    """Minutes after midnight UTC, inclusive."""
    end: int
    """Minutes after midnight UTC, exclusive; below `start` when the window wraps midnight."""
    days: frozenset[int]
    """Weekdays (Monday = 0) the window starts on."""
    text: str

    def contains(self, when: datetime) -> bool:
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Wrapping window: the evening part belongs to `day`, the morning part to the day before.
        if minute >= self.start:
            return day in self.days
        return minute < self.end and (day - 1) % 7 in self.days


def _days(spec: str | None) -> frozenset[int]:
    if spec is None:
        return frozenset(range(7))
    out: set[int] = set()
    for part in spec.split(","):
        ends = [p.strip().lower() for p in part.split("-")]
        for name in ends:
            if name not in DAYS:
                raise ValueError(f"unknown weekday {name!r} (use Mon..Sun)")
        if len(ends) == 1:
            out.add(DAYS.index(ends[0]))
        else:
            first, last = DAYS.index(ends[0]), DAYS.index(ends[1])
            out.update((first + k) % 7 for k in range((last - first) % 7 + 1))
    return frozenset(out)


def parse_window(text: str) -> Window:
    """Parse one window, raising `ValueError` with what is wrong."""
    m = _WINDOW.match(text)
    if m is None:
        raise ValueError(f"window {text!r} is not '[DAYS ]HH:MM-HH:MM' (UTC)")
    sh, sm, eh, em = (int(m[k]) for k in ("sh", "sm", "eh", "em"))
    if sh > 23 or sm > 59 or em > 59 or eh > 24 or (eh == 24 and em != 0):
        raise ValueError(f"window {text!r} has an impossible time")
    start, end = sh * 60 + sm, eh * 60 + em
    if start == end:
        raise ValueError(f"window {text!r} is empty; use 00:00-24:00 for a whole day")
    return Window(start=start, end=end, days=_days(m["days"]), text=text.strip())


def parse_windows(texts: tuple[str, ...]) -> tuple[Window, ...]:
    return tuple(parse_window(t) for t in texts)


def inside_any(windows: tuple[Window, ...], when: datetime) -> Window | None:
    """The first window containing `when`, or None."""
    for w in windows:
        if w.contains(when):
            return w
    return None
