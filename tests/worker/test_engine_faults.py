"""The step engine under faults, on real worker subprocesses: Redis killed during claims,
MISCONF (a failed BGSAVE), and two deployments (key prefixes) sharing one Redis."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

from app import CampaignClient
from app.connection import create_redis
from app.settings import Settings
from tests.conftest import start_redis
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from worker.embedded_redis import EmbeddedRedis

N = 150


def slow_campaign(svc: FakeService, cid: str = "steady", delay: float = 0.5) -> dict[str, Any]:
    # a delay then a call: the steps come due a little after enrollment
    return {"id": cid, "entry": "wait", "nodes": {
        "wait": {"type": "delay", "duration": delay, "next": "call"},
        "call": {"type": "action", "action": "http", "params": {"url": svc.url("/ok")},
                 "next": None, "retry": {"max_attempts": 10, "backoff": "fixed",
                                         "base_delay": 0.2, "jitter": False}}}}  # fmt: skip


async def all_done(client: CampaignClient, cid: str, n: int, timeout: float = 60) -> None:
    async def check() -> bool:
        counts = await client.service.store.count_by_state(cid)
        return counts["completed"] == n

    await eventually(check, timeout, 0.1, f"{n} enrollments of {cid} completed")


async def enroll_over(client: CampaignClient, cid: str, n: int, seconds: float) -> None:
    """Enroll ``n`` contacts spread over ``seconds``, so steps come due all along."""
    batch = max(1, n // 10)
    for start in range(0, n, batch):
        rows = [{"contact_id": f"p{i}"} for i in range(start, min(n, start + batch))]
        await client.enroll_many(cid, rows)
        await asyncio.sleep(seconds / 10)


def one_call_each(svc: FakeService, n: int) -> None:
    keys = Counter(c.key for c in svc.calls)
    assert len(keys) == n, len(keys)
    # at-least-once: a call whose outcome was lost with Redis may be repeated, always with
    # the same idempotency key; never a second key for one step
    assert all(k.endswith(":2") for k in keys), keys.most_common(3)


async def test_redis_killed_during_claims_pauses_and_resumes(
    private_redis: EmbeddedRedis, svc: FakeService
) -> None:
    settings = Settings(redis_url=private_redis.url)  # type: ignore[arg-type]
    worker = WorkerProcess(private_redis.url).start()  # default settings
    try:
        await worker.wait_status("/readyz", 200)
        async with CampaignClient(settings=settings) as client:
            await client.register_campaign(slow_campaign(svc))
            await enroll_over(client, "steady", N // 2, 1.0)
            private_redis.kill()  # SIGKILL: no goodbye, mid-claim for all the worker knows
            body = await worker.wait_status("/readyz", 503)
            assert "redis" in body["reason"]
            await asyncio.sleep(1.0)
            private_redis.start()  # AOF everysec: at most the last second is lost
            back = time.monotonic()
            await worker.wait_status("/readyz", 200, timeout=10)
            ready_after = time.monotonic() - back
            await client.enroll_many("steady", [{"contact_id": f"p{i}"} for i in range(N // 2, N)])
            await all_done(client, "steady", N)
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        assert worker.stop() == 0
    assert ready_after <= 5.0, ready_after
    one_call_each(svc, N)
    assert "redis unavailable, pausing the step loop" in worker.messages()
    assert "redis is back, resuming the step loop" in worker.messages()


async def test_misconf_pauses_then_resumes(tmp_path: Path, svc: FakeService) -> None:
    # stop-writes-on-bgsave-error (the default): a failed BGSAVE makes Redis refuse writes
    server = start_redis(tmp_path / "misconf", "--enable-protected-configs", "yes",
                         "--appendonly", "no", "--save", "3600 1",
                         "--stop-writes-on-bgsave-error", "yes")  # fmt: skip
    settings = Settings(redis_url=server.url)  # type: ignore[arg-type]
    admin = create_redis(settings)
    worker = WorkerProcess(server.url).start()
    try:
        await worker.wait_status("/readyz", 200)
        async with CampaignClient(settings=settings) as client:
            # due in 2 s, when Redis refuses writes: the claims that start them fail
            await client.register_campaign(slow_campaign(svc, delay=2.0))
            await client.enroll_many("steady", [{"contact_id": f"p{i}"} for i in range(N)])
            data_dir = (await admin.config_get("dir"))["dir"]
            await admin.config_set("dir", "/proc")  # nobody, not even root, can save there
            await admin.bgsave()
            body = await worker.wait_status("/readyz", 503, timeout=15)
            assert "MISCONF" in body["reason"], body
            await admin.config_set("dir", data_dir)
            await admin.bgsave()
            back = time.monotonic()
            await worker.wait_status("/readyz", 200, timeout=10)
            ready_after = time.monotonic() - back
            await all_done(client, "steady", N)
        assert worker.proc is not None and worker.proc.poll() is None
    finally:
        await admin.aclose()
        assert worker.stop() == 0
        server.close()
    assert ready_after <= 5.0, ready_after
    one_call_each(svc, N)


async def test_two_prefixes_share_one_redis(redis_server: EmbeddedRedis, redis: Any,
                                            svc: FakeService) -> None:  # fmt: skip
    workers = {
        prefix: WorkerProcess(redis_server.url, CAMPAIGN_KEY_PREFIX=prefix).start()
        for prefix in ("prod", "staging")
    }
    try:
        for proc in workers.values():
            await proc.wait_status("/readyz", 200)
        clients = {
            prefix: CampaignClient(settings=Settings(redis_url=redis_server.url,  # type: ignore[arg-type]
                                                     key_prefix=prefix))
            for prefix in workers
        }  # fmt: skip
        for client in clients.values():
            await client.register_campaign(slow_campaign(svc))
            await client.enroll_many("steady", [{"contact_id": f"p{i}"} for i in range(50)])
        for client in clients.values():
            await all_done(client, "steady", 50)
            await client.close()
    finally:
        for proc in workers.values():
            assert proc.stop() == 0
    # each deployment ran its own 50 steps, and only those
    for prefix, proc in workers.items():
        started = [d for d in proc.lines if d.get("msg") == "job started"]
        assert len({d["job_id"] for d in started}) == 50, prefix
    assert Counter(c.key for c in svc.calls) == {f"steady:p{i}:2": 2 for i in range(50)}
    # every key carries a prefix: ours directly, arq's through the job id
    keys = [k.decode() for k in await redis.keys("*")]
    assert keys and all(k.startswith(("prod:", "staging:")) or (k.startswith("arq:") and (
        ":prod:" in k or ":staging:" in k)) for k in keys), keys  # fmt: skip


async def test_leases_are_renewed_through_the_drain(
    redis_server: EmbeddedRedis, client: CampaignClient, svc: FakeService
) -> None:
    # a grace (4 s) longer than the lease (1 s): the running step must stay ours throughout
    worker = WorkerProcess(redis_server.url, CAMPAIGN_LEASE="1", CAMPAIGN_SHUTDOWN_GRACE="4")
    worker.start()
    try:
        await worker.wait_status("/readyz", 200)
        await client.register_campaign({"id": "slow", "entry": "a", "nodes": {
            "a": {"type": "action", "action": "http", "params": {"url": svc.url("/hang")},
                  "next": None}}})  # fmt: skip
        st = await client.enroll("slow", "a")
        await asyncio.wait_for(svc.hung.wait(), 15)
        worker.signal()  # SIGTERM while the call is held open
        shard = client.service.keys.for_enrollment(st.enrollment_id)
        job = f"step:{st.enrollment_id}:1:1"
        until = time.monotonic() + 2.5
        while time.monotonic() < until:  # 2.5 lease lengths into the drain
            expiry = await client.redis.zscore(shard.leases, job)
            assert expiry is not None and expiry > time.time() * 1000, "lease lapsed in drain"
            await asyncio.sleep(0.1)
        svc.release.set()
        assert await asyncio.to_thread(worker.wait, 10) == 0  # the stand-in runs on this loop
    finally:
        worker.kill()
    done = await client.status(st.enrollment_id)
    assert done.state == "completed" and done.attempt == 1, [h.reason for h in done.history]
    assert len(svc.calls_for(st.enrollment_id)) == 1


async def test_a_worker_with_another_shard_count_exits_2(redis_server: EmbeddedRedis,
                                                         redis: Any) -> None:  # fmt: skip
    await redis.set("campaign:shards", 4)
    worker = WorkerProcess(redis_server.url).start()
    try:
        assert await asyncio.to_thread(worker.wait, 20) == 2
    finally:
        worker.kill()
    errors = [line for line in worker.raw if "CAMPAIGN_SHARDS" in line]
    assert len(errors) == 1 and "holds 4 shard(s)" in errors[0], worker.raw[-5:]
    assert not any("Traceback" in line for line in worker.raw)
