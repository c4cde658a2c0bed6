"""Queue-wide numbers for ``/metrics``, read from Redis cheaply (O(1)/O(log n) commands).

Every worker reports the same values, so dashboards and alerts aggregate these with
``max without(instance)``, never ``sum``.

Per-campaign enrollment counts cost a few commands per campaign, so with many campaigns
they are bounded three ways: they are read in slices (one script call per shard and
``_SLICE`` campaigns, so the event loop and ``/livez`` are never held for long), at most
as often as their own cost allows (never more than ~5 % of the time), and only the
``CAMPAIGN_METRICS_MAX_CAMPAIGNS`` most active campaigns get series of their own; the
others are summed under ``campaign="_other"`` (no campaign id can start with ``_``).
"""

from __future__ import annotations

import asyncio
import time

from arq.connections import ArqRedis
from redis.asyncio.cluster import RedisCluster

from app.connection import is_cluster
from app.keys import Keys
from app.models import ACTIVE_STATES, State
from app.settings import Settings
from worker.metrics import Metrics, metrics

__all__ = ["HEARTBEAT_STALE_SECONDS", "OTHER_CAMPAIGNS", "QueueStats"]

HEARTBEAT_STALE_SECONDS = 30.0
#: The ``campaign`` label that sums the campaigns without series of their own.
OTHER_CAMPAIGNS = "_other"
#: Campaigns whose counts are read in one round trip.
_SLICE = 500
#: Per-campaign counts take at most 1/_COST_SHARE of the time: after a refresh that took
#: d seconds the next one waits at least _COST_SHARE * d.
_COST_SHARE = 20.0
_STATES = [s.value for s in State]
#: SCARD of every key given, in order.
_SCARDS = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('SCARD', key) end
return out
"""
_ACTIVE = {s.value for s in ACTIVE_STATES}


class QueueStats:
    """Refreshes the queue-wide gauges at most once per ``min_interval`` seconds, and the
    per-campaign ones at most as often as their cost allows."""

    def __init__(self, redis: ArqRedis, settings: Settings, m: Metrics = metrics,
                 min_interval: float = 1.0) -> None:  # fmt: skip
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.shards)
        self.metrics = m
        self.min_interval = min_interval
        self.max_campaigns = settings.metrics_max_campaigns
        self._last = 0.0
        self._campaigns_next = 0.0
        self._campaigns_task: asyncio.Task[None] | None = None
        self._scards = redis.register_script(_SCARDS)
        #: Seconds the last per-campaign refresh took (for tests and the debug log).
        self.campaigns_cost = 0.0

    async def refresh(self) -> None:
        now = time.time()
        if now - self._last >= self.min_interval:
            self._last = now
            await self._refresh_queue(now)
        if time.monotonic() >= self._campaigns_next:
            task = self._campaigns_task
            if task is None or task.done():
                task = asyncio.create_task(self._refresh_campaigns())
                self._campaigns_task = task
            # shielded: a scrape that gives up does not cancel the refresh others wait on
            await asyncio.shield(task)

    async def _refresh_queue(self, now: float) -> None:
        now_ms = int(now * 1000)
        shards = self.keys.all_shards()
        memory = await memory_info(self.redis)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcount(self.keys.workers, now - HEARTBEAT_STALE_SECONDS, "+inf")
            for shard in shards:
                pipe.zcount(shard.queue, "-inf", now_ms)
                pipe.zcount(shard.queue, f"({now_ms}", "+inf")
                pipe.zcard(shard.leases)
                pipe.llen(shard.dead)
                pipe.zrange(shard.queue, 0, 0, withscores=True)
            results = await pipe.execute()
        alive = results[0]
        per_shard = results[1 : 1 + 5 * len(shards)]
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

    async def _refresh_campaigns(self) -> None:
        started = time.monotonic()
        try:
            counts = await self._campaign_counts()
            self._publish(counts)
        finally:
            self.campaigns_cost = time.monotonic() - started
            self._campaigns_next = time.monotonic() + max(
                self.min_interval, _COST_SHARE * self.campaigns_cost
            )

    async def _campaign_counts(self) -> dict[str, dict[str, int]]:
        campaigns = sorted(
            m.decode() if isinstance(m, bytes) else str(m)
            for m in await self.redis.smembers(self.keys.campaigns)  # type: ignore[misc]
        )
        shards = self.keys.all_shards()
        out = {cid: dict.fromkeys(_STATES, 0) for cid in campaigns}
        for start in range(0, len(campaigns), _SLICE):
            part = campaigns[start : start + _SLICE]
            # One script call per shard and slice: the SCARDs run in Redis, not as thousands
            # of pipelined commands to build and parse here. A shard's keys share its hash
            # tag, so this works on a Redis Cluster too.
            for shard in shards:
                keys = [shard.state_index(cid, state) for cid in part for state in _STATES]
                counts = await self._scards(keys=keys)
                for i, n in enumerate(counts):
                    out[part[i // len(_STATES)]][_STATES[i % len(_STATES)]] += int(n)
            await asyncio.sleep(0)  # let /livez and the step loop in between slices
        return out

    def _publish(self, counts: dict[str, dict[str, int]]) -> None:
        """Series for the most active campaigns, the rest summed under ``_other``; set in
        one go (no await) so a scrape never sees half of them."""

        def weight(cid: str) -> tuple[int, int, str]:
            c = counts[cid]
            active = sum(n for s, n in c.items() if s in _ACTIVE)
            return (-active, -sum(c.values()), cid)

        ranked = sorted(counts, key=weight)
        own, rest = ranked[: self.max_campaigns], ranked[self.max_campaigns :]
        gauge = self.metrics.enrollments
        gauge.clear()
        for cid in own:
            for state, n in counts[cid].items():
                gauge.labels(campaign=cid, state=state).set(n)
        if rest:
            for state in _STATES:
                gauge.labels(campaign=OTHER_CAMPAIGNS, state=state).set(
                    sum(counts[cid][state] for cid in rest)
                )


async def memory_info(redis: ArqRedis) -> dict[str, int]:
    """``used_memory`` and ``maxmemory`` of the server, or summed over a cluster's masters."""
    if not is_cluster(redis):
        info = await redis.info("memory")
        return {k: int(info.get(k, 0)) for k in ("used_memory", "maxmemory")}
    per_node = await redis.info("memory", target_nodes=RedisCluster.PRIMARIES)
    return {
        k: sum(int(i.get(k, 0)) for i in per_node.values()) for k in ("used_memory", "maxmemory")
    }
