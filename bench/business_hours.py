"""Benchmark app.business_hours on a realistic schedule.

Run: .venv/bin/python bench/business_hours.py [--repeats N] [--calls N]

Schedule: Mon-Fri 09:00-12:00 and 13:00-17:00 (7 open hours a day), US public holidays,
America/New_York. Inputs: random instants uniformly over 2026 (seeded). "3 business days"
is 3 x 7 open hours = timedelta(hours=21) of open time; "30 business days" is 210 hours.
Each row is the median over the repeats of calls per second on one core, with the
schedule's month caches warm (the first, cold pass is reported separately).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.business_hours import BusinessHours

SCHEDULE = {
    "weekly": {d: ["09:00-12:00", "13:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")},
    "holiday_country": "US",
    "holidays": ["2026-12-24"],
    "spread": "PT15M",
    "timezone": "America/New_York",
}


def instants(n: int, seed: int = 1) -> list[datetime]:
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    end = datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    return [datetime.fromtimestamp(rng.uniform(start, end), UTC) for _ in range(n)]


def rate(fn: Callable[[datetime], object], ts: list[datetime], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for t in ts:
            fn(t)
        runs.append(len(ts) / (time.perf_counter() - t0))
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20_000)
    args = ap.parse_args()

    t0 = time.perf_counter()
    bh = BusinessHours.model_validate(SCHEDULE)
    validate_ms = (time.perf_counter() - t0) * 1e3
    ts = instants(args.calls)

    t0 = time.perf_counter()
    for t in ts:  # cold: builds the month caches of 2026 (and early 2027)
        bh.add(t, timedelta(hours=210))
    cold_ms = (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    berlin = bh.with_timezone("Europe/Berlin")
    berlin.next_open(ts[0])
    zone_ms = (time.perf_counter() - t0) * 1e3

    h1, d3, d30 = timedelta(hours=1), timedelta(hours=21), timedelta(hours=210)
    rows: list[tuple[str, Callable[[datetime], object]]] = [
        ("is_open(t)", bh.is_open),
        ("next_open(t)", bh.next_open),
        ("next_open_spread(t, key)", lambda t: bh.next_open_spread(t, "onboarding:42")),
        ("add(t, 1h)", lambda t: bh.add(t, h1)),
        ("add(t, 3 business days = 21h)", lambda t: bh.add(t, d3)),
        ("add(t, 30 business days = 210h)", lambda t: bh.add(t, d30)),
        ("open_time(t, t + 7 days)", lambda t: bh.open_time(t, t + timedelta(days=7))),
        ("with_timezone(tz) (cached)", lambda t: bh.with_timezone("Europe/Berlin")),
    ]
    print(
        f"Python {sys.version.split()[0]}, {args.calls} random instants in 2026, "
        f"median of {args.repeats} repeats"
    )
    print(f"model_validate (first, includes importing holiday data): {validate_ms:.1f} ms")
    print(f"cold pass over the instants (builds month caches): {cold_ms:.1f} ms")
    print(f"with_timezone to a new zone + first query: {zone_ms:.2f} ms")
    print()
    print(f"| {'operation':<34} | {'calls/s':>10} | {'us/call':>8} |")
    print(f"|{'-' * 36}|{'-' * 11}:|{'-' * 9}:|")
    for name, fn in rows:
        r = rate(fn, ts, args.repeats)
        print(f"| {name:<34} | {r:>10,.0f} | {1e6 / r:>8.2f} |")


if __name__ == "__main__":
    main()
