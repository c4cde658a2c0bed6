"""Business-hours arithmetic (docs/campaigns.md, "Business hours").

`BusinessHours.model_validate(obj)` takes a campaign's ``business_hours`` object plus an
optional ``timezone`` and answers `is_open`, `next_open`, `next_open_spread`, `add` and
`open_time` on timezone-aware datetimes.

Semantics, beyond the contract:

- Windows are ``"HH:MM-HH:MM"`` (two digits each), half-open in local wall time. ``24:00``
  may only end a window; an end before the start runs overnight into the next day and
  belongs to the day it starts on.
- Windows may touch but may not overlap anywhere in the week, counting an overnight
  window's part on the next day and Sunday's overnight window running into Monday.
  Touching windows (``09:00-12:00`` and ``12:00-17:00``, or Monday ``22:00-24:00`` and
  Tuesday ``00:00-06:00``) form one continuous open period: their seam is not an
  opening for ``spread``.
- A holiday (listed, or a public holiday of ``holiday_country``/``holiday_subdivision``
  from the ``holidays`` package, observed days included) closes the windows that start on
  that local date; an overnight window from the day before still runs into it.
- `open_time(a, b)` is zero when ``b <= a``.
- Results are in UTC, whatever zone the argument carried. Not in the schedule's zone: by
  PEP 495 a zoneinfo datetime in a repeated hour (or a gap) never compares equal to a
  datetime of another zone, so "compares equal to the true instant" would fail there.
  ``result.astimezone(schedule.tzinfo)`` gives local time for display. The same trap
  applies to arguments: compare such instants with ``a - b == timedelta(0)``.

Internally every instant is an integer count of microseconds since the epoch, so the
arithmetic is exact. Windows are resolved to instants lazily, one local month at a time
(a "chunk"), and cached per schedule with prefix sums of open time, so each query costs a
dict lookup and a bisect per month crossed, however much time it spans.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from hashlib import blake2b
from itertools import pairwise
from typing import Any, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays as holidays_lib
from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = ["ADD_HORIZON", "BeyondHorizon", "BusinessHours", "spread_offset"]

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_MIN = 24 * 60
_SEC = 1_000_000
_US = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_WINDOW_RE = re.compile(r"(\d\d):(\d\d)-(\d\d):(\d\d)", re.ASCII)
# How far past the last listed holiday a search may run into empty months before giving
# up. Weekly windows plus public holidays never leave a year without open time, and
# validation proved the weekly pattern has some, so this is a guard, not a limit.
_MAX_EMPTY_MONTHS = 15
_CHUNK_CACHE_MAX = 600
# A schedule is valid only if it opens within this long from the moment of validation.
_HORIZON = timedelta(days=366)
#: `BusinessHours.add` never looks further than this past its start (10 years, the longest
#: duration a campaign may hold, plus a year of slack for a contact's own zone and changed
#: holiday data), so no call can keep the event loop busy for long.
ADD_HORIZON = timedelta(days=3650 + 366)

Window = tuple[int, int]
"""(start, end) in minutes from local midnight of the day the window starts on."""


def spread_offset(key: str, width: timedelta) -> timedelta:
    """A stable offset in [0, width) for `key` (an enrollment id).

    Uses blake2b, not `hash()`, so the offset survives restarts and is the same on every
    worker. The offset is the same fraction of any width, so keys keep their order.
    """
    w = width // _US
    if w < 0:
        raise ValueError(f"width must not be negative, got {width}")
    return timedelta(microseconds=_spread_us(key, w))


def _spread_us(key: str, width_us: int) -> int:
    if width_us <= 0:
        return 0
    h = int.from_bytes(blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    return (h * width_us) >> 64


def _to_us(t: datetime) -> int:
    """Microseconds since the epoch; `t` must be aware."""
    td = t - _EPOCH
    return (td.days * 86_400 + td.seconds) * _SEC + td.microseconds


def _stored(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and bool(info.context.get("stored"))


def _days(d: timedelta) -> str:
    return f"{d.days}d" if d == timedelta(days=d.days) else str(d)


def _check_aware(t: datetime, name: str = "t") -> None:
    if not isinstance(t, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(t).__name__}")
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {t.isoformat()}")


def _parse_window(day: str, index: int, text: str) -> Window:
    where = f"weekly.{day}[{index}]"
    m = _WINDOW_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"{where}: {text!r} is not a window 'HH:MM-HH:MM'")
    sh, sm, eh, em = (int(g) for g in m.groups())
    if sh > 23 or sm > 59 or em > 59 or eh > 24 or (eh == 24 and em != 0):
        raise ValueError(
            f"{where}: {text!r} has an invalid time (hours 00-23, minutes 00-59, "
            "24:00 only as an end)"
        )
    start, end = sh * 60 + sm, eh * 60 + em
    if end == start:
        raise ValueError(f"{where}: {text!r} is empty (start equals end)")
    if end < start:  # overnight: ends on the next day
        end += _DAY_MIN
    return start, end


def _parse_weekly(weekly: Mapping[str, tuple[str, ...]]) -> tuple[tuple[Window, ...], ...]:
    """Windows per weekday (Monday first), sorted; raises ValueError naming the culprit."""
    for key in weekly:
        if key not in WEEKDAYS:
            raise ValueError(f"weekly: unknown weekday {key!r} (expected one of {WEEKDAYS})")
    days: list[tuple[Window, ...]] = []
    # (start, end, label) on a Monday-00:00-based minute line, for the overlap check
    spans: list[tuple[int, int, str]] = []
    for k, day in enumerate(WEEKDAYS):
        wins = []
        for i, text in enumerate(weekly.get(day, ())):
            start, end = _parse_window(day, i, text)
            wins.append((start, end))
            label = f"{day} {text!r}"
            spans.append((k * _DAY_MIN + start, k * _DAY_MIN + end, label))
            # Sunday's overnight window reaches into next Monday: compare a shifted copy.
            spans.append(((k + 7) * _DAY_MIN + start, (k + 7) * _DAY_MIN + end, label))
        days.append(tuple(sorted(wins)))
    spans.sort()
    for (_, end_a, label_a), (start_b, _, label_b) in pairwise(spans):
        if start_b < end_a:
            raise ValueError(f"weekly: window {label_a} overlaps {label_b}")
    return tuple(days)


@lru_cache(maxsize=4096)
def _public_holidays(country: str, subdiv: str | None, year: int) -> frozenset[date]:
    """Public holidays for one year, loaded on demand and shared by every schedule."""
    return frozenset(holidays_lib.country_holidays(country, subdiv=subdiv, years=year))


class _Chunk:
    """The merged open windows that start in one local month, as instants (µs)."""

    __slots__ = ("cum", "ends", "starts", "total")

    def __init__(self, starts: list[int], ends: list[int]) -> None:
        self.starts = starts
        self.ends = ends
        cum = [0]
        for s, e in zip(starts, ends, strict=True):
            cum.append(cum[-1] + e - s)
        self.cum = cum  # cum[i]: open time in this chunk before window i
        self.total = cum[-1]


class BeyondHorizon(ValueError):
    """`BusinessHours.add` would end later than the horizon it was given."""


class _BeyondLimit(Exception):
    pass


class _NoOpenTime(RuntimeError):
    """No open time within a year and more past every listed holiday: cannot happen for a
    validated schedule unless its listed holidays close more than a year in a row."""

    def __init__(self) -> None:
        super().__init__("business hours: no open time found")


class _Engine:
    """The precomputed, lazily extended form of one schedule in one zone."""

    def __init__(
        self,
        tz: ZoneInfo,
        weekly: tuple[tuple[Window, ...], ...],
        listed: frozenset[date],
        country: str | None,
        subdiv: str | None,
        spread: timedelta,
    ) -> None:
        self.tz = tz
        self.weekly = weekly
        self.listed = listed
        self.country = country
        self.subdiv = subdiv
        self.spread_us = spread // _US
        self.last_listed_month = max((_month(d) for d in listed), default=-(10**9))
        self.chunks: dict[int, _Chunk] = {}

    # -- building -------------------------------------------------------------------

    def closed(self, day: date) -> bool:
        if day in self.listed:
            return True
        return self.country is not None and day in _holidays_of(self.country, self.subdiv, day.year)

    def resolve(self, day: date, minutes: int) -> int:
        """The instant of wall time `day` + `minutes`, per the DST rules."""
        naive = datetime(day.year, day.month, day.day) + timedelta(minutes=minutes)
        first = naive.replace(tzinfo=self.tz)  # fold=0: first occurrence of a repeated time
        u0 = _to_us(first)
        u1 = _to_us(naive.replace(tzinfo=self.tz, fold=1))
        if u0 <= u1:
            return u0
        # In a gap fold=0 reads the wall time with the offset from before the jump, which
        # lands past the gap start; the contract wants the first instant after the gap,
        # i.e. the transition itself. It lies in [u1, u0]: bisect on whole seconds
        # (tzdata transitions are whole seconds).
        before = first.utcoffset()
        lo, hi = u1 // _SEC, u0 // _SEC
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if datetime.fromtimestamp(mid, self.tz).utcoffset() == before:
                lo = mid
            else:
                hi = mid
        return hi * _SEC

    def chunk(self, m: int) -> _Chunk:
        c = self.chunks.get(m)
        if c is None:
            c = self._build(m)
            if len(self.chunks) >= _CHUNK_CACHE_MAX:
                self.chunks.clear()  # keeps a long-running worker's memory bounded
            self.chunks[m] = c
        return c

    def _build(self, m: int) -> _Chunk:
        year, month0 = divmod(m, 12)
        first = date(year, month0 + 1, 1).toordinal()
        last = date(year + month0 // 11, (month0 + 1) % 12 + 1, 1).toordinal()
        starts: list[int] = []
        ends: list[int] = []
        for ordinal in range(first, last):
            wins = self.weekly[(ordinal - 1) % 7]  # ordinal 1 (0001-01-01) is a Monday
            if not wins:
                continue
            day = date.fromordinal(ordinal)
            if self.closed(day):
                continue
            for start_min, end_min in wins:
                s = self.resolve(day, start_min)
                e = self.resolve(day, end_min)
                if e <= s:  # swallowed by a spring-forward gap
                    continue
                # Wall-time order survives the DST mapping (it is monotonic), so windows
                # arrive sorted; merge touching ones into one open period.
                if ends and s <= ends[-1]:
                    ends[-1] = max(ends[-1], e)
                else:
                    starts.append(s)
                    ends.append(e)
        return _Chunk(starts, ends)

    # -- queries --------------------------------------------------------------------

    def month_of(self, t: datetime) -> int:
        local = t.astimezone(self.tz)
        return local.year * 12 + local.month - 1

    def locate(self, x: int, m: int, limit: int | None = None) -> tuple[_Chunk, int, int]:
        """The first window ending after `x` as (chunk, index, month); `m` is x's month.

        Only windows of x's local month and the one before can contain x: a window ends at
        most one day after the day it starts on.
        """
        c = self.chunk(m - 1)
        if c.ends and c.ends[-1] > x:
            return c, bisect_right(c.ends, x), m - 1
        if limit is None:
            limit = max(m, self.last_listed_month) + _MAX_EMPTY_MONTHS
        while True:
            c = self.chunk(m)
            i = bisect_right(c.ends, x)
            if i < len(c.ends):
                return c, i, m
            m += 1
            if m > limit:
                raise _NoOpenTime

    def following(self, m: int) -> tuple[_Chunk, int]:
        """The next month after `m` that has open time."""
        limit = max(m, self.last_listed_month) + _MAX_EMPTY_MONTHS
        while True:
            m += 1
            c = self.chunk(m)
            if c.total:
                return c, m
            if m > limit:
                raise _NoOpenTime

    def position(self, x: int, m: int) -> tuple[int, int, _Chunk]:
        """(month, open time of that month before x, chunk) for the chunk holding x."""
        c, i, m = self.locate(x, m)
        s = c.starts[i]
        return m, c.cum[i] + (x - s if x > s else 0), c

    def add(self, x: int, m: int, d: int, limit: int | None = None) -> int:
        m, target, c = self.position(x, m)
        target += d
        # `>=`: running out exactly at the month's last window end moves on to the next
        # window's start, as the contract asks.
        while target >= c.total:
            target -= c.total
            if limit is not None and m >= limit:
                raise _BeyondLimit
            c, m = self.following(m)
        j = bisect_right(c.cum, target) - 1
        return c.starts[j] + target - c.cum[j]

    def open_time(self, a: int, ma: int, b: int, mb: int) -> int:
        ma, pa, ca = self.position(a, ma)
        mb, pb, _ = self.position(b, mb)
        if ma == mb:
            return pb - pa
        middle = sum(self.chunk(m).total for m in range(ma + 1, mb))
        return ca.total - pa + middle + pb

    def opening_at(self, c: _Chunk, i: int, m: int) -> bool:
        """Whether window i's start is an opening (no window ends exactly there)."""
        s = c.starts[i]
        if i > 0:
            return c.ends[i - 1] != s
        prev = self.chunk(m - 1)
        return not prev.ends or prev.ends[-1] != s


