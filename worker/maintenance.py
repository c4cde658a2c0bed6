"""Periodic maintenance on arq's queue: retention of finished enrollments."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from arq.cron import CronJob, cron

from app.retention import purge_finished
from app.scheduling import SchedulingService
from app.settings import Settings
from worker.metrics import metrics

__all__ = ["RETENTION_MINUTES", "maintenance_crons", "retention_run"]

log = logging.getLogger("worker.maintenance")

#: Minutes of the hour the retention job runs at (every 10 minutes).
RETENTION_MINUTES = set(range(0, 60, 10))


async def retention_run(ctx: dict[str, Any]) -> int:
    """Delete finished enrollments older than ``CAMPAIGN_RETENTION``; returns how many."""
    service: SchedulingService = ctx["service"]
    retention = service.settings.retention
    if retention is None:
        return 0
    before = datetime.now(UTC) - retention
    result = await purge_finished(service.redis, service.keys, before)
    for state, count in result.by_state.items():
        metrics.purged.labels(state=state).inc(count)
    log.info("retention: finished enrollments deleted",
             extra={"deleted": result.by_state, "finished_before": before.isoformat()})  # fmt: skip
    return result.total


def maintenance_crons(settings: Settings) -> list[CronJob]:
    """The maintenance cron jobs the settings ask for: retention when it is set.

    Its name carries the key prefix, so its job id per tick does too: one run per tick
    across the workers of one deployment."""
    if settings.retention is None:
        return []
    return [
        cron(retention_run, name=settings.arq_job_id("retention"), minute=RETENTION_MINUTES,
             second=0, max_tries=1, keep_result=600.0, timeout=max(settings.job_timeout, 3600.0))
    ]  # fmt: skip
