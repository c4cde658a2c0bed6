"""Campaigns end to end: a real worker subprocess, real Redis, a real HTTP service."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from app import CampaignClient
from app.jobs import JobTarget, timeout_job_id
from app.models import State
from app.planner import Plan
from app.settings import Settings
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from tests.queue_view import claim_one, dead_letters, job_exists, queued
from worker.embedded_redis import EmbeddedRedis


def http(path: str, svc: FakeService, nxt: str | None = "done", **extra: Any) -> dict[str, Any]:
    return {
        "type": "action",
        "action": "http",
        "params": {"url": svc.url(path)},
        "next": nxt,
        **extra,
    }


def fast_retry(max_attempts: int = 5, base: float = 0.2) -> dict[str, Any]:
    return {"max_attempts": max_attempts, "backoff": "fixed", "base_delay": base,
            "max_delay": base, "jitter": False}  # fmt: skip


def campaign(cid: str, nodes: dict[str, Any], entry: str = "first", **extra: Any) -> dict[str, Any]:
    return {"id": cid, "entry": entry, "nodes": {**nodes, "done": {"type": "exit"}}, **extra}


@pytest.fixture
async def worker(redis_server: EmbeddedRedis, redis: Any) -> AsyncIterator[WorkerProcess]:
    proc = WorkerProcess(redis_server.url, CAMPAIGN_JOB_TIMEOUT="5").start()
    await proc.wait_status("/readyz", 200)
    yield proc
    assert proc.stop() == 0


async def wait_state(client: CampaignClient, eid: str, state: State, timeout: float = 15) -> Any:
    async def check() -> Any:
        st = await client.status(eid)
        return st if st.state == state else None

    return await eventually(check, timeout, 0.02, f"{eid} to be {state}")


def reasons(status: Any) -> list[str]:
    return [h.reason for h in status.history]


async def test_full_campaign_reply_or_timeout(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess
) -> None:
    await client.register_campaign(campaign("full", {
        "first": http("/ok", svc, "wait"),
        "wait": {"type": "wait", "event": "replied", "timeout": 1.5,
                 "on_event": "thanks", "on_timeout": "nudge"},
        "thanks": http("/outcome/thanked", svc),
        "nudge": http("/ok", svc),
    }))  # fmt: skip
    ids = [(await client.enroll("full", f"c{i}", {"i": i})).enrollment_id for i in range(10)]
    for eid in ids[::2]:
        await wait_state(client, eid, State.WAITING)
        assert await client.signal(eid, "replied", {"text": "thanks!"}) is True
    for eid in ids:
        st = await wait_state(client, eid, State.COMPLETED)
        states = [h.to_state for h in st.history]
        assert states[:3] == ["scheduled", "running", "waiting"]
        assert states[-3:] == ["scheduled", "running", "completed"]
        replied = eid in ids[::2]
        assert any("event replied" in r for r in reasons(st)) is replied
        assert any("timeout of wait" in r for r in reasons(st)) is not replied
        paths = [c.path for c in svc.calls_for(eid)]
        assert paths == ["/ok", "/outcome/thanked" if replied else "/ok"]
        keys = [c.key for c in svc.calls_for(eid)]
        assert keys == [f"{eid}:1", f"{eid}:3"]  # step 1 first, 2 wait, 3 the branch
    thanked = svc.calls_for(ids[0])[1]
    assert thanked.body["event"]["payload"] == {"text": "thanks!"}
    assert thanked.body["attributes"] == {"i": 0}


async def test_transient_failures_retry_with_one_key(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess
) -> None:
    await client.register_campaign(
        campaign("flaky", {"first": http("/flaky/2", svc, retry=fast_retry())})
    )
    st = await client.enroll("flaky", "a")
    done = await wait_state(client, st.enrollment_id, State.COMPLETED)
    calls = svc.calls_for(st.enrollment_id)
    assert len(calls) == 3 and {c.key for c in calls} == {f"{st.enrollment_id}:1"}
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    assert all(g >= 0.19 for g in gaps), gaps
    assert [c.headers.get("X-Campaign-Attempt") for c in calls] == ["1", "2", "3"]
    assert len({orjson.dumps(c.body) for c in calls}) == 1  # the same body for every attempt
    assert sum("retry in" in r for r in reasons(done)) == 2


async def test_permanent_error_fails_at_once(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess
) -> None:
    await client.register_campaign(
        campaign("perm", {"first": http("/bad", svc, retry=fast_retry())})
    )
    st = await client.enroll("perm", "a")
    failed = await wait_state(client, st.enrollment_id, State.FAILED)
    assert len(svc.calls_for(st.enrollment_id)) == 1
    assert failed.error is not None and failed.error.type == "PermanentError"
    assert "HTTP 400" in failed.error.message and failed.error.traceback


async def test_exhausted_retries_fail_then_replay_completes(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess
) -> None:
    await client.register_campaign(
        campaign("tog", {"first": http("/toggle", svc, retry=fast_retry(2, 0.05))})
    )
    st = await client.enroll("tog", "a")
    failed = await wait_state(client, st.enrollment_id, State.FAILED)
    assert len(svc.calls_for(st.enrollment_id)) == 2
    assert failed.error is not None and "attempt 2 of 2" in failed.error.message
    svc.failing = False
    replayed = await client.replay(st.enrollment_id)
    assert replayed.state == State.SCHEDULED and replayed.step == failed.step + 1
    await wait_state(client, st.enrollment_id, State.COMPLETED)
    assert len(svc.calls_for(st.enrollment_id)) == 3


async def test_retry_after_is_honoured(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess
) -> None:
    # Retry-After is a floor up to the node's max_delay (2 s here), which it stays below
    retry = {**fast_retry(3, 0.05), "max_delay": 2}
    await client.register_campaign(
        campaign("rl", {"first": http("/ratelimit/1", svc, retry=retry)})
    )
    st = await client.enroll("rl", "a")
    await wait_state(client, st.enrollment_id, State.COMPLETED)
    first, second = svc.calls_for(st.enrollment_id)
    assert second.at - first.at >= 0.99


async def test_hanging_handler_is_cut_off(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess
) -> None:
    await client.register_campaign(
        campaign("hang", {"first": http("/hang", svc, retry=fast_retry(2, 0.05), timeout=0.3)})
    )
    st = await client.enroll("hang", "a")
    failed = await wait_state(client, st.enrollment_id, State.FAILED)
    assert len(svc.calls_for(st.enrollment_id)) == 2
    assert failed.error is not None and "timed out after 0.3s" in failed.error.message


async def test_unknown_action_fails_with_reason(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess
) -> None:
    await client.register_campaign(
        campaign("unk", {"first": {"type": "action", "action": "sms", "next": "done"}})
    )
    st = await client.enroll("unk", "a")
    failed = await wait_state(client, st.enrollment_id, State.FAILED)
    assert failed.error is not None and failed.error.type == "UnknownAction"
    assert "'sms'" in failed.error.message


async def test_signal_racing_timeout_runs_exactly_one_branch(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess
) -> None:
    await client.register_campaign(campaign("race", {
        "first": {"type": "wait", "event": "replied", "timeout": 0.3,
                  "on_event": "by_event", "on_timeout": "by_timeout"},
        "by_event": http("/outcome/event", svc),
        "by_timeout": http("/outcome/timeout", svc),
    }))  # fmt: skip
    ids = [(await client.enroll("race", f"r{i}")).enrollment_id for i in range(20)]

    async def race(eid: str) -> bool:
        st = await client.status(eid)
        assert st.deadline is not None
        await asyncio.sleep(max(0.0, (st.deadline - datetime.now(UTC)).total_seconds()))
        return await client.signal(eid, "replied")

    won = await asyncio.gather(*(race(e) for e in ids))
    for eid, signal_won in zip(ids, won, strict=True):
        st = await wait_state(client, eid, State.COMPLETED)
        paths = [c.path for c in svc.calls_for(eid)]
        assert paths == (["/outcome/event"] if signal_won else ["/outcome/timeout"])
        assert sum(("event replied" in r) or ("timeout of first" in r) for r in reasons(st)) == 1


async def test_cancel_during_wait_removes_timeout(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess, settings: Settings
) -> None:
    await client.register_campaign(campaign("cw", {
        "first": {"type": "wait", "event": "replied", "timeout": 0.5, "on_timeout": "nudge"},
        "nudge": http("/ok", svc),
    }))  # fmt: skip
    victim = (await client.enroll("cw", "victim")).enrollment_id
    sentinel = (await client.enroll("cw", "sentinel")).enrollment_id
    st = await client.status(victim)
    assert st.state == State.WAITING
    job_id = timeout_job_id(victim, st.step)
    keys = client.service.keys
    assert job_id in await queued(client.redis, keys)
    assert await client.cancel(victim, "unsubscribed") is True
    assert job_id not in await queued(client.redis, keys)
    assert not await job_exists(client.redis, keys, job_id)
    await wait_state(
        client, sentinel, State.COMPLETED
    )  # its timeout fired: so would have the victim's
    assert svc.calls_for(victim) == []
    final = await client.status(victim)
    assert final.state == State.CANCELLED and await client.signal(victim, "replied") is False


async def test_step_outside_business_hours_is_deferred_to_opening(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess
) -> None:
    now = datetime.now(UTC)
    opening = (now + timedelta(hours=12)).replace(minute=0, second=0, microsecond=0)
    window = f"{opening:%H:%M}-{(opening + timedelta(hours=1)):%H:%M}"
    days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    await client.register_campaign(campaign("bh", {"first": http("/ok", svc)},
                                            business_hours={"weekly": {d: [window] for d in days}}))  # fmt: skip
    # Enrolled "yesterday at the opening": the step is due at once, but the window is shut now.
    status = await client.service.enroll("bh", "a", now=opening - timedelta(days=1))
    deferred = await eventually(
        lambda: _deferred(client, status.enrollment_id), 15, what="deferral to the opening"
    )
    expected = opening if opening > now else opening + timedelta(days=1)
    assert deferred.run_at == expected
    assert deferred.state == State.SCHEDULED and svc.calls == []


async def _deferred(client: CampaignClient, eid: str) -> Any:
    st = await client.status(eid)
    return st if any("outside business hours" in r for r in reasons(st)) else None


async def test_retry_landing_outside_window_waits_for_opening(client: CampaignClient) -> None:
    await client.register_campaign(campaign("bhr", {"first": {"type": "action", "action": "log", "next": "done"}},
                                            business_hours={"weekly": {"mon": ["09:00-17:00"]}}))  # fmt: skip
    monday_1650 = datetime(2026, 11, 30, 16, 50, tzinfo=UTC)
    st = await client.service.enroll("bhr", "a", now=monday_1650)
    claim = await claim_one(client.service, st.enrollment_id)
    target = JobTarget(st.enrollment_id, "bhr", 1, None)
    result = await client.service.retry(target, job_id=claim.job_id, node="first", step=st.step, attempt=1,
                                        delay=timedelta(minutes=30), error={"type": "X", "message": "y"},
                                        now=monday_1650)  # fmt: skip
    assert result.ok
    after = await client.status(st.enrollment_id)
    assert after.run_at == datetime(2026, 12, 7, 9, 0, tzinfo=UTC) and after.attempt == 2


async def test_poison_jobs_do_not_stop_the_worker(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess, settings: Settings
) -> None:
    shard = client.service.keys.shard(0)
    # garbage in the campaign queue: no payload, a pickle, a payload of the wrong shape
    # (payloads first, as a producer writes them: the running worker may claim an entry
    # the moment it is queued, and would find no payload yet)
    await client.redis.hset(shard.jobs, "step:x:y:1:1", b"\x80\x04not json")
    await client.redis.hset(shard.jobs, b"step:\xff:1:1", orjson.dumps({"f": "run_step", "a": []}))
    await client.redis.zadd(shard.queue, {"garbage": 1, "step:x:y:1:1": 1, b"step:\xff:1:1": 1})
    # and in arq's own queue: an undecodable job and an unknown function
    await client.redis.set("arq:job:garbage", b"\x80\x04not json", px=60_000)
    await client.redis.zadd(settings.arq_queue, {"garbage": 1})
    await client.redis.enqueue_job(
        "no_such_function", _job_id="nsf", _queue_name=settings.arq_queue
    )
    await client.register_campaign(campaign("after", {"first": http("/ok", svc)}))
    st = await client.enroll("after", "a")
    await wait_state(client, st.enrollment_id, State.COMPLETED)
    letters = await eventually(lambda: _at_least(dead_letters(client.redis, client.service.keys), 3),
                               what="3 dead letters")  # fmt: skip
    assert sorted(d["reason"] for d in letters) == [
        "job id is not UTF-8", "no payload stored for this job id", "payload is not UTF-8",
    ]  # fmt: skip
    assert await client.redis.zcard(shard.queue) == 0
    assert worker.proc is not None and worker.proc.poll() is None
    code, body = await worker.get("/readyz")
    assert code == 200, body


async def _at_least(values: Any, n: int) -> Any:
    got = await values
    return got if len(got) >= n else None


async def test_killed_worker_step_reruns_within_the_lease(
    redis_server: EmbeddedRedis, client: CampaignClient, svc: FakeService
) -> None:
    # default settings: the lease (10 s) bounds recovery, not the job timeout
    await client.register_campaign(
        campaign("crash", {"first": http("/hang", svc, retry=fast_retry(3, 0.05))})
    )
    first = WorkerProcess(redis_server.url).start()
    try:
        st = await client.enroll("crash", "a")
        await asyncio.wait_for(svc.hung.wait(), 15)
        first.kill()  # SIGKILL while the call is open
        killed_at = time.monotonic()
    finally:
        first.kill()
    svc.release.set()  # the next call answers at once
    second = WorkerProcess(redis_server.url).start()
    try:
        await eventually(lambda: _true(len(svc.calls_for(st.enrollment_id)) >= 2), 20,
                         what="the re-run's call")  # fmt: skip
        rerun_after = time.monotonic() - killed_at
        done = await wait_state(client, st.enrollment_id, State.COMPLETED, timeout=10)
    finally:
        assert second.stop() == 0
    assert rerun_after <= 10 + 5, rerun_after  # CAMPAIGN_LEASE + 5 s
    calls = svc.calls_for(st.enrollment_id)
    assert len(calls) == 2 and calls[0].key == calls[1].key == f"{st.enrollment_id}:1"
    assert calls[1].headers.get("X-Campaign-Attempt") == "2"
    assert any("lease of the worker running it expired" in r for r in reasons(done))
    assert [h.to_state for h in done.history].count("completed") == 1


async def test_a_lost_job_is_recreated_by_the_reconciler(
    redis_server: EmbeddedRedis, client: CampaignClient, svc: FakeService
) -> None:
    await client.register_campaign(campaign("lost", {
        "first": {"type": "wait", "event": "replied", "timeout": 1, "on_timeout": "nudge"},
        "nudge": http("/ok", svc)}))  # fmt: skip
    keys = client.service.keys
    shard = keys.shard(0)
    waiting = (await client.enroll("lost", "w")).enrollment_id
    scheduled = (await client.service.enroll("lost", "s")).enrollment_id
    # lose both jobs, as a Redis crash window might: the timeout job entirely, the other's
    # payload only (corrupted), which the claim dead-letters
    await client.redis.zrem(shard.queue, timeout_job_id(waiting, 1))
    await client.redis.hdel(shard.jobs, timeout_job_id(waiting, 1))
    await client.redis.hset(shard.jobs, timeout_job_id(scheduled, 1), b"{not json")
    proc = WorkerProcess(redis_server.url, CAMPAIGN_RECONCILE_EVERY="1").start()
    try:
        for eid in (waiting, scheduled):
            await wait_state(client, eid, State.COMPLETED, timeout=20)
        _, text = await proc.get("/metrics")
    finally:
        assert proc.stop() == 0
    assert 'campaign_reconciled_total{action="recreated",state="waiting"} 2.0' in text
    for eid in (waiting, scheduled):
        st = await client.status(eid)
        assert any("reconciler: waiting with no job" in r for r in reasons(st))
        assert len(svc.calls_for(eid)) == 1


async def test_every_job_line_carries_its_context(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess
) -> None:
    await client.register_campaign(
        campaign("logs", {"first": http("/flaky/1", svc, retry=fast_retry(3, 0.05))})
    )
    st = await client.enroll("logs", "a")
    await wait_state(client, st.enrollment_id, State.COMPLETED)
    await eventually(
        lambda: _true(sum(d.get("msg") == "job finished" for d in worker.lines) >= 2), what="logs"
    )
    lines = [d for d in worker.lines if d.get("function") == "run_step"]
    assert {d["msg"] for d in lines} >= {
        "job started",
        "job finished",
        "transition",
        "action failed, will retry",
    }
    for d in lines:
        assert d["job_id"].startswith(f"step:{st.enrollment_id}:")
        assert d["enrollment_id"] == st.enrollment_id and d["campaign_id"] == "logs"
        assert {"node", "step", "attempt"} <= d.keys()
    transitions = [d for d in lines if d["msg"] == "transition"]
    assert [(d["from_state"], d["to_state"]) for d in transitions] == [
        ("scheduled", "running"), ("running", "scheduled"),
        ("scheduled", "running"), ("running", "completed")]  # fmt: skip


async def _true(value: bool) -> bool:
    return value


async def run_user_action_once(
    redis_server: EmbeddedRedis, client: CampaignClient, action: str, contact: str = "a",
    max_attempts: int = 5, **env: str,
) -> tuple[Any, WorkerProcess]:  # fmt: skip
    """One enrollment through a one-action campaign run by a real worker that loads
    ``tests.user_actions``; returns its completed status and the worker (stopped)."""
    from tests.conftest import ROOT

    await client.register_campaign(campaign(action, {
        "first": {"type": "action", "action": action, "next": "done",
                  "retry": fast_retry(max_attempts, 0.05)}}))  # fmt: skip
    proc = WorkerProcess(redis_server.url, CAMPAIGN_ACTIONS="tests.user_actions",
                         PYTHONPATH=str(ROOT), **env).start()  # fmt: skip
    try:
        await proc.wait_status("/readyz", 200)
        st = await client.enroll(action, contact)
        done = await wait_state(client, st.enrollment_id, State.COMPLETED, timeout=30)
    finally:
        assert proc.stop() == 0
    return done, proc


async def test_bookkeeping_refused_after_the_action_is_retried_not_rerun(
    redis_server: EmbeddedRedis, client: CampaignClient
) -> None:
    # one attempt only: Redis refusing writes (NOREPLICAS) after the action ran must not
    # count as a crashed attempt; the outcome is recorded once Redis takes writes again
    done, proc = await run_user_action_once(redis_server, client, "refuse_writes_once",
                                            max_attempts=1)  # fmt: skip
    assert "recording the outcome failed; retrying" in proc.messages()
    assert done.attempt == 1 and not any("re-run" in r for r in reasons(done))
    calls = await client.redis.get("user-actions:refuse_writes_once:calls")
    assert calls == b"1"


async def test_stale_jobs_cannot_defer_or_drop_the_current_one(client: CampaignClient) -> None:
    await client.register_campaign(campaign("stale", {"first": http_like("first")},
                                            business_hours={"weekly": {"mon": ["09:00-17:00"]}}))  # fmt: skip
    monday = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
    st = await client.service.enroll("stale", "a", now=monday)
    target = JobTarget(st.enrollment_id, "stale", 1, None)
    claim = await claim_one(client.service, st.enrollment_id)
    current = f"step:{st.enrollment_id}:1:1"
    assert claim.job_id == current
    for other in (current + "@1", f"step:{st.enrollment_id}:1:2"):
        late = await client.service.defer(target, job_id=other, node="first", step=1, attempt=1,
                                          run_at=monday + timedelta(days=7))  # fmt: skip
        assert not late.ok
        failed = await client.service.fail(target, job_id=other, node="first", step=1, attempt=1,
                                           error={"type": "X", "message": "late"})  # fmt: skip
        assert not failed.ok
    assert (await client.status(st.enrollment_id)).state == State.RUNNING
    assert (await client.service.fail(target, job_id=current, node="first", step=1, attempt=1,
                                      error={"type": "X", "message": "now"})).ok  # fmt: skip


def http_like(name: str) -> dict[str, Any]:
    return {"type": "action", "action": "log", "next": "done"}


async def test_a_job_that_is_not_current_is_stale_not_poison(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess, settings: Settings
) -> None:
    await client.register_campaign(campaign("race2", {"first": http("/ok", svc)}))
    st = await client.service.enroll("race2", "a", now=datetime.now(UTC) + timedelta(hours=1))
    shard = client.service.keys.shard(0)
    job_id = f"step:{st.enrollment_id}:1:1"
    raw = await client.redis.hget(shard.jobs, job_id)
    assert await client.cancel(st.enrollment_id)
    # a copy of the cancelled enrollment's job, due now (a duplicate from a bug or a restore)
    await client.redis.hset(shard.jobs, job_id, raw)
    await client.redis.zadd(shard.queue, {job_id: 1})
    await eventually(lambda: _gone(client, shard.queue, job_id), what="the job to be dropped")
    assert await dead_letters(client.redis, client.service.keys) == []
    assert svc.calls_for(st.enrollment_id) == []
    assert not await client.redis.hexists(shard.jobs, job_id)


async def _gone(client: CampaignClient, key: str, job_id: str) -> bool:
    return await client.redis.zscore(key, job_id) is None


async def test_step_cut_by_shutdown_grace_runs_again_elsewhere(
    redis_server: EmbeddedRedis, client: CampaignClient, svc: FakeService
) -> None:
    await client.register_campaign(
        # one attempt only: a deploy must not use it up
        campaign("drain", {"first": http("/hang", svc, retry=fast_retry(1, 0.05))})
    )
    first = WorkerProcess(redis_server.url, CAMPAIGN_SHUTDOWN_GRACE="0.5").start()
    try:
        await first.wait_status("/readyz", 200)
        st = await client.enroll("drain", "a")
        await asyncio.wait_for(svc.hung.wait(), 15)
        first.signal()  # SIGTERM while the call is held open: grace runs out, the job is cancelled
        assert first.wait(20) == 0
    finally:
        first.kill()
    svc.release.set()
    second = WorkerProcess(redis_server.url).start()
    try:
        done = await wait_state(client, st.enrollment_id, State.COMPLETED, timeout=20)
    finally:
        assert second.stop() == 0
    calls = svc.calls_for(st.enrollment_id)
    assert len(calls) == 2 and calls[0].key == calls[1].key
    assert [h.to_state for h in done.history].count("completed") == 1
    assert "grace period over, cancelling jobs" in first.messages()
    assert any("step handed back" in r for r in reasons(done))
    assert not any("re-run" in r for r in reasons(done))


async def test_endless_campaign_is_stopped_by_the_step_limit(
    redis_server: EmbeddedRedis, client: CampaignClient, svc: FakeService
) -> None:
    await client.register_campaign({"id": "loop", "entry": "first", "nodes": {
        "first": http("/ok", svc, "again"),
        "again": {"type": "delay", "duration": 0, "next": "first"},
    }})  # fmt: skip
    proc = WorkerProcess(redis_server.url, CAMPAIGN_MAX_STEPS="9").start()
    try:
        await proc.wait_status("/readyz", 200)
        st = await client.enroll("loop", "a")
        failed = await wait_state(client, st.enrollment_id, State.FAILED)
    finally:
        assert proc.stop() == 0
    assert failed.error is not None and failed.error.type == "StepLimitExceeded"
    assert "CAMPAIGN_MAX_STEPS" in failed.error.message
    assert failed.step == 10 and len(svc.calls_for(st.enrollment_id)) == 5  # steps 1, 3, 5, 7, 9


async def test_zero_delay_cycle_fails_at_enrollment(settings: Settings, redis: Any) -> None:
    async with CampaignClient(settings=settings.model_copy(update={"max_steps": 20})) as c:
        await c.register_campaign({"id": "spin", "entry": "d1", "nodes": {
            "d1": {"type": "delay", "duration": 0, "next": "d2"},
            "d2": {"type": "delay", "duration": 0, "next": "d1"}}})  # fmt: skip
        st = await c.enroll("spin", "a")
    assert st.state == State.FAILED and st.error is not None
    assert st.error.type == "StepLimitExceeded" and st.step == 21


async def test_a_job_past_its_budget_is_not_lost(
    redis_server: EmbeddedRedis, client: CampaignClient
) -> None:
    # the handler blocks the event loop past CAMPAIGN_JOB_TIMEOUT: whether the outcome is
    # recorded first or the job is cut off and re-run when its lease lapses, it completes once
    done, proc = await run_user_action_once(redis_server, client, "block_loop_once",
                                            contact="ann@example.com", CAMPAIGN_JOB_TIMEOUT="1",
                                            CAMPAIGN_LEASE="1")  # fmt: skip
    assert [h.to_state for h in done.history].count("completed") == 1
    assert "job overran CAMPAIGN_JOB_TIMEOUT; it re-runs when its lease expires" in proc.messages()


async def test_reentry_steps_do_not_count_toward_the_step_limit(
    settings: Settings, redis: Any
) -> None:
    async with CampaignClient(settings=settings.model_copy(update={"max_steps": 4})) as c:
        await c.register_campaign({"id": "again", "reentry": True, "entry": "w", "nodes": {
            "w": {"type": "wait", "event": "go", "timeout": "P1D", "on_event": "done"},
            "done": {"type": "exit"}}})  # fmt: skip
        for round_ in range(5):
            st = await c.enroll("again", "a")
            assert st.state == State.WAITING, (round_, st.error)
            assert await c.signal(st.enrollment_id, "go")
            assert (await c.status(st.enrollment_id)).state == State.COMPLETED
        assert (await c.status("again:a")).step == 10


async def test_cancel_removes_a_job_made_after_it_read_the_record(
    client: CampaignClient, settings: Settings
) -> None:
    await client.register_campaign(
        campaign("cr", {"first": {"type": "action", "action": "log", "next": "done"}})
    )
    st = await client.enroll("cr", "a")
    # a worker claims, fails and schedules attempt 2 between cancel's read and its write
    rec, _, target = await client.service._load(st.enrollment_id)
    claim = await claim_one(client.service, st.enrollment_id)
    await client.service.retry(target, job_id=claim.job_id, node="first", step=1, attempt=1,
                               delay=timedelta(hours=1), error={"type": "X", "message": "y"})  # fmt: skip
    stale = client.service.transition(
        Plan(State.CANCELLED, "first", 1, "cancelled"), target, from_state="scheduled",
        expect_states=("scheduled",), expect_step=1, expect_job=rec["job"], now=datetime.now(UTC),
    )  # fmt: skip
    assert not (await client.service.store.apply(st.enrollment_id, stale)).ok
    assert await client.cancel(st.enrollment_id)
    assert f"step:{st.enrollment_id}:1:2" not in await queued(client.redis, client.service.keys)


async def test_a_taken_next_job_id_fails_the_enrollment_by_name(
    client: CampaignClient, worker: WorkerProcess
) -> None:
    await client.register_campaign(campaign("conflict", {
        "first": {"type": "action", "action": "log", "next": "second"},
        "second": {"type": "action", "action": "log", "next": "done"}}))  # fmt: skip
    st = await client.service.enroll("conflict", "a", now=datetime.now(UTC) + timedelta(hours=1))
    shard = client.service.keys.for_enrollment(st.enrollment_id)
    leftover = f"step:{st.enrollment_id}:2:1"
    await client.redis.hset(shard.jobs, leftover, b"{}")  # a leftover (say, a bad restore)
    await client.redis.zadd(shard.queue, {f"step:{st.enrollment_id}:1:1": 0})  # due now
    failed = await wait_state(client, st.enrollment_id, State.FAILED)
    assert failed.error is not None and failed.error.type == "JobConflict"
    _, text = await worker.get("/metrics")
    assert "campaign_job_conflicts_total 1.0" in text
    assert 'campaign_jobs_total{function="run_step",outcome="conflict"} 1.0' in text


async def test_a_corrupt_stored_version_fails_the_step_by_name(
    client: CampaignClient, worker: WorkerProcess
) -> None:
    await client.register_campaign(campaign("corrupt", {
        "first": {"type": "action", "action": "log", "next": "done"}}))  # fmt: skip
    st = await client.service.enroll("corrupt", "a", now=datetime.now(UTC) + timedelta(hours=1))
    await client.redis.hset(client.service.keys.campaign("corrupt"), "v:1", b"{broken")
    shard = client.service.keys.for_enrollment(st.enrollment_id)
    await client.redis.zadd(shard.queue, {f"step:{st.enrollment_id}:1:1": 0})  # due now
    failed = await wait_state(client, st.enrollment_id, State.FAILED)
    assert failed.error is not None and failed.error.type == "CorruptRecord"
    assert "step cannot be carried out; failing its enrollment" in worker.messages()
