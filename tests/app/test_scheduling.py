"""SchedulingService on a real Redis: where each node type lands, which job goes with it
(its payload in the shard's jobs hash, its due time in the shard's queue), deterministic job
ids, clamping, the reconciler's repair, and races between concurrent transitions.

Worker-side methods run on a job claimed the way a worker claims it (claim.lua, through
:func:`tests.queue_view.claim_one`), with ``job_id`` the claimed job.

Times are fixed instants passed as ``now``; expected instants are written out in UTC with
the zone's offset beside them (America/New_York is EST, UTC-5, in December 2026).
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from app.business_hours import spread_offset
from app.campaigns import Campaign
from app.errors import AlreadyEnrolled, InvalidRequest
from app.jobs import STEP_FUNCTION, TIMEOUT_FUNCTION, JobTarget, step_job_id, timeout_job_id
from app.models import EnrollmentStatus, State
from app.scheduling import SchedulingService
from app.settings import Settings
from app.store import Applied, Transition, now_ms
from tests.conftest import ROOT, subprocess_env
from tests.queue_view import claim_due, claim_one, job_exists, leased, queued
from tests.queue_view import payload as stored_payload
from worker.step_queue import ClaimCode

WED_10 = datetime(2026, 12, 2, 15, 0, tzinfo=UTC)  # Wednesday 10:00 EST
FRI_16 = datetime(2026, 12, 4, 21, 0, tzinfo=UTC)  # Friday 16:00 EST: one open hour left
SAT = datetime(2026, 12, 5, 15, 0, tzinfo=UTC)  # Saturday 10:00 EST: closed
MON_OPEN = datetime(2026, 12, 7, 14, 0, tzinfo=UTC)  # Monday 09:00 EST: the next opening
SPREAD = timedelta(minutes=15)
HOURS = {
    "weekly": {d: ["09:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")},
    "spread": "PT15M",
}
EXIT = {"type": "exit"}


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def action(next_: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "action", "action": "log", "next": next_, **extra}


def wait(timeout: str = "P3D", **extra: Any) -> dict[str, Any]:
    return {
        "type": "wait",
        "event": "replied",
        "timeout": timeout,
        "on_event": "done",
        "on_timeout": "done",
        **extra,
    }


@pytest.fixture
def service(redis: Any, settings: Settings) -> SchedulingService:
    return SchedulingService(redis, settings)


async def register(
    service: SchedulingService, nodes: dict[str, Any], entry: str, **extra: Any
) -> Campaign:
    return await service.registry.register({"id": "c", "entry": entry, "nodes": nodes, **extra})


def business(nodes: dict[str, Any]) -> dict[str, Any]:
    return {"nodes": nodes, "timezone": "America/New_York", "business_hours": HOURS}


async def queue(service: SchedulingService) -> dict[str, int]:
    """The campaign job queue: job id -> due time (ms)."""
    return await queued(service.redis, service.keys)


async def leases(service: SchedulingService) -> dict[str, int]:
    """Running (leased) campaign jobs: job id -> lease expiry (ms)."""
    return await leased(service.redis, service.keys)


async def payload(service: SchedulingService, job_id: str) -> dict[str, Any]:
    doc = await stored_payload(service.redis, service.keys, job_id)
    assert doc is not None, f"no payload stored for {job_id}"
    return doc


async def stored(service: SchedulingService, job_id: str) -> bool:
    """Whether the jobs hash holds a payload for ``job_id``."""
    return await job_exists(service.redis, service.keys, job_id)


async def in_index(service: SchedulingService, eid: str) -> list[str]:
    """The states whose index set holds ``eid``."""
    return [
        s.value
        for s in State
        if await service.redis.sismember(
            service.keys.for_enrollment(eid).state_index("c", s.value), eid
        )
    ]


async def snapshot(redis: Any) -> dict[bytes, bytes]:
    """Every key with its serialized value: equal snapshots mean nothing was written."""
    return {key: await redis.dump(key) for key in sorted(await redis.keys("*"))}


async def running(service: SchedulingService, nodes: dict[str, Any], entry: str = "a") -> str:
    """An enrollment whose step 1 job (JOB1) has been claimed by a worker (state running)."""
    await register(service, nodes, entry)
    status = await service.enroll("c", "x")
    claim = await claim_one(service, status.enrollment_id)
    assert claim.code == ClaimCode.STARTED and claim.job_id == JOB1
    assert claim.record["state"] == "running" and claim.record["job"] == JOB1
    assert set(await leases(service)) == {JOB1} and await queue(service) == {}
    return status.enrollment_id


TARGET = JobTarget("c:x", "c", 1, None)
JOB1 = "step:c:x:1:1"


# --- each node type: state, job, time -------------------------------------------------


async def test_action_is_scheduled_with_a_step_job_at_run_at(service: SchedulingService) -> None:
    await register(service, {"a": action()}, "a")
    before = now_ms()
    status = await service.enroll("c", "x", now=WED_10)
    assert (status.state, status.node, status.step, status.attempt) == ("scheduled", "a", 1, 1)
    assert status.run_at == WED_10 and status.deadline is None
    assert await queue(service) == {"step:c:x:1:1": ms(WED_10)}
    job = await payload(service, "step:c:x:1:1")
    assert set(job) == {"t", "f", "a", "k", "et"}
    assert job["f"] == STEP_FUNCTION
    assert job["a"] == ["c:x", 1, 1]
    assert job["k"] == {"version": 1, "node": "a"}  # campaign: the id says it; no zone: none
    assert job["t"] == 1 and before <= job["et"] <= now_ms()  # enqueued now, due at run_at
    record = await service.store.record("c:x")
    assert record is not None and record["job"] == "step:c:x:1:1"
    assert record["run_at"] == str(ms(WED_10))
    assert await leases(service) == {}  # queued, not running
    assert await in_index(service, "c:x") == ["scheduled"]
    # the queue, leases and payloads are keys of the enrollment's shard
    shard = service.keys.for_enrollment("c:x")
    assert await service.redis.zscore(shard.queue, "step:c:x:1:1") == ms(WED_10)
    assert await service.redis.hexists(shard.jobs, "step:c:x:1:1")
    assert await service.redis.keys("arq:*") == []  # nothing in arq's keys


async def test_business_hours_action_runs_at_the_opening_plus_its_spread(
    service: SchedulingService,
) -> None:
    campaign = await register(service, entry="a", **business({"a": action()}))
    planned = service.plan(campaign, TARGET, "a", 0, SAT)
    assert planned.state == State.SCHEDULED and planned.run_at is not None
    assert MON_OPEN <= planned.run_at < MON_OPEN + SPREAD
    assert planned.run_at == MON_OPEN + spread_offset("c:x", SPREAD)  # hashed on the id
    assert service.plan(campaign, TARGET, "a", 0, SAT).run_at == planned.run_at  # stable
    assert service.plan(campaign, TARGET, "a", 0, SAT + timedelta(hours=5)).run_at == planned.run_at

    status = await service.enroll("c", "x", now=SAT)
    assert status.run_at is not None and ms(status.run_at) == ms(planned.run_at)
    assert await queue(service) == {"step:c:x:1:1": ms(planned.run_at)}

    # other enrollments spread over the whole [opening, opening + spread)
    times = set()
    for n in range(40):
        t = service.plan(campaign, JobTarget(f"c:{n}", "c", 1, None), "a", 0, SAT).run_at
        assert t is not None and MON_OPEN <= t < MON_OPEN + SPREAD
        times.add(t)
    assert len(times) >= 30


async def test_business_hours_use_the_enrollment_time_zone(service: SchedulingService) -> None:
    await register(service, entry="a", **business({"a": action()}))
    status = await service.enroll("c", "x", timezone="Europe/Berlin", now=SAT)
    berlin_open = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)  # Monday 09:00 CET
    assert status.run_at is not None and berlin_open <= status.run_at < berlin_open + SPREAD
    assert (await payload(service, "step:c:x:1:1"))["k"]["tz"] == "Europe/Berlin"


async def test_business_hours_action_inside_a_window_runs_now(service: SchedulingService) -> None:
    campaign = await register(service, entry="a", **business({"a": action()}))
    assert service.plan(campaign, TARGET, "a", 0, WED_10).run_at == WED_10  # no spread mid-window
    status = await service.enroll("c", "x", now=WED_10)
    assert status.run_at == WED_10
    assert await queue(service) == {"step:c:x:1:1": ms(WED_10)}


async def test_action_may_opt_out_of_business_hours(service: SchedulingService) -> None:
    await register(service, entry="a", **business({"a": action(None, business_hours=False)}))
    status = await service.enroll("c", "x", now=SAT)
    assert status.run_at == SAT
    assert await queue(service) == {"step:c:x:1:1": ms(SAT)}


async def test_delay_schedules_the_next_node_after_its_duration(service: SchedulingService) -> None:
    nodes = {"d": {"type": "delay", "duration": "PT2H", "next": "a"}, "a": action()}
    await register(service, nodes, "d")
    status = await service.enroll("c", "x", now=WED_10)
    # the delay counts as a step of its own and has no job: step 2 is the action's
    assert (status.state, status.node, status.step) == ("scheduled", "a", 2)
    assert status.run_at == WED_10 + timedelta(hours=2)
    assert await queue(service) == {"step:c:x:2:1": ms(WED_10 + timedelta(hours=2))}
    assert [h.reason for h in status.history] == ["enrolled"]  # from the record: no list yet


async def test_delay_in_business_time_counts_only_open_time(service: SchedulingService) -> None:
    nodes = {
        "d": {"type": "delay", "duration": "PT2H", "business_time": True, "next": "a"},
        "a": action(),
    }
    await register(service, entry="d", **business(nodes))
    status = await service.enroll("c", "x", now=FRI_16)
    # 1 h left on Friday, 1 h on Monday: Monday 10:00 EST, inside the window (no spread)
    monday_10 = datetime(2026, 12, 7, 15, 0, tzinfo=UTC)
    assert (status.node, status.step, status.run_at) == ("a", 2, monday_10)
    assert await queue(service) == {"step:c:x:2:1": ms(monday_10)}


async def test_delay_in_wall_time_then_business_hours_action(service: SchedulingService) -> None:
    nodes = {"d": {"type": "delay", "duration": "PT2H", "next": "a"}, "a": action()}
    await register(service, entry="d", **business(nodes))
    status = await service.enroll("c", "x", now=FRI_16)
    # Friday 18:00 EST is closed: the action waits for Monday's opening and its spread
    assert status.run_at is not None
    assert ms(status.run_at) == ms(MON_OPEN + spread_offset("c:x", SPREAD))


async def test_zero_delay_is_resolved_on_the_spot(service: SchedulingService) -> None:
    await register(
        service, {"d": {"type": "delay", "duration": 0, "next": "a"}, "a": action()}, "d"
    )
    status = await service.enroll("c", "x", now=WED_10)
    assert (status.node, status.step, status.run_at) == ("a", 2, WED_10)
    assert await queue(service) == {"step:c:x:2:1": ms(WED_10)}


async def test_delay_before_a_wait_is_entered_by_its_step_job(service: SchedulingService) -> None:
    nodes = {"d": {"type": "delay", "duration": "PT1H", "next": "w"}, "w": wait(), "done": EXIT}
    await register(service, nodes, "d")
    status = await service.enroll("c", "x", now=WED_10)
    assert (status.state, status.node, status.step) == ("scheduled", "w", 2)
    assert await queue(service) == {"step:c:x:2:1": ms(WED_10 + timedelta(hours=1))}
    assert (await payload(service, "step:c:x:2:1"))["k"]["node"] == "w"
    claim = await claim_one(service, "c:x")
    assert claim.job_id == "step:c:x:2:1" and claim.record["state"] == "running"
    later = WED_10 + timedelta(hours=1, seconds=3)
    applied = await service.enter(
        TARGET, job_id=claim.job_id, node="w", step=2, attempt=1, now=later
    )
    assert applied.ok and applied.state == "waiting"
    status = await service.status("c:x")
    assert (status.state, status.step, status.deadline) == ("waiting", 2, later + timedelta(days=3))
    # the step job is finished (dequeued, lease and payload dropped), the timeout queued
    assert await queue(service) == {"timeout:c:x:2": ms(later + timedelta(days=3))}
    assert await leases(service) == {} and not await stored(service, "step:c:x:2:1")
    assert await in_index(service, "c:x") == ["waiting"]


async def test_wait_sets_a_deadline_and_a_timeout_job(service: SchedulingService) -> None:
    await register(service, {"w": wait(), "done": EXIT}, "w")
    status = await service.enroll("c", "x", now=WED_10)
    deadline = WED_10 + timedelta(days=3)
    assert (status.state, status.node, status.step) == ("waiting", "w", 1)
    assert status.deadline == deadline and status.run_at is None
    assert await queue(service) == {timeout_job_id("c:x", 1): ms(deadline)}
    assert timeout_job_id("c:x", 1) == "timeout:c:x:1"
    job = await payload(service, "timeout:c:x:1")
    assert (job["f"], job["a"], job["k"]["node"]) == (TIMEOUT_FUNCTION, ["c:x", 1], "w")
    assert await in_index(service, "c:x") == ["waiting"]


async def test_wait_in_business_time(service: SchedulingService) -> None:
    nodes = {"w": wait("PT3H", business_time=True), "done": EXIT}
    await register(service, entry="w", **business(nodes))
    status = await service.enroll("c", "x", now=FRI_16)
    monday_11 = datetime(2026, 12, 7, 16, 0, tzinfo=UTC)  # 1 h Friday + 2 h Monday
    assert status.deadline == monday_11
    assert await queue(service) == {"timeout:c:x:1": ms(monday_11)}


async def test_exit_completes_with_no_job(service: SchedulingService) -> None:
    await register(service, {"done": EXIT}, "done")
    status = await service.enroll("c", "x", now=WED_10)
    assert (status.state, status.node, status.step) == ("completed", "done", 1)
    assert await queue(service) == {}
    assert not await service.redis.exists(service.keys.for_enrollment("c:x").jobs)
    assert await in_index(service, "c:x") == ["completed"]
    record = await service.store.record("c:x")
    assert record is not None and "job" not in record and "run_at" not in record


async def test_next_null_completes_with_no_job(service: SchedulingService) -> None:
    eid = await running(service, {"a": action(None)})
    applied = await service.advance(
        TARGET,
        job_id=JOB1,
        from_node="a",
        to_node=None,
        step=1,
        attempt=1,
        reason="outcome ok",
        now=WED_10,
    )
    assert applied.ok and applied.state == "completed"
    status = await service.status(eid)
    assert (status.state, status.node, status.step, status.run_at) == ("completed", None, 2, None)
    # the transition finished the running job: no queue entry, lease or payload left
    assert await queue(service) == {} and await leases(service) == {}
    assert not await stored(service, JOB1)
    record = await service.store.record(eid)
    assert record is not None and "job" not in record
    assert await in_index(service, eid) == ["completed"]
    assert status.history[-1].reason == "outcome ok; next: null"


async def test_advance_to_an_action_schedules_the_next_step(service: SchedulingService) -> None:
    eid = await running(service, {"a": action("b"), "b": action()})
    applied = await service.advance(
        TARGET,
        job_id=JOB1,
        from_node="a",
        to_node="b",
        step=1,
        attempt=1,
        reason="ok",
        now=WED_10,
    )
    assert applied.ok
    status = await service.status(eid)
    assert (status.state, status.node, status.step, status.attempt) == ("scheduled", "b", 2, 1)
    assert await queue(service) == {"step:c:x:2:1": ms(WED_10)}
    assert await leases(service) == {} and not await stored(service, JOB1)
    assert (await payload(service, "step:c:x:2:1"))["k"]["node"] == "b"
    assert await in_index(service, eid) == ["scheduled"]


async def test_advance_by_a_job_that_is_not_current_is_refused(
    service: SchedulingService, redis: Any
) -> None:
    await running(service, {"a": action("b"), "b": action()})
    before = await snapshot(redis)
    for job_id in ("step:c:x:1:2", "timeout:c:x:1", f"{JOB1}@1"):
        applied = await service.advance(
            TARGET, job_id=job_id, from_node="a", to_node="b", step=1, attempt=1, reason="ok"
        )
        assert not applied.ok and (applied.state, applied.step) == ("running", 1)
    assert await snapshot(redis) == before


async def test_timeout_moves_a_waiting_enrollment_on_once(service: SchedulingService) -> None:
    nodes = {"w": {**wait(), "on_timeout": "a"}, "a": action(), "done": EXIT}
    await register(service, nodes, "w")
    await service.enroll("c", "x", now=WED_10)
    claim = await claim_one(service, "c:x")  # a timeout job is leased; the state stays
    assert (claim.job_id, claim.record["state"]) == ("timeout:c:x:1", "waiting")
    assert set(await leases(service)) == {"timeout:c:x:1"}
    fired = WED_10 + timedelta(days=3)
    applied = await service.fire_timeout(TARGET, job_id=claim.job_id, node="w", step=1, now=fired)
    assert applied.ok
    status = await service.status("c:x")
    assert (status.state, status.node, status.step, status.run_at) == ("scheduled", "a", 2, fired)
    assert await queue(service) == {"step:c:x:2:1": ms(fired)}
    assert await leases(service) == {} and not await stored(service, "timeout:c:x:1")
    again = await service.fire_timeout(TARGET, job_id=claim.job_id, node="w", step=1, now=fired)
    assert not again.ok and (again.state, again.step) == ("scheduled", 2)  # stale


async def test_retry_schedules_the_next_attempt(service: SchedulingService) -> None:
    eid = await running(service, {"a": action()})
    error = {"type": "TransientError", "message": "503"}
    applied = await service.retry(
        TARGET,
        job_id=JOB1,
        node="a",
        step=1,
        attempt=1,
        delay=timedelta(seconds=30),
        error=error,
        now=WED_10,
    )
    assert applied.ok
    status = await service.status(eid)
    assert (status.state, status.step, status.attempt) == ("scheduled", 1, 2)
    assert status.error is not None and status.error.message == "503"
    assert await queue(service) == {step_job_id(eid, 1, 2): ms(WED_10 + timedelta(seconds=30))}
    assert await leases(service) == {} and not await stored(service, JOB1)
    assert (await payload(service, "step:c:x:1:2"))["a"] == ["c:x", 1, 2]
    assert await in_index(service, eid) == ["scheduled"]


async def test_retry_in_business_hours_waits_for_the_opening(service: SchedulingService) -> None:
    await register(service, entry="a", **business({"a": action()}))
    await service.enroll("c", "x", now=FRI_16)
    claim = await claim_one(service, "c:x")
    assert claim.code == ClaimCode.STARTED
    error = {"type": "TransientError", "message": "timeout"}
    applied = await service.retry(
        TARGET,
        job_id=claim.job_id,
        node="a",
        step=1,
        attempt=1,
        delay=timedelta(hours=2),
        error=error,
        now=FRI_16,
    )
    assert applied.ok
    # moved to the opening, and spread like any step due at an opening
    assert await queue(service) == {"step:c:x:1:2": ms(MON_OPEN + spread_offset("c:x", SPREAD))}


async def test_fail_keeps_the_error(service: SchedulingService) -> None:
    eid = await running(service, {"a": action()})
    error = {"type": "PermanentError", "message": "HTTP 400", "traceback": "tb", "trace_id": "ab"}
    applied = await service.fail(TARGET, job_id=JOB1, node="a", step=1, attempt=1, error=error)
    assert applied.ok and applied.state == "failed"
    assert await queue(service) == {} and await leases(service) == {}
    assert not await stored(service, JOB1)
    status = await service.status(eid)
    assert status.state == "failed" and status.error is not None
    assert (status.error.type, status.error.message, status.error.node) == (
        "PermanentError",
        "HTTP 400",
        "a",
    )
    assert (status.error.traceback, status.error.trace_id, status.error.step) == ("tb", "ab", 1)
    assert await in_index(service, eid) == ["failed"]


# --- deterministic job ids ------------------------------------------------------------


async def leave_job(service: SchedulingService, job_id: str, due_ms: int | None = 60_000) -> None:
    """A job left over under ``job_id`` (its payload, and a queue entry unless ``due_ms`` is
    None), as if its enrollment's record had been lost."""
    shard = service.keys.for_enrollment("c:x")
    doc = {
        "t": 1,
        "f": STEP_FUNCTION,
        "a": ["c:x", 1, 1],
        "k": {"version": 1, "node": "a"},
        "et": 1,
    }
    await service.redis.hset(shard.jobs, job_id, orjson.dumps(doc))
    if due_ms is not None:
        await service.redis.zadd(shard.queue, {job_id: due_ms})


