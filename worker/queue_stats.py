"""Queue-wide numbers for ``/metrics``, read from Redis cheaply (O(1)/O(log n) commands).

Every worker reports the same values, so dashboards and alerts aggregate these with
``max without(instance)``, never ``sum``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from arq.connections import ArqRedis

from app.keys import Keys
from app.models import State
from app.settings import Settings
from worker.metrics import Metrics, metrics

__all__ = ["HEARTBEAT_STALE_SECONDS", "QueueStats", "workers_key"]

HEARTBEAT_STALE_SECONDS = 30.0


def workers_key(keys: Keys) -> str:
    """Sorted set of worker ids scored by their last heartbeat (epoch seconds)."""
    return keys.workers


class QueueStats:
    """Refreshes the queue-wide gauges at most once per ``min_interval`` seconds."""

    def __init__(self, redis: ArqRedis, settings: Settings, m: Metrics = metrics,
                 min_interval: float = 1.0) -> None:  # fmt: skip
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.shards)
        self.metrics = m
        self.min_interval = min_interval
        self._last = 0.0

    async def refresh(self) -> None:
        now = time.time()
        if now - self._last < self.min_interval:
            return
        self._last = now
        now_ms = int(now * 1000)
        campaigns = sorted(
            m.decode() if isinstance(m, bytes) else str(m)
            for m in await self.redis.smembers(self.keys.campaigns)  # type: ignore[misc]
        )
        shards = self.keys.all_shards()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(self.keys.workers, now - HEARTBEAT_STALE_SECONDS, "+inf")
            pipe.info("memory")
            for shard in shards:
                pipe.zcount(shard.queue, "-inf", now_ms)
                pipe.zcount(shard.queue, f"({now_ms}", "+inf")
                pipe.zcard(shard.leases)
                pipe.llen(shard.dead)
                pipe.zrange(shard.queue, 0, 0, withscores=True)
            for cid in campaigns:
                for shard in shards:
                    for state in State:
                        pipe.scard(shard.state_index(cid, state.value))
            results = await pipe.execute()
        alive, memory = results[:2]
        per_shard = results[2 : 2 + 5 * len(shards)]
        due = sum(per_shard[0::5])
        deferred = sum(per_shard[1::5])
        running = sum(per_shard[2::5])
        dead = sum(per_shard[3::5])
        oldest = [float(first[0][1]) for first in per_shard[4::5] if first]
        self.metrics.redis_memory.labels(kind="used").set(int(memory.get("used_memory", 0)))
        self.metrics.redis_memory.labels(kind="max").set(int(memory.get("maxmemory", 0)))
        self.metrics.queue_jobs.labels(state="due").set(due)
        self.metrics.queue_jobs.labels(state="deferred").set(deferred)
        self.metrics.queue_jobs.labels(state="in_progress").set(running)
        self.metrics.dead_letters.set(dead)
        self.metrics.workers_alive.set(alive)
        # Running jobs sit in the leases set, so the queue's first entry is the oldest waiting.
        first = min(oldest) if oldest else None
        age = max(0.0, now - first / 1000) if first is not None and first <= now_ms else 0.0
        self.metrics.oldest_due_age.set(age)
        counts = iter(results[2 + 5 * len(shards) :])
        for cid in campaigns:
            totals = dict.fromkeys((s.value for s in State), 0)
            for _shard in shards:
                for state in State:
                    totals[state.value] += next(counts)
            for state_name, n in totals.items():
                self.metrics.enrollments.labels(campaign=cid, state=state_name).set(n)

    def hook(self) -> Callable[[], Awaitable[None]]:
        return self.refresh
