"""Issue 10 on the worker side: ``Retry-After`` honoured only up to the node's
``retry.max_delay`` (and never raising), and ``/metrics`` staying cheap with 10,000
campaigns registered."""

from __future__ import annotations

import asyncio
import math
import random
import time
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app import CampaignClient
from app.campaigns import RetryPolicy
from app.keys import Keys
from app.models import State
from app.settings import Settings
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess
from tests.worker.test_processors import campaign, http, wait_state
from worker.embedded_redis import EmbeddedRedis
from worker.metrics import Metrics
from worker.queue_stats import OTHER_CAMPAIGNS, QueueStats
from worker.retries import backoff_delay

# --- Retry-After -------------------------------------------------------------------------


def test_retry_after_is_honoured_up_to_max_delay() -> None:
    policy = RetryPolicy(backoff="exponential", base_delay=timedelta(seconds=10),
                         max_delay=timedelta(seconds=60), jitter=False)  # fmt: skip
    assert backoff_delay(policy, 1, retry_after=30).total_seconds() == 30  # a floor ...
    assert backoff_delay(policy, 1, retry_after=120).total_seconds() == 60  # ... up to max_delay
    assert backoff_delay(policy, 1, retry_after=1_000_000_000).total_seconds() == 60
    for odd in (300_000_000_000, 1e308, math.inf, 10**400):
        assert backoff_delay(policy, 1, retry_after=odd).total_seconds() == 60
    for ignored in (math.nan, -5, 0, -math.inf):
        assert backoff_delay(policy, 1, retry_after=ignored).total_seconds() == 10
    jittered = policy.model_copy(update={"jitter": True})
    rng = random.Random(3)
    assert all(
        backoff_delay(jittered, 2, retry_after=1e12, rng=rng) == timedelta(seconds=60)
        for _ in range(50)
    )
    # a huge attempt number does not overflow the exponential either
    assert backoff_delay(policy, 10_000).total_seconds() == 60


async def test_a_huge_retry_after_backs_off_only_max_delay(
    redis_server: EmbeddedRedis, client: CampaignClient, svc: FakeService
) -> None:
    retry = {"max_attempts": 3, "backoff": "fixed", "base_delay": 0.05, "max_delay": 0.5,
             "jitter": False}  # fmt: skip
    await client.register_campaign(
        campaign("rl", {"first": http("/ratelimit/300000000000", svc, retry=retry)})
    )
    worker = WorkerProcess(redis_server.url).start()
    try:
        await worker.wait_status("/readyz", 200)
        st = await client.enroll("rl", "a")
        done = await wait_state(client, st.enrollment_id, State.COMPLETED, timeout=20)
    finally:
        assert worker.stop() == 0
    first, second = svc.calls_for(st.enrollment_id)
    assert 0.45 <= second.at - first.at < 5  # max_delay, not the 9,500 years asked for
    retried = [h for h in done.history if h.reason.startswith("retry in")]
    assert len(retried) == 1 and retried[0].reason.startswith("retry in 0.5s")
    assert not any("Traceback" in line for line in worker.raw)


# --- /metrics with many campaigns ---------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "campaign_enrollments":
                out[(s.labels["campaign"], s.labels["state"])] = s.value
    return out


async def test_metrics_with_ten_thousand_campaigns_stay_cheap(
    settings: Settings, redis: Any
) -> None:
    keys = Keys(settings.key_prefix, settings.shards)
    n = 10_000
    async with redis.pipeline(transaction=False) as pipe:
        for start in range(0, n, 1000):
            pipe.sadd(keys.campaigns, *(f"camp-{i:05d}" for i in range(start, start + 1000)))
        # a few campaigns with enrollments: the busiest get series of their own
        shard = keys.shard(0)
        for i in range(150):
            pipe.sadd(shard.state_index(f"camp-{i:05d}", "scheduled"), *range(i + 1))
            pipe.sadd(shard.state_index(f"camp-{i:05d}", "completed"), *range(3))
        await pipe.execute()

    stats = QueueStats(redis, settings, Metrics(CollectorRegistry()))
    assert stats.max_campaigns == 100

    # /livez keeps answering while the counts are read: the loop is never held for long
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    started = time.perf_counter()
    await stats.refresh()
    first = time.perf_counter() - started
    body = generate_latest(stats.metrics.registry)
    scrape = time.perf_counter() - started
    stop.set()
    await tick

    data = _samples(body.decode())
    campaigns = {c for c, _ in data}
    assert len(campaigns) == 101 and OTHER_CAMPAIGNS in campaigns  # 100 + the rest summed
    assert "camp-00149" in campaigns and "camp-00049" not in campaigns  # the busiest kept
    assert data[("camp-00149", "scheduled")] == 150
    # the others are summed, so totals stay right: 1+...+50 scheduled, 3 completed each
    assert data[(OTHER_CAMPAIGNS, "scheduled")] == sum(range(1, 51))
    assert data[(OTHER_CAMPAIGNS, "completed")] == 9_900 * 0 + 50 * 3
    assert len(body) < 100_000, len(body)
    assert first < 5, first
    assert max(gaps) < 0.25, max(gaps)

    # the next scrapes do not read the 10,000 campaigns again until their cost allows
    started = time.perf_counter()
    for _ in range(5):
        stats._last = 0.0  # the queue-wide gauges every time, as if a second had passed
        await stats.refresh()
    again = (time.perf_counter() - started) / 5
    assert again < 0.05, again
    print(
        f"\n/metrics with {n} campaigns: first scrape {scrape * 1000:.0f} ms "
        f"(per-campaign refresh {stats.campaigns_cost * 1000:.0f} ms, longest event-loop "
        f"stall {max(gaps) * 1000:.0f} ms, {len(body)} bytes); later scrapes "
        f"{again * 1000:.1f} ms"
    )


async def test_metrics_max_campaigns_zero_sums_everything(settings: Settings, redis: Any) -> None:
    keys = Keys(settings.key_prefix, settings.shards)
    await redis.sadd(keys.campaigns, "a", "b")
    await redis.sadd(keys.shard(0).state_index("a", "waiting"), "x", "y")
    stats = QueueStats(
        redis,
        settings.model_copy(update={"metrics_max_campaigns": 0}),
        Metrics(CollectorRegistry()),
    )
    await stats.refresh()
    data = _samples(generate_latest(stats.metrics.registry).decode())
    assert {c for c, _ in data} == {OTHER_CAMPAIGNS}
    assert data[(OTHER_CAMPAIGNS, "waiting")] == 2


@pytest.mark.parametrize("n", [3])
async def test_per_campaign_series_drop_campaigns_that_leave_the_top(
    settings: Settings, redis: Any, n: int
) -> None:
    keys = Keys(settings.key_prefix, settings.shards)
    await redis.sadd(keys.campaigns, *(f"c{i}" for i in range(n)))
    await redis.sadd(keys.shard(0).state_index("c0", "scheduled"), "x")
    stats = QueueStats(
        redis,
        settings.model_copy(update={"metrics_max_campaigns": 1}),
        Metrics(CollectorRegistry()),
    )
    await stats.refresh()
    assert "c0" in {c for c, _ in _samples(generate_latest(stats.metrics.registry).decode())}
    await redis.delete(keys.shard(0).state_index("c0", "scheduled"))
    await redis.sadd(keys.shard(0).state_index("c2", "waiting"), "x", "y")
    stats._campaigns_next = 0.0
    await stats.refresh()
    data = _samples(generate_latest(stats.metrics.registry).decode())
    assert {c for c, _ in data} == {"c2", OTHER_CAMPAIGNS}
    assert data[("c2", "waiting")] == 2