async def test_a_taken_job_id_refuses_the_transition_and_writes_nothing(
    service: SchedulingService, redis: Any
) -> None:
    campaign = await register(service, {"a": action()}, "a")
    await leave_job(service, "step:c:x:1:1")  # the id the first step would get
    before = await snapshot(redis)
    plan = service.plan(campaign, TARGET, "a", 0, WED_10, reason="enrolled")
    assert plan.job is not None and plan.job.id == "step:c:x:1:1"
    tr = service.transition(
        plan,
        TARGET,
        from_state=None,
        expect_states=(),
        expect_step=0,
        now=WED_10,
        extra={"campaign": "c", "contact": "x", "version": "1"},
    )
    tr.create = True
    assert tr.campaign_id == "c" and tr.add_job == plan.job
    applied = await service.store.apply("c:x", tr)
    assert not applied.ok and applied.job_conflict == "step:c:x:1:1"
    assert (applied.state, applied.missing, applied.not_orphan) == (None, False, False)
    assert await snapshot(redis) == before
    assert not await redis.exists(service.keys.enrollment("c:x"), service.keys.history("c:x"))


async def test_enrolling_over_a_taken_job_id_is_refused_and_writes_nothing(
    service: SchedulingService, redis: Any
) -> None:
    await register(service, {"a": action()}, "a")
    await leave_job(service, "step:c:x:1:1", due_ms=None)  # a payload alone takes the id
    before = await snapshot(redis)
    with pytest.raises(InvalidRequest, match="job 'step:c:x:1:1' is still queued"):
        await service.enroll("c", "x")
    assert await service.enroll_many("c", [{"contact_id": "x"}]) == 0
    assert await snapshot(redis) == before
    assert await service.store.record("c:x") is None


