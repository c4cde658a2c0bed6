"""The reconciler: nothing stays active without a job.

A periodic arq cron job (one worker at a time: its job id is unique per tick) walks the
state index sets of ``scheduled``, ``waiting`` and ``running`` enrollments in slices and
repairs any whose current job is neither queued nor leased: a job lost in a Redis crash
window, a dead-lettered payload, or a bug. The check is repeated atomically inside the
repair, so a job that was only moving between the queue and a lease is left alone. Each
run walks for at most ``RUN_BUDGET`` seconds and the next goes on from where it stopped,
so a run stays short however many enrollments there are.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from arq.cron import CronJob, cron

from app.models import State
from app.scheduling import SchedulingService
from app.settings import Settings
from app.store import with_derived
from worker.metrics import metrics
from worker.redis_errors import is_redis_error

__all__ = [
    "RUN_BUDGET",
    "SLICE",
    "reconcile",
    "reconcile_cron",
    "reconcile_run",
    "repair_missing_jobs",
]

log = logging.getLogger("worker.reconciler")

SLICE = 500
#: Seconds one scheduled run may walk before it leaves the rest to the next run.
RUN_BUDGET = 10.0
_FIELDS = ("state", "job", "step", "attempt", "campaign", "version", "timezone", "base_step",
           "node", "run_at", "deadline")  # fmt: skip
_STATES = (State.SCHEDULED.value, State.WAITING.value, State.RUNNING.value)


async def reconcile(ctx: dict[str, Any], budget: float | None = None) -> dict[str, int]:
    """Walk the active enrollments from where the last run stopped, for at most ``budget``
    seconds (``RUN_BUDGET``; None: to the end), and repair what lacks a job. The position
    is kept in Redis, so with millions of enrollments each run takes one bounded part of
    the walk and a full cycle spans several runs. Returns how many were repaired, by state.
    """
    service: SchedulingService = ctx["service"]
    redis = service.redis
    deadline = None if budget is None else time.monotonic() + budget
    position_key = service.keys.reconcile_cursor
    raw = await redis.get(position_key)
    start = _position(raw, service.keys.shards)
    repaired = dict.fromkeys(_STATES, 0)
    checked = 0
    campaigns = await service.registry.ids()
    walk = [(c, n, st) for c in campaigns for n in range(service.keys.shards) for st in _STATES]
    first = next((i for i, w in enumerate(walk) if w[:3] == start[:3]), 0) if start else 0
    cursor = start[3] if start and first < len(walk) and walk[first][:3] == start[:3] else 0
    for campaign_id, n, state in walk[first:]:
        key = service.keys.shard(n).state_index(campaign_id, state)
        while True:
            cursor, members = await redis.sscan(key, cursor, count=SLICE)
            ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
            checked += len(ids)
            if ids:
                for found, count in (await repair_missing_jobs(service, ids)).items():
                    repaired[found] += count
            if int(cursor) == 0:
                break
            if deadline is not None and time.monotonic() >= deadline:
                # Out of time: the next run goes on from here.
                await redis.set(position_key, orjson.dumps([campaign_id, n, state, int(cursor)]))
                _report(repaired, checked, done=False)
                return repaired
        cursor = 0
        if deadline is not None and time.monotonic() >= deadline:  # small sets end in one call
            following = walk.index((campaign_id, n, state)) + 1
            if following < len(walk):
                await redis.set(position_key, orjson.dumps([*walk[following], 0]))
                _report(repaired, checked, done=False)
                return repaired
    await redis.delete(position_key)  # a whole cycle done: the next run starts over
    _report(repaired, checked, done=True)
    return repaired


async def reconcile_run(ctx: dict[str, Any]) -> dict[str, int]:
    """The scheduled run: :func:`reconcile` for at most ``RUN_BUDGET`` seconds, and well
    inside its tick, so that two runs never walk at the same time."""
    every = ctx["settings"].reconcile_every if "settings" in ctx else RUN_BUDGET
    return await reconcile(ctx, min(RUN_BUDGET, 0.8 * every))


def _position(raw: bytes | None, shards: int) -> tuple[str, int, str, int] | None:
    """Where the last run stopped, or None to start over (none stored, or unreadable)."""
    try:
        campaign_id, n, state, cursor = orjson.loads(raw) if raw else (None, 0, "", 0)
    except (ValueError, TypeError):
        return None
    if (
        not isinstance(campaign_id, str)
        or not isinstance(n, int) or not 0 <= n < shards
        or state not in _STATES
        or not isinstance(cursor, int) or not 0 <= cursor < 2**63
    ):  # fmt: skip
        return None
    return campaign_id, n, state, cursor


def _report(repaired: dict[str, int], checked: int, *, done: bool) -> None:
    extra = {"repaired": repaired, "checked": checked, "cycle_done": done}
    if any(repaired.values()):
        log.warning("reconciler repaired enrollments", extra=extra)
    else:
        log.info("reconciler run", extra=extra)


async def repair_missing_jobs(service: SchedulingService, ids: list[str]) -> dict[str, int]:
    """Re-create the job of each active enrollment in ``ids`` that has none queued or
    leased (failing a record too corrupt to plan from); returns how many, by state."""
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
        reconcile_run,
        name=settings.arq_job_id("reconcile"),
        keep_result=float(every),
        max_tries=1,
        timeout=max(settings.job_timeout, 300.0),
        **when,
    )
