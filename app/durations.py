"""Durations in campaign definitions: ISO 8601 (``PT10S``, ``P3D``) or a number of seconds."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, ValidationInfo

from app.settings import MAX_DURATION_CEILING

__all__ = ["MAX_DURATION", "Duration", "format_duration"]

#: The longest duration a campaign may hold when validated without limits (10 years);
#: ``CAMPAIGN_MAX_DURATION`` may lower it, never raise it.
MAX_DURATION = MAX_DURATION_CEILING


def _check(value: timedelta, info: ValidationInfo) -> timedelta:
    if value < timedelta(0):
        raise ValueError(f"duration must not be negative (got {format_duration(value)})")
    context: Any = info.context
    limit = MAX_DURATION
    if isinstance(context, dict):
        if context.get("stored"):
            return value  # a stored version loads as it was accepted, whatever today's limit
        limit = context.get("max_duration", MAX_DURATION)
    if value > limit:
        raise ValueError(
            f"duration must be at most {format_duration(limit)} (CAMPAIGN_MAX_DURATION), "
            f"got {format_duration(value)}"
        )
    return value


#: A non-negative ``timedelta`` parsed by pydantic from ISO 8601 or seconds, at most
#: :data:`MAX_DURATION` (or the ``max_duration`` of the validation context).
Duration = Annotated[timedelta, AfterValidator(_check)]


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
