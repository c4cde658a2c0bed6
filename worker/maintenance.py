"""Periodic maintenance on arq's queue: retention of finished enrollments."""

from __future__ import annotations

from arq.cron import CronJob

from app.settings import Settings

__all__ = ["maintenance_crons"]


def maintenance_crons(settings: Settings) -> list[CronJob]:
    """The maintenance cron jobs the settings ask for (none yet)."""
    return []
