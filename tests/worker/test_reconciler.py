"""The reconciler, called directly on a real Redis: lost jobs re-created, healthy ones left
alone, corrupt records failed by name, and no record stopping the pass."""

from __future__ import annotations

import orjson

from app.client import CampaignClient
from app.jobs import timeout_job_id
from tests.queue_view import claim_one, queued
from worker.reconciler import reconcile

WAIT = {"id": "w", "entry": "w", "nodes": {
    "w": {"type": "wait", "event": "e", "timeout": "P1D", "on_event": None}}}  # fmt: skip


async def test_lost_jobs_are_recreated_and_corrupt_records_failed(client: CampaignClient) -> None:
    await client.register_campaign(WAIT)
    await client.enroll_many("w", ({"contact_id": f"p{i:02d}"} for i in range(50)))
    keys = client.service.keys
    shard = keys.shard(0)
    before = await queued(client.redis, keys)
    lost = [f"w:p{i:02d}" for i in range(0, 50, 2)]  # every other one loses its job
    for eid in lost:
        await client.redis.zrem(shard.queue, timeout_job_id(eid, 1))
        await client.redis.hdel(shard.jobs, timeout_job_id(eid, 1))
    await client.redis.hset(shard.enrollment("w:p10"), "step", "x")  # lost and corrupt
    await client.redis.hset(shard.enrollment("w:p20"), "deadline", b"\xff")  # lost, not UTF-8
    repaired = await reconcile({"service": client.service})
    assert repaired == {"scheduled": 0, "waiting": 25, "running": 0}
    after = await queued(client.redis, keys)
    assert set(after) == set(before) - {timeout_job_id("w:p10", 1), timeout_job_id("w:p20", 1)}
    for eid in lost:
        if eid in ("w:p10", "w:p20"):
            raw = await client.redis.hgetall(shard.enrollment(eid))
            assert raw[b"state"] == b"failed", eid
            assert orjson.loads(raw[b"error"])["type"] == "CorruptRecord"
            assert await client.redis.sismember(shard.state_index("w", "failed"), eid)
        else:
            assert after[timeout_job_id(eid, 1)] == before[timeout_job_id(eid, 1)]
    # a second pass finds nothing to do
    assert await reconcile({"service": client.service}) == {"scheduled": 0, "waiting": 0,
                                                            "running": 0}  # fmt: skip


async def test_a_running_step_with_no_lease_goes_back_to_scheduled(client: CampaignClient) -> None:
    await client.register_campaign({"id": "r", "entry": "a", "nodes": {
        "a": {"type": "action", "action": "log", "next": None}}})  # fmt: skip
    st = await client.enroll("r", "x")
    claim = await claim_one(client.service, st.enrollment_id)
    await client.redis.zrem(claim.shard.leases, claim.job_id)  # lost with a Redis crash
    assert await reconcile({"service": client.service}) == {"scheduled": 0, "waiting": 0,
                                                            "running": 1}  # fmt: skip
    status = await client.status(st.enrollment_id)
    assert status.state == "scheduled" and status.attempt == 1
    assert claim.job_id in await queued(client.redis, client.service.keys)


async def test_a_run_out_of_time_is_resumed_by_the_next(client: CampaignClient) -> None:
    await client.register_campaign(WAIT)
    n = 1200
    await client.enroll_many("w", ({"contact_id": f"p{i:04d}"} for i in range(n)))
    shard = client.service.keys.shard(0)
    await client.redis.delete(shard.queue, shard.jobs)  # every job lost
    totals, runs = 0, 0
    while True:
        runs += 1
        repaired = await reconcile({"service": client.service}, budget=0)  # one slice a run
        totals += repaired["waiting"]
        if not await client.redis.exists(client.service.keys.reconcile_cursor):
            break
        assert runs < 50
    assert runs > 1 and totals == n
    assert len(await queued(client.redis, client.service.keys)) == n


async def test_many_small_sets_still_end_a_run_on_time(client: CampaignClient) -> None:
    for c in range(30):  # small sets come back whole from one SSCAN
        await client.register_campaign({**WAIT, "id": f"w{c:02d}"})
        await client.enroll_many(f"w{c:02d}", ({"contact_id": f"p{i}"} for i in range(5)))
    repaired = await reconcile({"service": client.service}, budget=0)
    assert repaired == {"scheduled": 0, "waiting": 0, "running": 0}
    position = await client.redis.get(client.service.keys.reconcile_cursor)
    assert position is not None  # stopped after the first set and kept its place
    assert orjson.loads(position)[0] == "w00"


async def test_a_corrupt_position_starts_the_walk_over(client: CampaignClient) -> None:
    await client.register_campaign(WAIT)
    await client.enroll("w", "p")
    shard = client.service.keys.shard(0)
    await client.redis.delete(shard.queue, shard.jobs)
    for bad in (b"abcd", b'["w","x","waiting",0]', b'["w",0,"waiting",18446744073709551616]',
                b'{"a":1}', b'["w",5,"waiting",0]'):  # fmt: skip
        await client.redis.set(client.service.keys.reconcile_cursor, bad)
        await reconcile({"service": client.service})
        assert not await client.redis.exists(client.service.keys.reconcile_cursor)
    assert (await client.status("w:p")).state == "waiting"
    assert len(await queued(client.redis, client.service.keys)) == 1
