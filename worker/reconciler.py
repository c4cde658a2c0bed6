"""The reconciler: nothing stays active without a job.

A periodic arq cron job (one worker at a time: its job id is unique per tick) walks the
state index sets of ``scheduled``, ``waiting`` and ``running`` enrollments in slices and
repairs any whose current job is neither queued nor leased: a job lost in a Redis crash
window, a dead-lettered payload, or a bug. The check is repeated atomically inside the
repair, so a job that was only moving between the queue and a lease is left alone.
"""

from __future__ import annotations

import logging
from typing import Any

from arq.cron import CronJob, cron

from app.models import State
from app.scheduling import SchedulingService
from app.settings import Settings
from app.store import with_derived
from worker.metrics import metrics
from worker.redis_errors import is_redis_error

__all__ = ["SLICE", "reconcile", "reconcile_cron"]

log = logging.getLogger("worker.reconciler")

SLICE = 500
_FIELDS = ("state", "job", "step", "attempt", "campaign", "version", "timezone", "base_step",
           "node", "run_at", "deadline")  # fmt: skip
_STATES = (State.SCHEDULED.value, State.WAITING.value, State.RUNNING.value)


async def reconcile(ctx: dict[str, Any]) -> dict[str, int]:
    """One pass over every active enrollment; returns how many were repaired, by state."""
    service: SchedulingService = ctx["service"]
    repaired = dict.fromkeys(_STATES, 0)
    checked = 0
    for campaign_id in await service.registry.ids():
        for shard in service.keys.all_shards():
            for state in _STATES:
                cursor: int = 0
                while True:
                    cursor, members = await service.redis.sscan(
                        shard.state_index(campaign_id, state), cursor, count=SLICE
                    )
                    ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
                    checked += len(ids)
                    if ids:
                        for found, n in (await _check_slice(service, ids)).items():
                            repaired[found] += n
                    if int(cursor) == 0:
                        break
    if any(repaired.values()):
        log.warning(
            "reconciler repaired enrollments", extra={"repaired": repaired, "checked": checked}
        )
    return repaired


async def _check_slice(service: SchedulingService, ids: list[str]) -> dict[str, int]:
    async with service.redis.pipeline(transaction=False) as pipe:
        for eid in ids:
            pipe.hmget(service.keys.enrollment(eid), list(_FIELDS))
        rows = await pipe.execute()
    records = [(eid, with_derived(eid, _decode(row))) for eid, row in zip(ids, rows, strict=True)]
    active = [(eid, rec) for eid, rec in records if rec.get("state") in _STATES]
    async with service.redis.pipeline(transaction=False) as pipe:
        for eid, rec in active:
            shard = service.keys.for_enrollment(eid)
            job = rec.get("job") or ""
            pipe.zscore(shard.queue, job)
            pipe.zscore(shard.leases, job)
        scores = await pipe.execute()
    out = dict.fromkeys(_STATES, 0)
    for i, (eid, rec) in enumerate(active):
        if rec.get("job") and (scores[2 * i] is not None or scores[2 * i + 1] is not None):
            continue
        try:
            if await _repair_one(service, eid, rec):
                out[rec["state"]] += 1
        except Exception as exc:  # one enrollment never stops the pass
            if is_redis_error(exc):
                raise
            log.exception("reconciler could not repair an enrollment", extra={"enrollment_id": eid})
    return out


def _decode(row: list[bytes | None]) -> dict[str, str]:
    return {f: v.decode("utf-8", "replace") for f, v in zip(_FIELDS, row, strict=True) if v}


async def _repair_one(service: SchedulingService, eid: str, rec: dict[str, str]) -> bool:
    """Re-create the missing job, or fail a record too corrupt to plan from; True if done."""
    state = rec["state"]
    try:
        result = await service.repair(eid, rec)
    except (ValueError, OverflowError) as exc:  # a field that does not parse
        result, problem = None, str(exc)
    else:
        problem = "fields needed to re-create its job are missing"
    if result is None:
        failed = await service.fail_corrupt(eid, rec, f"{state} with no job; {problem}")
        if failed.ok:
            metrics.reconciled.labels(state=state, action="failed").inc()
            log.error("enrollment had no job and a corrupt record: failed (CorruptRecord)",
                      extra={"enrollment_id": eid, "state": state})  # fmt: skip
        return failed.ok
    if result.job_conflict:
        metrics.job_conflicts.inc()
        log.error("reconciler: job id conflict", extra={"enrollment_id": eid,
                                                       "job": result.job_conflict})  # fmt: skip
    if result.ok:
        metrics.reconciled.labels(state=state, action="recreated").inc()
        log.warning("enrollment had no job: re-created",
                    extra={"enrollment_id": eid, "state": state, "job_id": rec.get("job")})  # fmt: skip
    return result.ok


def reconcile_cron(settings: Settings) -> CronJob:
    """The reconciler as an arq cron job every ``CAMPAIGN_RECONCILE_EVERY`` seconds.

    Its name carries the key prefix, so its job ids (``<name>:<tick ms>``) do too: one run
    per tick across all workers of one deployment, and none shared with another.
    """
    every = settings.reconcile_every
    if every < 60:
        when: dict[str, Any] = {"second": set(range(0, 60, every))}
    else:
        when = {"minute": set(range(0, 60, every // 60)) if every < 3600 else {0}, "second": 0}
    return cron(
        reconcile,
        name=f"{settings.key_prefix}:reconcile",
        keep_result=float(every),
        max_tries=1,
        timeout=max(settings.job_timeout, 300.0),
        **when,
    )
