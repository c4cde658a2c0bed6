"""Test helpers that look at (and act on) the campaign job queue the way a worker would."""

from __future__ import annotations

import time
from typing import Any

import orjson
from arq.connections import ArqRedis

from app.keys import Keys
from app.scheduling import SchedulingService
from worker.step_queue import Claim, ClaimBatch, StepQueue


def keys_of(service: SchedulingService) -> Keys:
    return service.keys


async def queued(redis: ArqRedis, keys: Keys) -> dict[str, int]:
    """Every queued campaign job: job id -> due time (ms), across shards."""
    out: dict[str, int] = {}
    for shard in keys.all_shards():
        for k, v in await redis.zrange(shard.queue, 0, -1, withscores=True):
            out[k.decode()] = int(v)
    return out


async def leased(redis: ArqRedis, keys: Keys) -> dict[str, int]:
    """Every leased (running) campaign job: job id -> lease expiry (ms)."""
    out: dict[str, int] = {}
    for shard in keys.all_shards():
        for k, v in await redis.zrange(shard.leases, 0, -1, withscores=True):
            out[k.decode()] = int(v)
    return out


async def payload(redis: ArqRedis, keys: Keys, job_id: str) -> dict[str, Any] | None:
    """A job's stored payload, decoded, or None."""
    for shard in keys.all_shards():
        raw = await redis.hget(shard.jobs, job_id)  # type: ignore[misc]
        if raw is not None:
            doc: dict[str, Any] = orjson.loads(raw)
            return doc
    return None


async def job_exists(redis: ArqRedis, keys: Keys, job_id: str) -> bool:
    return await payload(redis, keys, job_id) is not None


async def dead_letters(redis: ArqRedis, keys: Keys) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for shard in keys.all_shards():
        out.extend(orjson.loads(x) for x in await redis.lrange(shard.dead, 0, -1))  # type: ignore[misc]
    return out


async def claim_due(
    service: SchedulingService, limit: int = 1000, now_ms: int | None = None, lease: float = 10.0
) -> ClaimBatch:
    """Claim due jobs as a worker would (enrollments move to running)."""
    queue = StepQueue(service.redis, service.keys, lease_seconds=lease,
                      history_limit=service.settings.history_limit)  # fmt: skip
    return await queue.claim(limit, now_ms)


async def claim_one(service: SchedulingService, enrollment_id: str) -> Claim:
    """Claim the current job of one enrollment and no other: it is made due at time 0 and
    claimed "at" time 0, with a lease that still ends 10 s from now."""
    rec = await service.store.record(enrollment_id)
    assert rec is not None and rec.get("job"), f"{enrollment_id} has no job: {rec}"
    shard = service.keys.for_enrollment(enrollment_id)
    await service.redis.zadd(shard.queue, {rec["job"]: 0}, xx=True)
    lease = time.time() + 10
    batch = await claim_due(service, now_ms=0, lease=lease)
    for claim in batch.claims:
        if claim.job_id == rec["job"]:
            return claim
    raise AssertionError(f"job {rec['job']} of {enrollment_id} not claimed: {batch}")