async def test_a_leftover_payload_takes_the_id_of_the_next_step(
    service: SchedulingService, redis: Any
) -> None:
    eid = await running(service, {"a": action("b"), "b": action()})
    await leave_job(service, "step:c:x:2:1", due_ms=None)
    before = await snapshot(redis)
    applied = await service.advance(
        TARGET, job_id=JOB1, from_node="a", to_node="b", step=1, attempt=1, reason="ok"
    )
    assert not applied.ok and applied.job_conflict == "step:c:x:2:1"
    assert await snapshot(redis) == before
    assert (await service.status(eid)).state == "running"
    assert set(await leases(service)) == {JOB1}  # the running job is left as it was


async def test_arq_keys_do_not_take_campaign_job_ids(
    service: SchedulingService, redis: Any
) -> None:
    # campaign jobs no longer live in arq: arq's job, result and queue keys are apart
    eid = await running(service, {"a": action("b"), "b": action()})
    assert await redis.enqueue_job("run_step", "c:x", 2, 1, _job_id="step:c:x:2:1") is not None
    await redis.set("arq:result:step:c:x:2:1", b"{}")
    assert await redis.exists("arq:job:step:c:x:2:1")
    assert await redis.zrange(service.settings.arq_queue, 0, -1) == [b"step:c:x:2:1"]
    assert await queue(service) == {}
    applied = await service.advance(
        TARGET,
        job_id=JOB1,
        from_node="a",
        to_node="b",
        step=1,
        attempt=1,
        reason="ok",
        now=WED_10,
    )
    assert applied.ok
    assert await queue(service) == {"step:c:x:2:1": ms(WED_10)}
    assert (await payload(service, "step:c:x:2:1"))["k"]["node"] == "b"
    assert (await service.status(eid)).state == "scheduled"


