"""Queue-wide numbers for ``/metrics``, read from Redis cheaply (O(1)/O(log n) commands).

Every worker reports the same values, so dashboards and alerts aggregate these with
``max without(instance)``, never ``sum``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from app.keys import Keys
from app.models import State
from app.settings import Settings
from worker.metrics import Metrics, metrics

__all__ = ["HEARTBEAT_STALE_SECONDS", "QueueStats", "workers_key"]

HEARTBEAT_STALE_SECONDS = 30.0
_OLDEST_PROBE = 50  # due jobs inspected, beyond the running ones, to find one not started
_OLDEST_PROBE_MAX = 5000


def workers_key(keys: Keys) -> str:
    """Sorted set of worker ids scored by their last heartbeat (epoch seconds)."""
    return keys.workers


class QueueStats:
    """Refreshes the queue-wide gauges at most once per ``min_interval`` seconds."""

    def __init__(self, redis: ArqRedis, settings: Settings, m: Metrics = metrics,
                 min_interval: float = 1.0) -> None:  # fmt: skip
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.metrics = m
        self.min_interval = min_interval
        self._last = 0.0

    async def refresh(self) -> None:
        now = time.time()
        if now - self._last < self.min_interval:
            return
        self._last = now
        queue = self.settings.queue_name
        now_ms = int(now * 1000)
        campaigns = sorted(
            m.decode() if isinstance(m, bytes) else str(m)
            for m in await self.redis.smembers(self.keys.campaigns)  # type: ignore[misc]
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(queue, "-inf", now_ms)
            pipe.zcount(queue, f"({now_ms}", "+inf")
            pipe.llen(self.keys.poison)
            pipe.zcount(workers_key(self.keys), now - HEARTBEAT_STALE_SECONDS, "+inf")
            pipe.info("memory")
            for cid in campaigns:
                for state in State:
                    pipe.scard(self.keys.state_index(cid, state.value))
            results = await pipe.execute()
        due, deferred, dead, alive, memory = results[:5]
        self.metrics.redis_memory.labels(kind="used").set(int(memory.get("used_memory", 0)))
        self.metrics.redis_memory.labels(kind="max").set(int(memory.get("maxmemory", 0)))
        self.metrics.queue_jobs.labels(state="deferred").set(deferred)
        self.metrics.dead_letters.set(dead)
        self.metrics.workers_alive.set(alive)
        counts = iter(results[5:])
        running = 0
        for cid in campaigns:
            for state in State:
                n = next(counts)
                self.metrics.enrollments.labels(campaign=cid, state=state.value).set(n)
                if state == State.RUNNING:
                    running += n
        self.metrics.queue_jobs.labels(state="in_progress").set(running)
        # arq keeps a running job in its queue until it ends: those are not waiting.
        self.metrics.queue_jobs.labels(state="due").set(max(0, due - running))
        self.metrics.oldest_due_age.set(await self._oldest_waiting_age(now_ms, running))

    async def _oldest_waiting_age(self, now_ms: int, running: int) -> float:
        """Age of the oldest due job that has not started. Running jobs stay in arq's queue
        and may be the oldest, so look past as many as are running."""
        probe = min(running + _OLDEST_PROBE, _OLDEST_PROBE_MAX)
        oldest = await self.redis.zrangebyscore(
            self.settings.queue_name, "-inf", now_ms, start=0, num=probe, withscores=True
        )
        if not oldest:
            return 0.0
        now = now_ms / 1000
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, _ in oldest:
                pipe.exists(
                    in_progress_key_prefix
                    + (job_id.decode() if isinstance(job_id, bytes) else job_id)
                )
            started = await pipe.execute()
        for (_, score), busy in zip(oldest, started, strict=True):
            if not busy:
                return max(0.0, now - float(score) / 1000)
        return 0.0

    def hook(self) -> Callable[[], Awaitable[None]]:
        return self.refresh
