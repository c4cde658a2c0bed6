"""/metrics counts what happened: successes, retries, failures, stale and poison jobs."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from app import CampaignClient
from app.models import State
from app.settings import Settings
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from tests.worker.test_processors import campaign, fast_retry, http, wait_state
from worker.embedded_redis import EmbeddedRedis


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(data: dict[Any, float], name: str, **labels: str) -> float:
    return data.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_match_what_happened(
    redis_server: EmbeddedRedis, client: CampaignClient, svc: FakeService, settings: Settings
) -> None:
    worker = WorkerProcess(redis_server.url).start()
    try:
        await worker.wait_status("/readyz", 200)
        await client.register_campaign(campaign("ok", {"first": http("/ok", svc)}))
        await client.register_campaign(
            campaign("flaky", {"first": http("/flaky/2", svc, retry=fast_retry(5, 0.05))})
        )
        await client.register_campaign(campaign("bad", {"first": http("/bad", svc)}))
        ids = [(await client.enroll("ok", f"c{i}")).enrollment_id for i in range(3)]
        ids.append((await client.enroll("flaky", "f")).enrollment_id)
        for eid in ids:
            await wait_state(client, eid, State.COMPLETED)
        bad = (await client.enroll("bad", "b")).enrollment_id
        await wait_state(client, bad, State.FAILED)

        # a stale job: the job of a cancelled enrollment put back in the queue
        from datetime import UTC, datetime, timedelta

        late = await client.service.enroll("ok", "late", now=datetime.now(UTC) + timedelta(hours=1))
        job_id = f"step:{late.enrollment_id}:1:1"
        shard = client.service.keys.shard(0)
        payload = await client.redis.hget(shard.jobs, job_id)
        assert await client.cancel(late.enrollment_id)
        await client.redis.hset(shard.jobs, job_id, payload)
        await client.redis.zadd(shard.queue, {job_id: 1})
        # and a poison job
        await client.redis.hset(shard.jobs, "junk", b"not json")
        await client.redis.zadd(shard.queue, {"junk": 1})

        async def settled() -> Any:
            code, text = await worker.get("/metrics")
            data = samples(text)
            done = value(data, "campaign_jobs_total", function="run_step", outcome="stale") >= 1
            poisoned = value(data, "campaign_poison_jobs_total", reason="malformed") >= 1
            # queue-wide gauges are read from Redis at most once a second
            gauges = value(data, "campaign_dead_letter_jobs") >= 1
            return data if code == 200 and done and poisoned and gauges else None

        data = await eventually(settled, 15, 0.1, "stale and poison counted")
    finally:
        assert worker.stop() == 0

    jobs = {o: value(data, "campaign_jobs_total", function="run_step", outcome=o)
            for o in ("success", "retry", "failed", "stale", "rescheduled", "error")}  # fmt: skip
    assert jobs == {"success": 4, "retry": 2, "failed": 1, "stale": 1, "rescheduled": 0, "error": 0}
    calls = {o: value(data, "campaign_action_calls_total", action="http", outcome=o)
             for o in ("success", "transient", "permanent")}  # fmt: skip
    assert calls == {"success": 4, "transient": 2, "permanent": 1}
    assert value(data, "campaign_poison_jobs_total", reason="malformed") == 1
    assert value(data, "campaign_transitions_total", to_state="completed") == 4
    assert value(data, "campaign_transitions_total", to_state="failed") == 1
    # the stale job is dropped when claimed, before it runs: 7 runs, 8 jobs counted
    assert value(data, "campaign_job_lateness_seconds_count", function="run_step") == 7
    assert value(data, "campaign_enrollments", campaign="ok", state="completed") == 3
    assert value(data, "campaign_enrollments", campaign="ok", state="cancelled") == 1
    assert value(data, "campaign_enrollments", campaign="bad", state="failed") == 1
    assert value(data, "campaign_dead_letter_jobs") == 1
    assert value(data, "campaign_workers_alive") == 1
    assert value(data, "campaign_redis_up") == 1