# --- past times are clamped to now ------------------------------------------------------


async def test_a_deferral_into_the_past_is_clamped_to_now(service: SchedulingService) -> None:
    await register(service, entry="a", **business({"a": action()}))
    await service.enroll("c", "x", now=WED_10)
    claim = await claim_one(service, "c:x")
    applied = await service.defer(
        TARGET,
        job_id=claim.job_id,
        node="a",
        step=1,
        attempt=1,
        run_at=WED_10 - timedelta(hours=1),
        now=WED_10,
    )
    assert applied.ok and applied.state == "scheduled"
    job_id = step_job_id("c:x", 1, 1, ms(WED_10))
    assert job_id == f"step:c:x:1:1@{ms(WED_10)}"
    assert await queue(service) == {job_id: ms(WED_10)}
    assert await leases(service) == {} and not await stored(service, JOB1)
    assert (await payload(service, job_id))["a"] == ["c:x", 1, 1]  # the same attempt
    record = await service.store.record("c:x")
    assert record is not None and record["run_at"] == str(ms(WED_10))
    assert (record["job"], record["state"], record["attempt"]) == (job_id, "scheduled", "1")
    # the deferred job is claimed like any other
    again = await claim_one(service, "c:x")
    assert (again.code, again.job_id, again.record["attempt"]) == (ClaimCode.STARTED, job_id, "1")


