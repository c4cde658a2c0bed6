"""Tests for app.business_hours (PRODUCT.md section 3). Pure computation: no Redis.

Worked examples give expected instants in UTC so a reader can check them by hand against
the zone's offsets (noted beside each). The property tests compare the implementation
with a slow, independent oracle that resolves wall times by trying every offset.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.business_hours import BusinessHours, spread_offset

H = timedelta(hours=1)
M = timedelta(minutes=1)
WORKDAYS = ("mon", "tue", "wed", "thu", "fri")
OFFICE = {d: ["09:00-12:00", "13:00-17:00"] for d in WORKDAYS}  # 7 open hours a day


def bh(weekly: dict[str, list[str]], tz: str = "UTC", **kw: Any) -> BusinessHours:
    return BusinessHours.model_validate({"weekly": weekly, "timezone": tz, **kw})


def utc(s: str) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=UTC)


def same(a: datetime, b: datetime) -> bool:
    """Same instant. Not `==`: by PEP 495 a zoneinfo datetime in a repeated hour never
    equals a datetime of another zone."""
    return a - b == timedelta(0)


def local(s: str, tz: str, fold: int = 0) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=ZoneInfo(tz), fold=fold)


# --- worked examples: New York (EST -5, EDT -4; 2026: Mar 8 and Nov 1) -----------------


class TestNewYork:
    s = bh(OFFICE, "America/New_York", holiday_country="US")

    def test_next_open_over_spring_weekend(self) -> None:
        # Sat Mar 7 10:00 EST -> Mon Mar 9 09:00 EDT = 13:00 UTC (DST began Sunday)
        assert self.s.next_open(local("2026-03-07T10:00", "America/New_York")) == utc(
            "2026-03-09T13:00"
        )

    def test_add_over_spring_weekend(self) -> None:
        # Fri 16:00 EST: 1 h left on Friday, 1 h on Monday -> Mon 10:00 EDT = 14:00 UTC
        t = local("2026-03-06T16:00", "America/New_York")
        assert self.s.add(t, 2 * H) == utc("2026-03-09T14:00")
        assert self.s.open_time(t, utc("2026-03-09T14:00")) == 2 * H

    def test_add_over_fall_weekend(self) -> None:
        # Fri Oct 30 16:00 EDT + 2 h -> Mon Nov 2 10:00 EST = 15:00 UTC
        t = local("2026-10-30T16:00", "America/New_York")
        assert self.s.add(t, 2 * H) == utc("2026-11-02T15:00")

    def test_lunch_break_and_exact_end(self) -> None:
        t = local("2026-06-03T11:00", "America/New_York")  # Wednesday, EDT
        # 1 h runs out exactly at 12:00, the window's end: the result is 13:00
        assert self.s.add(t, H) == local("2026-06-03T13:00", "America/New_York")
        assert self.s.add(t, H + M) == local("2026-06-03T13:01", "America/New_York")
        assert not self.s.is_open(local("2026-06-03T12:30", "America/New_York"))
        assert self.s.is_open(local("2026-06-03T16:59:59.999999", "America/New_York"))
        assert not self.s.is_open(local("2026-06-03T17:00", "America/New_York"))

    def test_public_holiday_on_a_monday(self) -> None:
        # Labor Day, Mon Sep 7 2026: Fri 16:00 + 2 h -> Tue Sep 8 10:00 EDT
        t = local("2026-09-04T16:00", "America/New_York")
        assert self.s.add(t, 2 * H) == local("2026-09-08T10:00", "America/New_York")
        assert self.s.open_time(t, local("2026-09-08T09:00", "America/New_York")) == H

    def test_observed_holiday_and_later_years(self) -> None:
        # July 4 2026 is a Saturday: observed on Friday July 3
        assert self.s.next_open(local("2026-07-03T08:00", "America/New_York")) == local(
            "2026-07-06T09:00", "America/New_York"
        )
        # holiday data for other years is loaded on demand: Christmas 2030 is a Wednesday
        assert self.s.next_open(local("2030-12-24T17:00", "America/New_York")) == local(
            "2030-12-26T09:00", "America/New_York"
        )

    def test_three_business_days(self) -> None:
        # Wed Nov 25 10:00 + 21 h (3 x 7 h): Wed 6 h, Thanksgiving (Thu) closed,
        # Fri 7 h, Mon 7 h, Tue 1 h -> Tue Dec 1 10:00 EST
        t = local("2026-11-25T10:00", "America/New_York")
        assert self.s.add(t, 21 * H) == local("2026-12-01T10:00", "America/New_York")

    def test_listed_holiday_on_a_monday(self) -> None:
        s = bh(OFFICE, "America/New_York", holidays=["2026-06-15"])
        assert s.next_open(local("2026-06-13T12:00", "America/New_York")) == local(
            "2026-06-16T09:00", "America/New_York"
        )

    def test_spring_forward_gap_start(self) -> None:
        # 02:30 does not exist on Mar 8: the window starts at 03:00 EDT = 07:00 UTC
        s = bh({"sun": ["02:30-04:00"]}, "America/New_York")
        assert s.next_open(local("2026-03-08T00:00", "America/New_York")) == utc("2026-03-08T07:00")
        assert s.open_time(utc("2026-03-08T00:00"), utc("2026-03-09T00:00")) == H
        # a week earlier it is an ordinary 02:30 EST = 07:30 UTC, 1.5 h long
        assert s.next_open(utc("2026-03-01T00:00")) == utc("2026-03-01T07:30")
        assert s.open_time(utc("2026-03-01T00:00"), utc("2026-03-02T00:00")) == 90 * M

    def test_window_inside_the_gap_vanishes(self) -> None:
        s = bh({"sun": ["02:00-02:30"]}, "America/New_York")
        assert s.next_open(utc("2026-03-08T00:00")) == local("2026-03-15T02:00", "America/New_York")

    def test_fall_back_fold(self) -> None:
        # 01:00-01:30 on Nov 1 is the first 01:00-01:30 (EDT) = 05:00-05:30 UTC
        s = bh({"sun": ["01:00-01:30"]}, "America/New_York")
        assert s.is_open(utc("2026-11-01T05:15"))
        second = local("2026-11-01T01:15", "America/New_York", fold=1)  # 06:15 UTC, EST
        assert not s.is_open(second)
        assert s.open_time(utc("2026-11-01T00:00"), utc("2026-11-02T00:00")) == 30 * M
        # 01:30-02:00: from 01:30 EDT (05:30 UTC) to 02:00 EST (07:00 UTC) = 1.5 h
        s = bh({"sun": ["01:30-02:00"]}, "America/New_York")
        assert s.is_open(second.replace(minute=45))
        assert s.open_time(utc("2026-11-01T00:00"), utc("2026-11-02T00:00")) == 90 * M

    def test_whole_days_are_real_time(self) -> None:
        s = bh({"sun": ["00:00-24:00"]}, "America/New_York")
        assert s.open_time(utc("2026-03-01"), utc("2026-03-15")) == 24 * H + 23 * H
        assert s.open_time(utc("2026-10-25"), utc("2026-11-08")) == 24 * H + 25 * H

    def test_overnight_window_across_dst(self) -> None:
        s = bh({"sat": ["22:00-06:00"]}, "America/New_York")
        # Sat Mar 7 22:00 EST (Sun 03:00 UTC) to Sun 06:00 EDT (10:00 UTC): 7 h
        assert s.open_time(utc("2026-03-07"), utc("2026-03-09")) == 7 * H
        # Sat Oct 31 22:00 EDT (Sun 02:00 UTC) to Sun 06:00 EST (11:00 UTC): 9 h
        assert s.open_time(utc("2026-10-31"), utc("2026-11-02")) == 9 * H
        assert s.add(utc("2026-10-31T12:00"), 8 * H) == utc("2026-11-01T10:00")


# --- other zones ------------------------------------------------------------------------


def test_berlin_both_changes() -> None:
    # EU 2026: Sun Mar 29 02:00 CET -> 03:00 CEST; Sun Oct 25 03:00 CEST -> 02:00 CET
    s = bh({"sat": ["22:00-06:00"]}, "Europe/Berlin")
    # Sat Mar 28 22:00 CET = 21:00 UTC to Sun 06:00 CEST = 04:00 UTC: 7 h
    t = local("2026-03-28T22:00", "Europe/Berlin")
    assert s.open_time(t, t + 2 * 24 * H) == 7 * H
    assert s.add(t, 7 * H - M) == utc("2026-03-29T03:59")
    # exactly 7 h runs out at the window's end: next window, Sat Apr 4 22:00 CEST
    assert s.add(t, 7 * H) == utc("2026-04-04T20:00")
    # Sat Oct 24 22:00 CEST = 20:00 UTC to Sun 06:00 CET = 05:00 UTC: 9 h
    t = local("2026-10-24T22:00", "Europe/Berlin")
    assert s.open_time(t, t + 2 * 24 * H) == 9 * H


def test_berlin_office_week_over_dst() -> None:
    s = bh({d: ["09:00-17:00"] for d in WORKDAYS}, "Europe/Berlin")
    # Fri Mar 27 16:00 CET + 2 h -> Mon Mar 30 10:00 CEST = 08:00 UTC
    assert s.add(local("2026-03-27T16:00", "Europe/Berlin"), 2 * H) == utc("2026-03-30T08:00")


def test_subdivision_holiday() -> None:
    # Epiphany (Tue Jan 6 2026) is a holiday in Bavaria, not in all of Germany
    weekly = {d: ["09:00-17:00"] for d in WORKDAYS}
    t = local("2026-01-06T08:00", "Europe/Berlin")
    by = bh(weekly, "Europe/Berlin", holiday_country="DE", holiday_subdivision="BY")
    assert by.next_open(t) == local("2026-01-07T09:00", "Europe/Berlin")
    de = bh(weekly, "Europe/Berlin", holiday_country="DE")
    assert de.next_open(t) == local("2026-01-06T09:00", "Europe/Berlin")


def test_lord_howe_half_hour_dst() -> None:
    # Apr 5 2026: 02:00 +11:00 -> 01:30 +10:30; Oct 4 2026: 02:00 +10:30 -> 02:30 +11:00
    s = bh({"sun": ["01:00-03:00"]}, "Australia/Lord_Howe")
    # Apr 5: 01:00 +11 (Apr 4 14:00 UTC) to 03:00 +10:30 (16:30 UTC) = 2.5 h
    assert s.open_time(utc("2026-04-04"), utc("2026-04-06")) == 150 * M
    # Oct 4: 01:00 +10:30 (Oct 3 14:30 UTC) to 03:00 +11 (16:00 UTC) = 1.5 h
    assert s.open_time(utc("2026-10-03"), utc("2026-10-05")) == 90 * M
    gap = bh({"sun": ["02:15-03:00"]}, "Australia/Lord_Howe")
    # 02:15 falls in the gap: opens at 02:30 +11 = Oct 3 15:30 UTC
    assert gap.next_open(utc("2026-10-03T12:00")) == utc("2026-10-03T15:30")
    fold = bh({"sun": ["01:45-02:00"]}, "Australia/Lord_Howe")
    # first 01:45 (+11) = Apr 4 14:45 UTC to 02:00 +10:30 = 15:30 UTC
    assert fold.next_open(utc("2026-04-04T12:00")) == utc("2026-04-04T14:45")
    assert fold.open_time(utc("2026-04-04"), utc("2026-04-05")) == 45 * M


def test_kathmandu_quarter_hour_offset() -> None:
    s = bh({d: ["09:00-17:00"] for d in WORKDAYS}, "Asia/Kathmandu")
    # Mon Nov 30 2026 00:00 UTC is 05:45 local: opens 09:00 +05:45 = 03:15 UTC
    assert s.next_open(utc("2026-11-30T00:00")) == utc("2026-11-30T03:15")
    assert s.add(utc("2026-11-30T00:00"), 8 * H) == utc("2026-12-01T03:15")


def test_apia_skipped_day() -> None:
    # Samoa skipped Fri Dec 30 2011: Thu 23:59:59 -10:00 was followed by Sat 00:00 +14:00
    s = bh({d: ["09:00-17:00"] for d in (*WORKDAYS, "sat", "sun")}, "Pacific/Apia")
    t = local("2011-12-29T16:00", "Pacific/Apia")  # = Dec 30 02:00 UTC
    # 1 h on Thursday, then Saturday Dec 31 09:00 +14 (= Dec 30 19:00 UTC) + 1 h
    assert s.add(t, 2 * H) == utc("2011-12-30T20:00")
    assert s.open_time(t, utc("2011-12-30T20:00")) == 2 * H
    fri = bh({"fri": ["09:00-17:00"]}, "Pacific/Apia")
    assert fri.next_open(t) == local("2012-01-06T09:00", "Pacific/Apia")
    # an overnight window ending inside the skipped day ends when Saturday begins
    night = bh({"thu": ["22:00-02:00"]}, "Pacific/Apia")
    # Thu 22:00 -10 = Dec 30 08:00 UTC to Sat 00:00 +14 = Dec 30 10:00 UTC
    assert night.open_time(utc("2011-12-29"), utc("2011-12-31")) == 2 * H


def test_sao_paulo_dst_abolished() -> None:
    s = bh({"sun": ["00:00-02:00"]}, "America/Sao_Paulo")
    # Nov 4 2018: midnight did not exist (00:00 -03 -> 01:00 -02): 01:00-02:00 -02 = 1 h
    assert s.next_open(utc("2018-11-03T12:00")) == utc("2018-11-04T03:00")
    assert s.open_time(utc("2018-11-03T12:00"), utc("2018-11-05")) == H
    # From 2019 on there is no DST: Nov 3 2019 and Nov 1 2026 are plain 2 h at -03
    assert s.open_time(utc("2019-11-03"), utc("2019-11-04")) == 2 * H
    assert s.next_open(utc("2026-11-01T00:00")) == utc("2026-11-01T03:00")


def test_friday_night_window_into_saturday() -> None:
    s = bh({"fri": ["22:00-02:00"]}, holidays=["2026-12-05"])  # a Saturday
    assert s.is_open(utc("2026-12-05T01:00"))  # started Friday: the Saturday holiday is moot
    assert not s.is_open(utc("2026-12-05T02:00"))
    assert s.next_open(utc("2026-12-05T02:00")) == utc("2026-12-11T22:00")
    closed = bh({"fri": ["22:00-02:00"]}, holidays=["2026-12-04"])  # the Friday
    assert not closed.is_open(utc("2026-12-05T01:00"))


def test_24_00_end_and_touching_windows() -> None:
    s = bh({"mon": ["18:00-24:00"], "tue": ["00:00-06:00"]}, spread="PT15M")
    mon = utc("2026-11-30T18:00")
    assert s.open_time(mon, mon + 24 * H) == 12 * H
    assert s.add(mon, 6 * H) == utc("2026-12-01T00:00")
    assert s.is_open(utc("2026-12-01T00:00"))
    # midnight continues an open period: not an opening, so not spread
    assert s.next_open_spread(utc("2026-12-01T00:00"), "k") == utc("2026-12-01T00:00")
    assert s.next_open_spread(mon, "k") > mon


def test_results_are_utc_even_in_a_repeated_hour() -> None:
    # Lord Howe repeats 01:30-02:00 on Apr 5 2026. A zoneinfo datetime in a repeated hour
    # never compares equal to another zone's (PEP 495), so results are in UTC.
    s = bh({"sun": ["01:45-02:00"]}, "Australia/Lord_Howe")
    t = local("2026-04-05T01:40", "Australia/Lord_Howe")  # first 01:40, +11: 14:40 UTC
    r = s.next_open(t)
    assert r.tzinfo is UTC
    assert r == utc("2026-04-04T14:45")
    assert r.astimezone(s.tzinfo).replace(tzinfo=None) == datetime(2026, 4, 5, 1, 45)
    assert r == s.next_open(t.astimezone(ZoneInfo("Asia/Tokyo")))
    # an ambiguous argument works too (compare instants by subtraction, see PEP 495)
    assert s.next_open_spread(t.replace(minute=50), "k") - t.replace(minute=50) == timedelta(0)


# --- spread -------------------------------------------------------------------------------


class TestSpread:
    s = bh(OFFICE, "America/New_York", spread="PT15M")

    def test_spread_in_window_start_and_stable(self) -> None:
        opening = local("2026-06-08T09:00", "America/New_York")
        for key in ("onboarding:1", "onboarding:2", "x" * 100):
            r = self.s.next_open_spread(local("2026-06-06T10:00", "America/New_York"), key)
            assert opening <= r < opening + 15 * M
            assert r - opening == spread_offset(key, 15 * M)
            assert self.s.next_open_spread(opening, key) == r  # at the opening: spread too
            assert self.s.next_open_spread(r, key) == r  # when the job runs: unchanged

    def test_inside_window_unchanged(self) -> None:
        t = local("2026-06-08T10:30", "America/New_York")
        assert self.s.next_open_spread(t, "k") == t

    def test_keys_spread_out(self) -> None:
        opening = local("2026-06-08T09:00", "America/New_York")
        t = opening - H
        offsets = {self.s.next_open_spread(t, f"c:{i}") - opening for i in range(1000)}
        assert len(offsets) > 990
        assert min(offsets) < 30 * timedelta(seconds=1)
        assert max(offsets) > 14 * M + 30 * timedelta(seconds=1)

    def test_clamped_to_short_window(self) -> None:
        s = bh({"mon": ["09:00-09:05"]}, spread="PT15M")
        for i in range(200):
            r = s.next_open_spread(utc("2026-11-29T00:00"), f"k{i}")
            assert utc("2026-11-30T09:00") <= r < utc("2026-11-30T09:05")
            assert s.is_open(r)

    def test_no_spread(self) -> None:
        s = bh(OFFICE)
        assert s.next_open_spread(utc("2026-11-29"), "k") == utc("2026-11-30T09:00")

    def test_spread_offset_function(self) -> None:
        w = 15 * M
        assert spread_offset("a", w) == spread_offset("a", w)
        assert timedelta(0) <= spread_offset("a", w) < w
        assert spread_offset("a", timedelta(0)) == timedelta(0)
        with pytest.raises(ValueError):
            spread_offset("a", -w)


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({"weekly": {"mon": ["9-5"]}}, ["weekly.mon[0]", "'9-5'"]),
        ({"weekly": {"tue": ["09:00-17:00", "25:00-26:00"]}}, ["weekly.tue[1]", "25:00-26:00"]),
        ({"weekly": {"mon": ["09:00-24:30"]}}, ["weekly.mon[0]", "09:00-24:30"]),
        ({"weekly": {"mon": ["24:00-02:00"]}}, ["weekly.mon[0]", "24:00-02:00"]),
        ({"weekly": {"wed": ["09:00-09:00"]}}, ["weekly.wed[0]", "09:00-09:00", "empty"]),
        (
            {"weekly": {"mon": ["09:00-12:00", "11:00-13:00"]}},
            ["weekly", "overlaps", "'09:00-12:00'", "'11:00-13:00'"],
        ),
        (
            {"weekly": {"fri": ["22:00-02:00"], "sat": ["01:00-05:00"]}},
            ["weekly", "fri '22:00-02:00'", "overlaps", "sat '01:00-05:00'"],
        ),
        (
            {"weekly": {"sun": ["20:00-08:00"], "mon": ["07:00-09:00"]}},
            ["weekly", "sun '20:00-08:00'", "overlaps", "mon '07:00-09:00'"],
        ),
        ({"weekly": {"monday": ["09:00-17:00"]}}, ["weekly", "unknown weekday", "'monday'"]),
        ({"weekly": OFFICE, "timezone": "Mars/Olympus"}, ["timezone", "'Mars/Olympus'"]),
        ({"weekly": OFFICE, "holiday_country": "XX"}, ["holiday_country", "'XX'"]),
        (
            {"weekly": OFFICE, "holiday_country": "US", "holiday_subdivision": "ZZ"},
            ["holiday_subdivision", "'ZZ'"],
        ),
        ({"weekly": OFFICE, "holiday_subdivision": "CA"}, ["holiday_subdivision", "'CA'"]),
        ({"weekly": OFFICE, "spread": -60}, ["spread", "negative"]),
        ({"weekly": OFFICE, "holidays": ["2026-02-30"]}, ["holidays"]),
        ({"weekly": OFFICE, "holiday": ["2026-12-25"]}, ["holiday", "Extra inputs"]),
        ({"weekly": {}}, ["weekly/holidays", "no open time in the 366 days"]),
    ],
)
def test_rejections_name_field_and_value(data: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(ValidationError) as err:
        BusinessHours.model_validate(data)
    for needle in needles:
        assert needle in str(err.value)


def test_rejects_schedule_closed_by_holidays_for_a_year() -> None:
    today = datetime.now(UTC).date()
    mondays = [
        (today + timedelta(days=k)).isoformat()
        for k in range(-7, 380)
        if (today + timedelta(days=k)).weekday() == 0
    ]
    with pytest.raises(ValidationError, match="no open time in the 366 days"):
        bh({"mon": ["09:00-17:00"]}, holidays=mondays)
    bh({"mon": ["09:00-17:00"]}, holidays=mondays[:-3])  # a Monday left: accepted


def test_accepts_spread_forms_and_touching_windows() -> None:
    assert bh(OFFICE, spread="PT15M").spread == 15 * M
    assert bh(OFFICE, spread=90).spread == 90 * timedelta(seconds=1)
    bh({"mon": ["09:00-12:00", "12:00-17:00"], "tue": ["22:00-09:00"], "wed": ["09:00-10:00"]})


@pytest.mark.parametrize("method", ["is_open", "next_open", "add", "open_time", "spread"])
def test_naive_datetime_raises_value_error(method: str) -> None:
    s = bh(OFFICE)
    naive = datetime(2026, 12, 1, 10)
    aware = naive.replace(tzinfo=UTC)
    calls = {
        "is_open": lambda: s.is_open(naive),
        "next_open": lambda: s.next_open(naive),
        "add": lambda: s.add(naive, H),
        "open_time": lambda: s.open_time(aware, naive),
        "spread": lambda: s.next_open_spread(naive, "k"),
    }
    with pytest.raises(ValueError, match="timezone-aware"):
        calls[method]()


def test_negative_duration_raises() -> None:
    with pytest.raises(ValueError, match="negative"):
        bh(OFFICE).add(utc("2026-12-01T10:00"), -M)


def test_immutable_hashable_and_with_timezone_cached() -> None:
    s = bh(OFFICE, "America/New_York", holiday_country="US")
    with pytest.raises(ValidationError):
        s.timezone = "UTC"  # type: ignore[misc]
    same = BusinessHours.model_validate(s.model_dump())
    assert s == same and hash(s) == hash(same)
    s.next_open(utc("2026-12-01"))  # fills s's caches only
    assert s == same
    b = s.with_timezone("Europe/Berlin")
    assert b is s.with_timezone("Europe/Berlin")
    assert s.with_timezone("America/New_York") is s
    assert b.timezone == "Europe/Berlin" and b.weekly == s.weekly
    assert b.next_open(utc("2026-12-01T06:00")) == utc("2026-12-01T08:00")  # 09:00 CET
    with pytest.raises(ValidationError, match="Nowhere/Land"):
        s.with_timezone("Nowhere/Land")
    moved = s.model_copy(update={"timezone": "Asia/Tokyo"})
    assert moved.next_open(utc("2026-11-30T23:00")) == utc("2026-12-01T00:00")  # 09:00 JST


def test_open_time_of_empty_interval_is_zero() -> None:
    s = bh(OFFICE)
    t = utc("2026-12-01T10:00")
    assert s.open_time(t, t) == timedelta(0)
    assert s.open_time(t, t - H) == timedelta(0)


def test_long_spans_are_cheap_and_exact() -> None:
    s = bh(OFFICE, "America/New_York", holiday_country="US")
    t = local("2026-01-01T00:00", "America/New_York")
    end = local("2027-01-01T00:00", "America/New_York")
    # 2026: 261 weekdays minus 11 weekday holidays (Jul 4, a Saturday, is observed on
    # Friday Jul 3) = 250 days x 7 h
    assert s.open_time(t, end) == 250 * 7 * H
    assert s.add(t, 250 * 7 * H) == s.next_open(end)
    assert s.open_time(t, s.add(t, 10 * 250 * 7 * H)) == 10 * 250 * 7 * H


def test_long_listed_holiday_run_is_skipped() -> None:
    # every Monday of 2030 and 2031 listed as a holiday: the next Monday open is in 2032
    first = date(2029, 12, 31)  # a Monday
    mondays = [first + timedelta(weeks=k) for k in range(105)]  # through Dec 29 2031
    s = bh({"mon": ["09:00-17:00"]}, "Europe/Berlin", holidays=mondays)
    t = local("2029-12-30T12:00", "Europe/Berlin")
    assert s.next_open(t) == local("2032-01-05T09:00", "Europe/Berlin")
    assert s.open_time(t, local("2032-01-06T00:00", "Europe/Berlin")) == 8 * H
    assert s.add(t, 9 * H) == local("2032-01-12T10:00", "Europe/Berlin")


# --- properties ---------------------------------------------------------------------------

ZONES = [
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "Pacific/Apia",
    "America/Sao_Paulo",
    "America/Santiago",  # changes at midnight
    "Europe/Dublin",  # negative DST in tzdata
    "Pacific/Chatham",  # +12:45 / +13:45
    "America/St_Johns",  # -03:30
]
START = datetime(2010, 1, 1, tzinfo=UTC)
END = datetime(2031, 1, 1, tzinfo=UTC)


def _transition_days(name: str) -> list[datetime]:
    """Noon UTC of each day whose offset differs from the day before's (2010-2030)."""
    tz = ZoneInfo(name)
    out = []
    t = START
    prev = t.astimezone(tz).utcoffset()
    while t < END:
        t += timedelta(days=1)
        off = t.astimezone(tz).utcoffset()
        if off != prev:
            out.append(t)
        prev = off
    return out


