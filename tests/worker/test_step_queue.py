"""The claim script (worker/lua/claim.lua) through StepQueue on a real Redis: batches, due
order, leases and their expiry, stale jobs, and queue entries of the wrong shape."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.client import CampaignClient
from app.jobs import step_job_id
from app.store import now_ms
from tests.queue_view import dead_letters, leased, payload, queued
from worker.step_queue import ClaimCode, StepQueue

ONE_STEP = {"id": "c", "entry": "a", "nodes": {
    "a": {"type": "action", "action": "log", "next": None}}}  # fmt: skip
WAIT = {"id": "w", "entry": "w", "nodes": {
    "w": {"type": "wait", "event": "e", "timeout": "PT0S", "on_timeout": None}}}  # fmt: skip


@pytest.fixture
def queue(client: CampaignClient) -> StepQueue:
    return StepQueue(client.redis, client.service.keys, lease_seconds=10, history_limit=100)


async def enroll(client: CampaignClient, n: int, campaign: dict[str, Any] = ONE_STEP) -> list[str]:
    await client.register_campaign(campaign)
    await client.enroll_many(campaign["id"], ({"contact_id": f"p{i}"} for i in range(n)))
    return [f"{campaign['id']}:p{i}" for i in range(n)]


async def test_a_batch_is_claimed_in_one_call_and_leased(
    client: CampaignClient, queue: StepQueue
) -> None:
    ids = await enroll(client, 5)
    before = now_ms()
    batch = await queue.claim(3)
    assert [c.code for c in batch.claims] == [ClaimCode.STARTED] * 3
    assert all(c.record["state"] == "running" for c in batch.claims)
    keys = client.service.keys
    leases = await leased(client.redis, keys)
    assert set(leases) == {c.job_id for c in batch.claims}
    assert all(before + 10_000 <= exp <= now_ms() + 10_000 for exp in leases.values())
    assert len(await queued(client.redis, keys)) == 2
    assert batch.next_ms is not None and batch.next_ms <= now_ms()  # two more are due now
    counts = await client.service.store.count_by_state("c")
    assert (counts["running"], counts["scheduled"]) == (3, 2)
    rest = await queue.claim(10)
    assert {c.payload.target.enrollment_id for c in [*batch.claims, *rest.claims]} == set(ids)
    history = (await client.status(ids[0])).history
    assert [(h.from_state, h.to_state, h.reason) for h in history][-1] == (
        "scheduled", "running", "job started",
    )  # fmt: skip


async def test_jobs_are_claimed_in_due_order_and_not_before(
    client: CampaignClient, queue: StepQueue
) -> None:
    await enroll(client, 3)
    shard = client.service.keys.shard(0)
    now = now_ms()
    await client.redis.zadd(shard.queue, {
        step_job_id("c:p0", 1, 1): now - 10, step_job_id("c:p1", 1, 1): now - 30,
        step_job_id("c:p2", 1, 1): now + 60_000,
    })  # fmt: skip
    batch = await queue.claim(10)
    assert [c.payload.target.enrollment_id for c in batch.claims] == ["c:p1", "c:p0"]
    # next: the earlier of the next due job (in a minute) and the first lease expiry (10 s)
    assert batch.next_ms is not None and now + 9_000 < batch.next_ms <= now_ms() + 10_000
    await client.redis.zrem(client.service.keys.shard(0).leases, *[c.job_id for c in batch.claims])
    assert (await queue.claim(10)).next_ms == now + 60_000


async def test_an_expired_lease_is_claimed_again_as_a_new_attempt(
    client: CampaignClient, queue: StepQueue
) -> None:
    [eid] = await enroll(client, 1)
    first = (await queue.claim(1)).claims[0]
    assert first.record["attempt"] == "1"
    assert (await queue.claim(1)).claims == []  # leased: nobody else takes it
    later = now_ms() + 11_000
    again = (await queue.claim(1, now_ms=later)).claims
    assert [(c.code, c.job_id, c.record["attempt"]) for c in again] == [
        (ClaimCode.RERUN, first.job_id, "2")
    ]
    assert again[0].payload.target.enrollment_id == eid
    reasons = [h.reason for h in (await client.status(eid)).history]
    assert reasons[-1] == "job re-run: the lease of the worker running it expired"


async def test_renewal_keeps_a_lease_from_expiring(
    client: CampaignClient, queue: StepQueue
) -> None:
    await enroll(client, 1)
    claim = (await queue.claim(1)).claims[0]
    shard = claim.shard
    await client.redis.zadd(shard.leases, {claim.job_id: now_ms() - 1})  # about to lapse
    await queue.renew([(shard, claim.job_id)])
    assert (await queue.claim(1)).claims == []
    # a finished job's lease is not brought back by a late renewal
    await client.redis.zrem(shard.leases, claim.job_id)
    await queue.renew([(shard, claim.job_id)])
    assert claim.job_id not in await leased(client.redis, client.service.keys)


async def test_a_timeout_job_is_leased_and_its_record_stays_waiting(
    client: CampaignClient, queue: StepQueue
) -> None:
    [eid] = await enroll(client, 1, WAIT)
    [claim] = (await queue.claim(5)).claims
    assert (claim.code, claim.payload.function, claim.record["state"]) == (
        ClaimCode.STARTED, "fire_timeout", "waiting",
    )  # fmt: skip
    assert (await client.status(eid)).state == "waiting"


async def test_a_job_that_is_not_current_is_stale_and_dropped(
    client: CampaignClient, queue: StepQueue
) -> None:
    [eid] = await enroll(client, 1)
    shard = client.service.keys.for_enrollment(eid)
    old = step_job_id(eid, 1, 1, 12345)  # a superseded deferral
    doc = await payload(client.redis, client.service.keys, step_job_id(eid, 1, 1))
    assert doc is not None
    await client.redis.hset(shard.jobs, old, orjson.dumps(doc))
    await client.redis.zadd(shard.queue, {old: 0})
    batch = await queue.claim(1)
    assert batch.stale == [old] and batch.claims == []
    assert not await client.redis.hexists(shard.jobs, old)
    assert (await client.status(eid)).state == "scheduled"  # untouched


GOOD = {"t": 1, "f": "run_step", "a": ["c:p0", 1, 1], "k": {"campaign": "c", "version": 1,
        "node": "a", "tz": None}, "et": 1}  # fmt: skip


def bad(**changes: Any) -> bytes:
    doc = orjson.loads(orjson.dumps(GOOD))
    doc.update(changes)
    return orjson.dumps(doc)


@pytest.mark.parametrize(
    ("job_id", "raw", "reason"),
    [
        (b"step:c:p0:1:1", bad(t="x"), "t: not a try number"),
        (b"step:c:p0:1:1", bad(et="yesterday"), "et: not a time in ms"),
        (b"step:c:p0:1:1", bad(f=["run_step"]), "f: not a campaign job function"),
        (b"step:c:p0:1:1", bad(f="os.system"), "f: not a campaign job function"),
        (b"step:c:p0:1:1", bad(a="c:p0"), "a: expected [enrollment_id, step, ...]"),
        (b"step:c:p0:1:1", bad(a=["c:p0", 1]), "a: expected an attempt number"),
        (b"step:c:p0:1:1", bad(k=[]), "k: expected campaign and version"),
        (
            b"step:c:p0:1:1",
            bad(k={"campaign": "c", "version": 1, "node": 7}),
            "k: node and tz must be strings",
        ),
        (
            b"step:c:p0:1:1",
            bad(a=["other:p0", 1, 1]),
            "a: enrollment id does not belong to the campaign",
        ),
        (b"step:c:p9:1:1", bad(), "job id does not match its payload"),
        (b"step:c:p0:1:1", b"\x80\x04\x95 pickle", "payload is not UTF-8"),
        (b"step:c:p0:1:1", b"[1, 2]", "payload is not a JSON object"),
        (b"step:c:\xff\xfe:1:1", bad(), "job id is not UTF-8"),
    ],
)
async def test_entries_of_the_wrong_shape_are_dead_lettered(
    client: CampaignClient, queue: StepQueue, job_id: bytes, raw: bytes, reason: str
) -> None:
    await enroll(client, 2)  # p0's job is overwritten with the bad entry; p1's is good
    shard = client.service.keys.shard(0)
    await client.redis.hset(shard.jobs, job_id, raw)
    await client.redis.zadd(shard.queue, {job_id: 0})
    batch = await queue.claim(1)
    assert batch.claims == [] and [r for _, r in batch.dead] == [reason]
    [letter] = await dead_letters(client.redis, client.service.keys)
    assert letter["reason"] == reason and letter["payload"]
    assert not await client.redis.hexists(shard.jobs, job_id)
    assert await client.redis.zscore(shard.queue, job_id) is None
    # the good job behind it is untouched and claimed next
    [claim] = (await queue.claim(1)).claims
    assert claim.job_id.encode() != job_id
    assert claim.job_id in ("step:c:p0:1:1", "step:c:p1:1:1")


async def test_a_queue_entry_without_a_payload_is_dead_lettered(
    client: CampaignClient, queue: StepQueue
) -> None:
    shard = client.service.keys.shard(0)
    await client.redis.zadd(shard.queue, {"garbage": 0})
    batch = await queue.claim(5)
    assert batch.dead == [("garbage", "no payload stored for this job id")]
    assert await client.redis.zcard(shard.queue) == 0


@pytest.mark.parametrize(
    ("field", "value", "state", "reason"),
    [
        ("attempt", "x", "running", "attempt: not an attempt number"),
        ("attempt", "x", "scheduled", "attempt: not an attempt number"),
        ("attempt", "1.5", "scheduled", "attempt: not an attempt number"),
        ("step", "", "scheduled", "step: not a step number"),
        ("state", "zombie", "scheduled", "state: not an enrollment state"),
        ("campaign", "other", "scheduled", "campaign: does not match the job"),
        ("attributes", b'{"a":"\xff"}', "scheduled", "a field is not UTF-8"),
    ],
)
async def test_a_corrupt_record_fails_its_enrollment_and_not_the_batch(
    client: CampaignClient, queue: StepQueue, field: str, value: Any, state: str, reason: str
) -> None:
    ids = await enroll(client, 4)
    bad = ids[1]
    shard = client.service.keys.for_enrollment(bad)
    await client.redis.hset(shard.enrollment(bad), mapping={"state": state, field: value})
    if state == "running":  # an expired lease: claimed first, as a re-run
        job = step_job_id(bad, 1, 1)
        await client.redis.zrem(shard.queue, job)
        await client.redis.zadd(shard.leases, {job: 1})
    batch = await queue.claim(10)
    assert [r for _, r in batch.corrupt] == [reason]
    assert sorted(c.payload.target.enrollment_id for c in batch.claims) == sorted(
        i for i in ids if i != bad
    )
    assert all(c.record["state"] == "running" for c in batch.claims)
    raw = await client.redis.hgetall(shard.enrollment(bad))
    assert raw[b"state"] == b"failed" and b"job" not in raw
    assert orjson.loads(raw[b"error"])["type"] == "CorruptRecord"
    assert await client.redis.sismember(shard.state_index("c", "failed"), bad)
    assert not await client.redis.hexists(shard.jobs, step_job_id(bad, 1, 1))
    assert (await queue.claim(10)).claims == []  # nothing left behind to claim again


ACCEPTED_BY_BOTH = [
    bad(k={"campaign": "c", "version": 1.0, "node": "a", "tz": None}),
    bad(k={"campaign": "c", "version": 1, "node": "a", "tz": None, "otel": {"traceparent": "x"}}),
    bad(t=None, et=None),
]
REJECTED_BY_BOTH = [
    bad(k={"campaign": "c", "version": 1, "node": "a", "otel": ["x"]}),
    bad(k={"campaign": "c", "version": 1, "node": "a", "otel": {"traceparent": 7}}),
    bad(k={"campaign": "c", "version": 1.5, "node": "a"}),
    bad(a=["c:p0", 1, -1]),
]


@pytest.mark.parametrize("raw", ACCEPTED_BY_BOTH + REJECTED_BY_BOTH)
async def test_the_claim_script_and_python_agree_on_payloads(
    client: CampaignClient, queue: StepQueue, raw: bytes
) -> None:
    from app.jobs import JobPayload, MalformedJob

    try:
        JobPayload.parse("step:c:p0:1:1", raw)
        python_ok = True
    except MalformedJob:
        python_ok = False
    await enroll(client, 1)
    shard = client.service.keys.shard(0)
    await client.redis.hset(shard.jobs, "step:c:p0:1:1", raw)
    batch = await queue.claim(1)
    assert batch.rejected == []  # the script never accepts what Python refuses
    assert (len(batch.claims) == 1) == python_ok == (raw in ACCEPTED_BY_BOTH)
    assert (len(batch.dead) == 1) == (not python_ok)