async def test_release_hands_the_job_back_as_the_same_attempt(service: SchedulingService) -> None:
    eid = await running(service, {"a": action()})
    before = now_ms()
    applied = await service.release(
        TARGET, job_id=JOB1, node="a", step=1, attempt=1, reason="shutting down", delay_ms=5000
    )
    assert applied.ok and applied.state == "scheduled"
    due = (await queue(service))[JOB1]
    assert before + 5000 <= due <= now_ms() + 5000
    assert await leases(service) == {} and await stored(service, JOB1)
    record = await service.store.record(eid)
    assert record is not None
    assert (record["state"], record["job"], record["attempt"]) == ("scheduled", JOB1, "1")
    assert record["run_at"] == str(due)
    assert await in_index(service, eid) == ["scheduled"]
    assert (await service.status(eid)).history[-1].reason == "shutting down"
    # released once: a second release by the same job finds it no longer running
    again = await service.release(
        TARGET, job_id=JOB1, node="a", step=1, attempt=1, reason="shutting down"
    )
    assert not again.ok and again.state == "scheduled"
    claim = await claim_one(service, eid)
    assert (claim.code, claim.job_id, claim.record["attempt"]) == (ClaimCode.STARTED, JOB1, "1")


async def test_a_negative_retry_delay_is_clamped_to_now(service: SchedulingService) -> None:
    await running(service, {"a": action()})
    error = {"type": "TransientError", "message": "x"}
    applied = await service.retry(
        TARGET,
        job_id=JOB1,
        node="a",
        step=1,
        attempt=1,
        delay=timedelta(seconds=-30),
        error=error,
        now=WED_10,
    )
    assert applied.ok
    assert await queue(service) == {"step:c:x:1:2": ms(WED_10)}
    status = await service.status("c:x")
    assert status.run_at == WED_10