TRANSITIONS = {name: _transition_days(name) for name in ZONES}


def oracle_resolve(tz: ZoneInfo, day: date, minutes: int) -> datetime:
    """Wall time -> instant by brute force: try each offset the zone uses within a day of
    it, keep the instants whose local time reads back as the wall time, take the first.
    None means a gap: then take the instant the clock jumps over the wall time."""
    naive = datetime.combine(day, time()) + timedelta(minutes=minutes)
    as_utc = naive.replace(tzinfo=UTC)
    offsets = {(as_utc + k * 6 * H).astimezone(tz).utcoffset() for k in range(-5, 6)}
    hits = [
        as_utc - off
        for off in offsets
        if off is not None and (as_utc - off).astimezone(tz).replace(tzinfo=None) == naive
    ]
    if hits:
        return min(hits)
    lo = int((as_utc - 15 * H).timestamp())  # reads before the wall time
    hi = int((as_utc + 15 * H).timestamp())  # reads after it

    def before(x: int) -> bool:
        return datetime.fromtimestamp(x, tz).replace(tzinfo=None) < naive

    assert before(lo) and not before(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if before(mid):
            lo = mid
        else:
            hi = mid
    return datetime.fromtimestamp(hi, UTC)


def _minutes(text: str) -> tuple[int, int]:
    a, b = text.split("-")
    start = int(a[:2]) * 60 + int(a[3:])
    end = int(b[:2]) * 60 + int(b[3:])
    return start, end if end > start else end + 1440


def oracle_windows(s: BusinessHours, first: date, last: date) -> list[tuple[datetime, datetime]]:
    """All windows starting on dates first..last, as instants (unmerged)."""
    tz = ZoneInfo(s.timezone)
    out = []
    day = first
    while day <= last:
        if day not in s.holidays:
            for text in s.weekly.get(
                ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[day.weekday()], ()
            ):
                a, b = _minutes(text)
                start, end = oracle_resolve(tz, day, a), oracle_resolve(tz, day, b)
                if start < end:
                    out.append((start, end))
        day += timedelta(days=1)
    return out


def _span(s: BusinessHours, a: datetime, b: datetime) -> list[tuple[datetime, datetime]]:
    tz = ZoneInfo(s.timezone)
    return oracle_windows(
        s, a.astimezone(tz).date() - timedelta(days=2), b.astimezone(tz).date() + timedelta(days=1)
    )


def oracle_open_time(s: BusinessHours, a: datetime, b: datetime) -> timedelta:
    total = timedelta(0)
    for start, end in _span(s, a, b):
        lo, hi = max(start, a), min(end, b)
        if hi > lo:
            total += hi - lo
    return total


def oracle_is_open(s: BusinessHours, t: datetime) -> bool:
    return any(start <= t < end for start, end in _span(s, t, t))


def _fmt(m: int) -> str:
    return f"{m // 60:02d}:{m % 60:02d}"


@st.composite
def weeklies(draw: st.DrawFn) -> tuple[dict[str, list[str]], int]:
    """Random non-overlapping weekly windows (some overnight, some touching, some wrapping
    from Sunday into Monday), on a quarter-hour grid; and the weekly open minutes."""
    n = draw(st.integers(1, 6))
    points = sorted(
        draw(st.lists(st.integers(0, 671), min_size=2 * n, max_size=2 * n, unique=True))
    )
    spans = [
        (points[2 * i] * 15, min(points[2 * i + 1] * 15, points[2 * i] * 15 + 1425))
        for i in range(n)
    ]
    if draw(st.booleans()):  # split one window into two touching ones
        k = draw(st.integers(0, n - 1))
        a, b = spans[k]
        if b - a >= 30:
            c = a + 15 * draw(st.integers(1, (b - a) // 15 - 1))
            spans[k : k + 1] = [(a, c), (c, b)]
    shift = draw(st.integers(0, 671)) * 15
    weekly: dict[str, list[str]] = {}
    for a, b in spans:
        a2 = (a + shift) % 10080
        day, start = divmod(a2, 1440)
        end = start + (b - a)
        text = f"{_fmt(start)}-{'24:00' if end == 1440 else _fmt(end % 1440)}"
        weekly.setdefault(("mon", "tue", "wed", "thu", "fri", "sat", "sun")[day], []).append(text)
    return weekly, sum(b - a for a, b in spans)


@st.composite
def instants(draw: st.DrawFn, zone: str) -> datetime:
    """Uniform over 2010-2030, or (more often) within 3 days of a DST change."""
    days = TRANSITIONS[zone]
    if days and draw(st.booleans()):
        base = draw(st.sampled_from(days))
        return base + timedelta(
            microseconds=draw(st.integers(-3 * 86400 * 10**6, 3 * 86400 * 10**6))
        )
    span = int((END - START).total_seconds())
    return START + timedelta(
        seconds=draw(st.integers(0, span)), microseconds=draw(st.integers(0, 999_999))
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[BusinessHours, datetime, int]:
    """(schedule, instant, weekly open minutes); listed holidays sit near the instant."""
    zone = draw(st.sampled_from(ZONES))
    weekly, week_minutes = draw(weeklies())
    t = draw(instants(zone))
    t = t.astimezone(ZoneInfo(draw(st.sampled_from(ZONES))))  # input zone is arbitrary
    near = t.astimezone(ZoneInfo(zone)).date()
    offsets = draw(st.lists(st.integers(-3, 10), max_size=4, unique=True))
    holidays = sorted(near + timedelta(days=k) for k in offsets)
    s = BusinessHours.model_validate(
        {
            "weekly": weekly,
            "timezone": zone,
            "holidays": holidays,
            "spread": draw(st.integers(0, 3600)),
        }
    )
    return s, t, week_minutes


PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(cases())
def test_prop_is_open_matches_oracle(case: tuple[BusinessHours, datetime, int]) -> None:
    s, t, _ = case
    assert s.is_open(t) == oracle_is_open(s, t)


@PROPS
@given(cases())
def test_prop_next_open(case: tuple[BusinessHours, datetime, int]) -> None:
    s, t, _ = case
    n = s.next_open(t)
    assert n >= t
    assert s.is_open(n) and oracle_is_open(s, n)
    assert s.open_time(t, n) == timedelta(0)
    assert oracle_open_time(s, t, n) == timedelta(0)  # nothing open in [t, n)
    assert s.add(t, timedelta(0)) == n
    assert same(n, t) == s.is_open(t)


@PROPS
@given(cases(), st.data())
def test_prop_add_and_open_time_match_oracle(
    case: tuple[BusinessHours, datetime, int], data: st.DataObject
) -> None:
    s, t, week = case
    d = timedelta(microseconds=data.draw(st.integers(0, week * 60 * 10**6 * 3 // 2)))
    r = s.add(t, d)
    assert r >= t
    assert s.is_open(r) and oracle_is_open(s, r)
    assert s.open_time(t, r) == d
    assert oracle_open_time(s, t, r) == d
    b = t.astimezone(UTC) + timedelta(microseconds=data.draw(st.integers(0, 4 * 86400 * 10**6)))
    assert s.open_time(t, b) == oracle_open_time(s, t, b)


@PROPS
@given(cases(), st.data())
def test_prop_add_composes_and_is_monotonic(
    case: tuple[BusinessHours, datetime, int], data: st.DataObject
) -> None:
    s, t, week = case
    top = week * 60 * 10**6 * 3
    a, b = (timedelta(microseconds=data.draw(st.integers(0, top))) for _ in range(2))
    assert s.add(s.add(t, a), b) == s.add(t, a + b)
    lo, hi = sorted((a, b))
    assert s.add(t, lo) <= s.add(t, hi)
    assert s.add(t, hi) - s.add(t, lo) >= hi - lo  # open time never outruns real time


@PROPS
@given(cases(), st.sampled_from(ZONES))
def test_prop_input_zone_does_not_matter(
    case: tuple[BusinessHours, datetime, int], zone: str
) -> None:
    s, t, _ = case
    u = t.astimezone(ZoneInfo(zone))
    d = timedelta(hours=5, microseconds=7)
    assert s.is_open(u) == s.is_open(t)
    assert s.next_open(u) == s.next_open(t)
    assert s.add(u, d) == s.add(t, d)
    # aware + timedelta is wall-clock arithmetic in t's zone: add in UTC for a real 50 h
    b = t.astimezone(UTC) + 50 * H
    assert s.open_time(u, b) == s.open_time(t, b.astimezone(t.tzinfo))
    assert s.next_open_spread(u, "k") == s.next_open_spread(t, "k")


@PROPS
@given(cases(), st.text(max_size=20))
def test_prop_spread(case: tuple[BusinessHours, datetime, int], key: str) -> None:
    s, t, _ = case
    n = s.next_open(t)
    r = s.next_open_spread(t, key)
    assert r == s.next_open_spread(t, key)  # stable per key
    assert s.is_open(r)
    assert s.open_time(n, r) == r - n  # still in the window that opens at n
    if same(n, t) and s.is_open(t - timedelta(microseconds=1)):
        assert same(r, t)  # inside a window, not at its opening: unchanged
    if r != n:
        assert n < r < n + s.spread
        assert not s.is_open(n - timedelta(microseconds=1))  # n is a real opening
    assert s.next_open_spread(r, key) == r  # the job, run at r, stays put


def test_a_zone_name_longer_than_a_file_name_is_refused_by_name() -> None:
    """Found by the client fuzz test: zoneinfo raised OSError (file name too long)."""
    with pytest.raises(ValueError, match="unknown time zone"):
        BusinessHours.model_validate({"weekly": {"mon": ["09:00-17:00"]}, "timezone": "x" * 5000})