def _month(d: date) -> int:
    return d.year * 12 + d.month - 1


def _holidays_of(country: str, subdiv: str | None, year: int) -> frozenset[date]:
    """Public holidays for a schedule that was accepted earlier: if the installed
    ``holidays`` data no longer knows the subdivision (or the country), fall back to the
    country's holidays (or none) rather than fail a stored campaign version."""
    try:
        return _public_holidays(country, subdiv, year)
    except (NotImplementedError, KeyError, ValueError):
        if subdiv is None:
            return frozenset()
    try:
        return _public_holidays(country, None, year)
    except (NotImplementedError, KeyError, ValueError):
        return frozenset()


class BusinessHours(BaseModel):
    """A weekly business-hours schedule in one time zone (docs/campaigns.md).

    Immutable; the work of resolving windows to instants is cached inside, so build one
    per campaign and reuse it (`with_timezone` for per-contact zones).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    weekly: dict[str, tuple[str, ...]]
    """Windows per weekday (keys ``mon`` .. ``sun``; a missing day is closed)."""
    holidays: tuple[date, ...] = ()
    """Local dates on which no window starts."""
    holiday_country: str | None = None
    """ISO country code for public holidays from the ``holidays`` package (``"US"``)."""
    holiday_subdivision: str | None = None
    """Subdivision of ``holiday_country`` (``"CA"``, ``"BY"``)."""
    spread: timedelta = timedelta(0)
    """Width over which steps due exactly at an opening are spread (ISO 8601 or seconds)."""
    timezone: str = "UTC"
    """IANA time zone name."""

    _e: _Engine = PrivateAttr()
    _zones: dict[str, BusinessHours] = PrivateAttr(default_factory=dict)
    # Validated with context {"stored": True}: a schedule accepted earlier, loaded without
    # the checks that depend on today's date or the installed holidays data.
    _stored: bool = PrivateAttr(default=False)

    # -- validation -----------------------------------------------------------------

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, v: str) -> str:
        if len(v) > 255:  # no zone name is this long; the file lookup would fail with OSError
            raise ValueError(f"timezone: unknown time zone ({len(v)} characters)")
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise ValueError(f"timezone: unknown time zone {v[:80]!r}") from exc
        return v

    @field_validator("weekly")
    @classmethod
    def _check_weekly(cls, v: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        _parse_weekly(v)
        return v

    @field_validator("spread")
    @classmethod
    def _check_spread(cls, v: timedelta) -> timedelta:
        if v < timedelta(0):
            raise ValueError(f"spread: must not be negative, got {v}")
        return v

    @field_validator("holiday_country")
    @classmethod
    def _check_country(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not _stored(info):
            try:
                _public_holidays(v, None, datetime.now(UTC).year)
            except NotImplementedError as exc:
                raise ValueError(
                    f"holiday_country: unknown country {v!r} (ISO 3166 code, e.g. 'US')"
                ) from exc
        return v

    @field_validator("holiday_subdivision")
    @classmethod
    def _check_subdivision(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if "holiday_country" not in info.data:
            return v  # the country itself was rejected; that error is enough
        country = info.data["holiday_country"]
        if country is None:
            raise ValueError(f"holiday_subdivision: {v!r} given without holiday_country")
        if _stored(info):
            return v
        try:
            _public_holidays(country, v, datetime.now(UTC).year)
        except NotImplementedError as exc:
            raise ValueError(
                f"holiday_subdivision: unknown subdivision {v!r} of {country!r}"
            ) from exc
        return v

    def model_post_init(self, context: Any, /) -> None:
        self._stored = isinstance(context, dict) and bool(context.get("stored"))
        self._e = _Engine(
            ZoneInfo(self.timezone),
            _parse_weekly(self.weekly),
            frozenset(self.holidays),
            self.holiday_country,
            self.holiday_subdivision,
            self.spread,
        )

    @model_validator(mode="after")
    def _check_opens(self) -> Self:
        if self._stored:
            return self
        e = self._e
        now = datetime.now(UTC)
        x = _to_us(now)
        m = e.month_of(now)
        try:
            c, i, _ = e.locate(x, m, limit=m + 13)
            ok = c.starts[i] < x + _HORIZON // _US
        except _NoOpenTime:
            ok = False
        if not ok:
            raise ValueError(
                "weekly/holidays: no open time in the 366 days from "
                f"{now.astimezone(e.tz).date()} in {self.timezone}"
            )
        return self

    # -- identity -------------------------------------------------------------------

    def _key(self) -> tuple[object, ...]:
        return (
            tuple(sorted(self.weekly.items())),
            self.holidays,
            self.holiday_country,
            self.holiday_subdivision,
            self.spread,
            self.timezone,
        )

    def __eq__(self, other: object) -> bool:
        # Compare the schedule, not the caches (pydantic would compare private attrs).
        if not isinstance(other, BusinessHours):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; with `update` the result is validated and gets its own caches."""
        if update:
            return self.model_validate({**self.model_dump(), **update}, context=self._context())
        return super().model_copy(deep=deep)

    def with_timezone(self, tz: str) -> BusinessHours:
        """The same schedule in zone `tz` (cached: cheap to call per enrollment)."""
        if tz == self.timezone:
            return self
        other = self._zones.get(tz)
        if other is None:
            other = self.model_validate(
                {**self.model_dump(), "timezone": tz}, context=self._context()
            )
            self._zones[tz] = other
        return other

    def _context(self) -> dict[str, Any] | None:
        return {"stored": True} if self._stored else None

    @property
    def tzinfo(self) -> ZoneInfo:
        """The schedule's zone (results are in UTC; convert with ``astimezone``)."""
        return self._e.tz

    # -- queries --------------------------------------------------------------------

    @staticmethod
    def _out(x: int) -> datetime:
        sec, us = divmod(x, _SEC)
        return datetime.fromtimestamp(sec, UTC).replace(microsecond=us)

    def is_open(self, t: datetime) -> bool:
        """Whether `t` lies inside a window."""
        _check_aware(t)
        e = self._e
        x = _to_us(t)
        c, i, _ = e.locate(x, e.month_of(t))
        return c.starts[i] <= x

    def next_open(self, t: datetime) -> datetime:
        """`t` if open, else the earliest open instant after `t`."""
        _check_aware(t)
        e = self._e
        x = _to_us(t)
        c, i, _ = e.locate(x, e.month_of(t))
        s = c.starts[i]
        return self._out(s if s > x else x)

    def next_open_spread(self, t: datetime, key: str) -> datetime:
        """Like `next_open`, but a step that would start exactly at an opening is moved
        to ``opening + spread_offset(key, min(spread, window length))``.

        `t` inside a window (not at its opening) is returned as is, so a retry or a late
        job keeps its instant; the offset never leaves the window.
        """
        _check_aware(t)
        e = self._e
        x = _to_us(t)
        c, i, m = e.locate(x, e.month_of(t))
        s = c.starts[i]
        if s < x or not e.opening_at(c, i, m):
            return self._out(max(s, x))
        width = min(e.spread_us, c.ends[i] - s)
        return self._out(s + _spread_us(key, width))

    def add(self, t: datetime, d: timedelta, *, within: timedelta = ADD_HORIZON) -> datetime:
        """The instant at which `d` of open time has passed since `t`; always open.

        If `d` runs out exactly at a window's end the result is the next window's start;
        ``add(t, timedelta(0)) == next_open(t)``. Negative `d` raises ValueError. A result
        later than ``t + within`` raises :class:`BeyondHorizon` (a ValueError), found
        without computing past that horizon.
        """
        _check_aware(t)
        if d < timedelta(0):
            raise ValueError(f"d must not be negative, got {d}")
        e = self._e
        x = _to_us(t)
        end = x + within // _US
        beyond = BeyondHorizon(
            f"{_days(d)} of open time does not end within {_days(within)} "
            f"of {t.astimezone(e.tz):%Y-%m-%d} on this schedule"
        )
        try:
            limit = e.month_of(self._out(end))
            result = e.add(x, e.month_of(t), d // _US, limit)
        except (_BeyondLimit, OverflowError):
            raise beyond from None
        if result > end:
            raise beyond
        return self._out(result)

    def open_time(self, a: datetime, b: datetime) -> timedelta:
        """The open time inside [a, b), in real elapsed time (zero when b <= a)."""
        _check_aware(a, "a")
        _check_aware(b, "b")
        x, y = _to_us(a), _to_us(b)
        if y <= x:
            return timedelta(0)
        e = self._e
        return timedelta(microseconds=e.open_time(x, e.month_of(a), y, e.month_of(b)))