async def test_a_job_due_long_ago_keeps_its_payload(service: SchedulingService) -> None:
    # arq's own enqueue failed on a due time more than a day old (negative TTL); ours does not
    await register(service, {"a": action()}, "a")
    long_ago = datetime.now(UTC) - timedelta(days=3)
    await service.enroll("c", "x", now=long_ago)
    assert await queue(service) == {"step:c:x:1:1": ms(long_ago)}
    assert (await payload(service, "step:c:x:1:1"))["a"] == ["c:x", 1, 1]
    # it is due, and a worker claims it with its payload
    batch = await claim_due(service)
    assert [(c.code, c.job_id, c.score_ms) for c in batch.claims] == [
        (ClaimCode.STARTED, "step:c:x:1:1", ms(long_ago))
    ]
    assert batch.dead == [] and batch.stale == []


# --- the reconciler's repair: an active enrollment always gets its job back --------------


async def test_repair_recreates_a_lost_step_job_at_its_run_at(
    service: SchedulingService, redis: Any
) -> None:
    nodes = {"d": {"type": "delay", "duration": "PT2H", "next": "a"}, "a": action()}
    await register(service, nodes, "d")
    status = await service.enroll("c", "x")
    assert status.run_at is not None and status.run_at > datetime.now(UTC) + timedelta(hours=1)
    job_id, run_at = "step:c:x:2:1", ms(status.run_at)
    assert await queue(service) == {job_id: run_at}
    original = await payload(service, job_id)
    shard = service.keys.for_enrollment("c:x")
    await redis.zrem(shard.queue, job_id)
    await redis.hdel(shard.jobs, job_id)
    rec = await service.store.record("c:x")
    assert rec is not None

    applied = await service.repair("c:x", rec)
    assert applied is not None and applied.ok and applied.state == "scheduled"
    assert await queue(service) == {job_id: run_at}  # due when it was, not now
    assert await leases(service) == {}
    again = await payload(service, job_id)
    assert {k: v for k, v in again.items() if k != "et"} == {
        k: v for k, v in original.items() if k != "et"
    }
    after = await service.store.record("c:x")
    assert after is not None
    assert (after["state"], after["job"], after["run_at"], after["step"], after["attempt"]) == (
        "scheduled",
        job_id,
        str(run_at),
        "2",
        "1",
    )
    assert await in_index(service, "c:x") == ["scheduled"]
    last = (await service.status("c:x")).history[-1]
    assert (last.from_state, last.to_state, last.step) == ("scheduled", "scheduled", 2)
    assert last.reason == "reconciler: scheduled with no job; job re-created"
    # the re-created job is a valid one: a worker claims it
    claim = await claim_one(service, "c:x")
    assert (claim.code, claim.job_id) == (ClaimCode.STARTED, job_id)


