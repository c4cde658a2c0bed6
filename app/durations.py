"""Durations in campaign definitions: ISO 8601 (``PT10S``, ``P3D``) or a number of seconds."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from pydantic import AfterValidator

__all__ = ["Duration", "format_duration"]


def _non_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise ValueError(f"duration must not be negative (got {format_duration(value)})")
    return value


#: A non-negative ``timedelta`` parsed by pydantic from ISO 8601 or seconds.
Duration = Annotated[timedelta, AfterValidator(_non_negative)]


def format_duration(value: timedelta) -> str:
    """A short human form: ``3d 2h``, ``15m``, ``1.5s``."""
    seconds = value.total_seconds()
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            count, seconds = divmod(seconds, size)
            parts.append(f"{int(count)}{unit}")
    if seconds or not parts:
        parts.append(f"{seconds:g}s")
    return sign + " ".join(parts)