async def test_repair_recreates_a_lost_timeout_at_the_deadline(
    service: SchedulingService, redis: Any
) -> None:
    await register(service, {"w": wait(), "done": EXIT}, "w")
    status = await service.enroll("c", "x")
    assert status.deadline is not None
    deadline = ms(status.deadline)
    shard = service.keys.for_enrollment("c:x")
    await redis.zrem(shard.queue, "timeout:c:x:1")
    await redis.hdel(shard.jobs, "timeout:c:x:1")
    assert await queue(service) == {}
    rec = await service.store.record("c:x")
    assert rec is not None

    applied = await service.repair("c:x", rec)
    assert applied is not None and applied.ok and applied.state == "waiting"
    assert await queue(service) == {"timeout:c:x:1": deadline}
    job = await payload(service, "timeout:c:x:1")
    assert (job["f"], job["a"], job["k"]["node"]) == (TIMEOUT_FUNCTION, ["c:x", 1], "w")
    after = await service.store.record("c:x")
    assert after is not None
    assert (after["state"], after["job"], after["deadline"]) == (
        "waiting",
        "timeout:c:x:1",
        str(deadline),
    )
    assert await in_index(service, "c:x") == ["waiting"]
    # still waiting for its event: the event moves it on and retires the re-created timeout
    assert await service.signal("c:x", "replied") is True
    assert (await service.status("c:x")).state == "completed"
    assert await queue(service) == {} and not await stored(service, "timeout:c:x:1")


async def test_repair_puts_a_running_step_with_no_lease_back_to_scheduled(
    service: SchedulingService, redis: Any
) -> None:
    eid = await running(service, {"a": action()})
    await redis.zrem(service.keys.for_enrollment(eid).leases, JOB1)  # the lease was lost
    rec = await service.store.record(eid)
    assert rec is not None and rec["state"] == "running"

    before = now_ms()
    applied = await service.repair(eid, rec)
    assert applied is not None and applied.ok and applied.state == "scheduled"
    due = (await queue(service))[JOB1]
    assert before <= due <= now_ms()  # due at once
    assert set(await queue(service)) == {JOB1} and await leases(service) == {}
    assert (await payload(service, JOB1))["a"] == ["c:x", 1, 1]
    after = await service.store.record(eid)
    assert after is not None
    assert (after["state"], after["job"], after["attempt"], after["run_at"]) == (
        "scheduled",
        JOB1,
        "1",
        str(due),
    )
    assert await in_index(service, eid) == ["scheduled"]
    last = (await service.status(eid)).history[-1]
    assert (last.from_state, last.to_state) == ("running", "scheduled")
    assert last.reason == "reconciler: running with no job; job re-created"
    # the step runs again as the same attempt
    claim = await claim_one(service, eid)
    assert (claim.code, claim.job_id, claim.record["attempt"]) == (ClaimCode.STARTED, JOB1, "1")


@pytest.mark.parametrize("state", ["scheduled", "waiting", "running"])
async def test_repair_leaves_a_healthy_enrollment_alone(
    service: SchedulingService, redis: Any, state: str
) -> None:
    if state == "waiting":
        await register(service, {"w": wait(), "done": EXIT}, "w")
    else:
        await register(service, {"a": action()}, "a")
    await service.enroll("c", "x")
    if state == "running":
        await claim_one(service, "c:x")
    rec = await service.store.record("c:x")
    assert rec is not None and rec["state"] == state
    before = await snapshot(redis)
    applied = await service.repair("c:x", rec)
    assert applied is not None and not applied.ok and applied.not_orphan
    assert applied.job_conflict is None
    assert await snapshot(redis) == before


async def test_repair_of_an_ended_or_changed_enrollment(
    service: SchedulingService, redis: Any
) -> None:
    await register(service, {"a": action()}, "a")
    await service.enroll("c", "x")
    stale = await service.store.record("c:x")
    assert stale is not None
    assert await service.cancel("c:x")
    before = await snapshot(redis)
    ended = await service.store.record("c:x")
    assert ended is not None
    assert await service.repair("c:x", ended) is None  # not active: nothing to repair
    # a record read before the cancel: the transition's preconditions refuse it
    applied = await service.repair("c:x", stale)
    assert applied is not None and not applied.ok and applied.state == "cancelled"
    assert await snapshot(redis) == before


# --- concurrency: exactly one winner --------------------------------------------------


async def test_concurrent_advances_have_exactly_one_winner(service: SchedulingService) -> None:
    eid = await running(service, {"a": action("b"), "b": action()})
    results = await asyncio.gather(
        *(
            service.advance(
                TARGET, job_id=JOB1, from_node="a", to_node="b", step=1, attempt=1, reason="ok"
            )
            for _ in range(50)
        )
    )
    assert sum(r.ok for r in results) == 1
    assert {(r.state, r.step) for r in results if not r.ok} == {("scheduled", 2)}
    history = (await service.status(eid)).history
    moves = [h for h in history if (h.from_state, h.to_state) == ("running", "scheduled")]
    assert len(moves) == 1
    assert set(await queue(service)) == {"step:c:x:2:1"}
    assert await leases(service) == {} and not await stored(service, JOB1)


async def test_concurrent_store_applies_have_exactly_one_winner(
    service: SchedulingService,
) -> None:
    eid = await running(service, {"a": action()})
    entry = {"at": now_ms(), "from": "running", "to": "completed", "step": 2, "reason": "race"}

    def finish() -> Transition:
        return Transition(
            campaign_id="c",
            expect_states=("running",),
            expect_step=1,
            history=[entry],
            set={"state": "completed", "step": "2"},
        )

    results = await asyncio.gather(*(service.store.apply(eid, finish()) for _ in range(50)))
    assert sum(r.ok for r in results) == 1
    assert {(r.state, r.step) for r in results if not r.ok} == {("completed", 2)}
    history = (await service.status(eid)).history
    assert [h.reason for h in history].count("race") == 1
    assert await in_index(service, eid) == ["completed"]
    assert await leases(service) == {} and not await stored(service, JOB1)  # retired with it


async def test_a_transition_for_another_campaign_is_refused(
    service: SchedulingService, redis: Any
) -> None:
    eid = await running(service, {"a": action()})
    before = await snapshot(redis)
    tr = Transition(
        campaign_id="other", expect_states=("running",), expect_step=1, set={"state": "completed"}
    )
    applied = await service.store.apply(eid, tr)
    assert not applied.ok and (applied.state, applied.step) == ("running", 1)
    assert await snapshot(redis) == before


async def test_event_and_timeout_race_has_one_winner(service: SchedulingService) -> None:
    await register(service, {"w": wait(), "done": EXIT}, "w")
    await service.enroll("c", "x")
    claim = await claim_one(service, "c:x")  # the timeout job is running
    signals = [service.signal("c:x", "replied") for _ in range(25)]
    timeouts = [
        service.fire_timeout(TARGET, job_id=claim.job_id, node="w", step=1) for _ in range(25)
    ]
    results = await asyncio.gather(*signals, *timeouts)
    signalled = sum(r is True for r in results[:25])
    timed_out = sum(r.ok for r in results[25:] if isinstance(r, Applied))
    assert signalled + timed_out == 1
    status = await service.status("c:x")
    assert status.state == "completed"
    assert [h.from_state for h in status.history].count("waiting") == 1
    assert await queue(service) == {} and await leases(service) == {}
    assert not await stored(service, "timeout:c:x:1")


async def test_concurrent_enrollments_of_one_contact(service: SchedulingService) -> None:
    await register(service, {"a": action()}, "a")
    results = await asyncio.gather(
        *(service.enroll("c", "x") for _ in range(50)), return_exceptions=True
    )
    won = [r for r in results if isinstance(r, EnrollmentStatus)]
    refused = [r for r in results if isinstance(r, AlreadyEnrolled)]
    assert (len(won), len(refused)) == (1, 49)
    assert len((await service.status("c:x")).history) == 1
    assert won[0].run_at is not None
    assert await queue(service) == {"step:c:x:1:1": ms(won[0].run_at)}
    assert await in_index(service, "c:x") == ["scheduled"]


CHILD = """
import asyncio, json, sys
from app.connection import create_redis
from app.jobs import JobTarget
from app.scheduling import SchedulingService
from app.settings import Settings

async def main(url, tasks, job_id):
    settings = Settings(redis_url=url)
    redis = create_redis(settings)
    service = SchedulingService(redis, settings)
    target = JobTarget("c:x", "c", 1, None)
    await service.campaign_for("c", 1)  # load the definition first: race the transition only
    await redis.rpush("test:ready", 1)
    assert await redis.blpop("test:go", timeout=60), "no start signal"
    results = await asyncio.gather(*(
        service.advance(target, job_id=job_id, from_node="a", to_node="b", step=1, attempt=1,
                        reason="ok")
        for _ in range(tasks)))
    print(json.dumps([r.ok for r in results]))
    await redis.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


async def test_two_processes_racing_have_exactly_one_winner(
    service: SchedulingService, settings: Settings, redis: Any
) -> None:
    eid = await running(service, {"a": action("b"), "b": action()})
    url = settings.redis_url.get_secret_value()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            url,
            "20",
            JOB1,
            cwd=ROOT,
            env=subprocess_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:
        for _ in procs:  # both are connected and waiting: start them at the same moment
            assert await redis.blpop("test:ready", timeout=60), "a child did not start"
        await redis.rpush("test:go", *([1] * len(procs)))
        outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    assert [p.returncode for p in procs] == [0, 0], [err.decode() for _, err in outputs]
    wins = [json.loads(out) for out, _ in outputs]
    assert [len(w) for w in wins] == [20, 20]
    assert sum(map(sum, wins)) == 1
    history = (await service.status(eid)).history
    moves = [h for h in history if (h.from_state, h.to_state) == ("running", "scheduled")]
    assert len(moves) == 1
