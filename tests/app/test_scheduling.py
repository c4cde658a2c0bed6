"""SchedulingService on a real Redis: where each node type lands, which arq job goes with
it and when, deterministic job ids, clamping, and races between concurrent transitions.

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
from app.errors import AlreadyEnrolled
from app.models import EnrollmentStatus, State
from app.scheduling import (
    STEP_FUNCTION,
    TIMEOUT_FUNCTION,
    JobTarget,
    SchedulingService,
    step_job_id,
    timeout_job_id,
)
from app.settings import Settings
from app.store import Applied, Transition, now_ms
from tests.conftest import ROOT, subprocess_env

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
    """The arq queue: job id -> score (ms)."""
    raw = await service.redis.zrange(service.settings.queue_name, 0, -1, withscores=True)
    return {k.decode(): int(v) for k, v in raw}


async def payload(service: SchedulingService, job_id: str) -> dict[str, Any]:
    raw = await service.redis.get(f"arq:job:{job_id}")
    assert raw is not None, f"no arq:job:{job_id}"
    doc: dict[str, Any] = orjson.loads(raw)
    return doc


async def in_index(service: SchedulingService, eid: str) -> list[str]:
    """The states whose index set holds ``eid``."""
    return [
        s.value
        for s in State
        if await service.redis.sismember(service.keys.state_index("c", s.value), eid)
    ]


async def snapshot(redis: Any) -> dict[bytes, bytes]:
    """Every key with its serialized value: equal snapshots mean nothing was written."""
    return {key: await redis.dump(key) for key in sorted(await redis.keys("*"))}


async def running(service: SchedulingService, nodes: dict[str, Any], entry: str = "a") -> str:
    """An enrollment whose step 1 job has been claimed by a worker (state running)."""
    await register(service, nodes, entry)
    status = await service.enroll("c", "x")
    code, record = await service.store.claim(status.enrollment_id, 1, 1, entry)
    assert code == 1 and record["state"] == "running"
    return status.enrollment_id


TARGET = JobTarget("c:x", "c", 1, None)


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
    assert job["k"] == {"campaign": "c", "version": 1, "node": "a", "tz": None}
    record = await service.store.record("c:x")
    assert record is not None and record["job"] == "step:c:x:1:1"
    assert await in_index(service, "c:x") == ["scheduled"]
    # the job key outlives its due time by job_expiry_extra
    ttl = await service.redis.pttl("arq:job:step:c:x:1:1")
    expires = max(ms(WED_10), now_ms()) + int(service.settings.job_expiry_extra * 1000)
    assert expires - now_ms() - 1000 < ttl <= expires - before + 1


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
    assert [h.reason for h in status.history] == ["enrolled; delay d 2h; then a"]


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
    later = WED_10 + timedelta(hours=1, seconds=3)
    applied = await service.enter(TARGET, node="w", step=2, attempt=1, now=later)
    assert applied.ok and applied.state == "waiting"
    status = await service.status("c:x")
    assert (status.state, status.step, status.deadline) == ("waiting", 2, later + timedelta(days=3))
    assert (await queue(service))["timeout:c:x:2"] == ms(later + timedelta(days=3))


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
    assert await service.redis.keys("arq:job:*") == []
    assert await in_index(service, "c:x") == ["completed"]
    record = await service.store.record("c:x")
    assert record is not None and "job" not in record and "run_at" not in record


async def test_next_null_completes_with_no_job(service: SchedulingService) -> None:
    eid = await running(service, {"a": action(None)})
    applied = await service.advance(
        TARGET, from_node="a", to_node=None, step=1, attempt=1, reason="outcome ok", now=WED_10
    )
    assert applied.ok and applied.state == "completed"
    status = await service.status(eid)
    assert (status.state, status.node, status.step, status.run_at) == ("completed", None, 2, None)
    assert set(await queue(service)) == {"step:c:x:1:1"}  # only the running job (arq removes it)
    assert await in_index(service, eid) == ["completed"]
    assert status.history[-1].reason == "outcome ok; next: null"


async def test_advance_to_an_action_schedules_the_next_step(service: SchedulingService) -> None:
    eid = await running(service, {"a": action("b"), "b": action()})
    applied = await service.advance(
        TARGET, from_node="a", to_node="b", step=1, attempt=1, reason="ok", now=WED_10
    )
    assert applied.ok
    status = await service.status(eid)
    assert (status.state, status.node, status.step, status.attempt) == ("scheduled", "b", 2, 1)
    assert (await queue(service))["step:c:x:2:1"] == ms(WED_10)


async def test_timeout_moves_a_waiting_enrollment_on_once(service: SchedulingService) -> None:
    nodes = {"w": {**wait(), "on_timeout": "a"}, "a": action(), "done": EXIT}
    await register(service, nodes, "w")
    await service.enroll("c", "x", now=WED_10)
    fired = WED_10 + timedelta(days=3)
    applied = await service.fire_timeout(TARGET, node="w", step=1, now=fired)
    assert applied.ok
    status = await service.status("c:x")
    assert (status.state, status.node, status.step, status.run_at) == ("scheduled", "a", 2, fired)
    again = await service.fire_timeout(TARGET, node="w", step=1, now=fired)
    assert not again.ok and (again.state, again.step) == ("scheduled", 2)  # stale


async def test_retry_schedules_the_next_attempt(service: SchedulingService) -> None:
    eid = await running(service, {"a": action()})
    error = {"type": "TransientError", "message": "503"}
    applied = await service.retry(
        TARGET, node="a", step=1, attempt=1, delay=timedelta(seconds=30), error=error, now=WED_10
    )
    assert applied.ok
    status = await service.status(eid)
    assert (status.state, status.step, status.attempt) == ("scheduled", 1, 2)
    assert status.error is not None and status.error.message == "503"
    assert (await queue(service))[step_job_id(eid, 1, 2)] == ms(WED_10 + timedelta(seconds=30))


async def test_retry_in_business_hours_waits_for_the_opening(service: SchedulingService) -> None:
    await register(service, entry="a", **business({"a": action()}))
    await service.enroll("c", "x", now=FRI_16)
    assert (await service.store.claim("c:x", 1, 1, "a"))[0] == 1
    error = {"type": "TransientError", "message": "timeout"}
    applied = await service.retry(
        TARGET, node="a", step=1, attempt=1, delay=timedelta(hours=2), error=error, now=FRI_16
    )
    assert applied.ok
    # moved to the opening, and spread like any step due at an opening
    assert (await queue(service))["step:c:x:1:2"] == ms(MON_OPEN + spread_offset("c:x", SPREAD))


async def test_fail_keeps_the_error(service: SchedulingService) -> None:
    eid = await running(service, {"a": action()})
    error = {"type": "PermanentError", "message": "HTTP 400", "traceback": "tb", "trace_id": "ab"}
    applied = await service.fail(TARGET, node="a", step=1, attempt=1, error=error)
    assert applied.ok and applied.state == "failed"
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


async def test_a_taken_job_id_refuses_the_transition_and_writes_nothing(
    service: SchedulingService, redis: Any
) -> None:
    campaign = await register(service, {"a": action()}, "a")
    # a job left over with the id the first step would get
    assert await redis.enqueue_job("run_step", _job_id="step:c:x:1:1", _defer_by=60) is not None
    before = await snapshot(redis)
    plan = service.plan(campaign, TARGET, "a", 0, WED_10, reason="enrolled")
    assert plan.job is not None and plan.job.id == "step:c:x:1:1"
    tr = service.transition(
        plan,
        from_state=None,
        expect_states=(),
        expect_step=0,
        now=WED_10,
        extra={"campaign": "c", "contact": "x", "version": "1"},
    )
    tr.create = True
    applied = await service.store.apply("c:x", tr)
    assert not applied.ok and applied.job_conflict == "step:c:x:1:1"
    assert await snapshot(redis) == before
    assert not await redis.exists(service.keys.enrollment("c:x"), service.keys.history("c:x"))


async def test_a_kept_result_also_takes_the_id(service: SchedulingService, redis: Any) -> None:
    eid = await running(service, {"a": action("b"), "b": action()})
    await redis.set("arq:result:step:c:x:2:1", b"{}")  # arq keeps results under this key
    before = await snapshot(redis)
    applied = await service.advance(
        TARGET, from_node="a", to_node="b", step=1, attempt=1, reason="ok"
    )
    assert not applied.ok and applied.job_conflict == "step:c:x:2:1"
    assert await snapshot(redis) == before
    assert (await service.status(eid)).state == "running"


async def test_arq_refuses_to_enqueue_over_a_scheduled_step(
    service: SchedulingService, redis: Any
) -> None:
    await register(service, {"a": action()}, "a")
    await service.enroll("c", "x", now=WED_10)
    assert await redis.enqueue_job("run_step", "c:x", 1, 1, _job_id="step:c:x:1:1") is None
    assert await queue(service) == {"step:c:x:1:1": ms(WED_10)}


# --- past times are clamped to now ------------------------------------------------------


async def test_a_deferral_into_the_past_is_clamped_to_now(service: SchedulingService) -> None:
    await register(service, entry="a", **business({"a": action()}))
    await service.enroll("c", "x", now=WED_10)
    applied = await service.defer(
        TARGET, node="a", step=1, attempt=1, run_at=WED_10 - timedelta(hours=1), now=WED_10
    )
    assert applied.ok
    job_id = step_job_id("c:x", 1, 1, ms(WED_10))
    assert job_id == f"step:c:x:1:1@{ms(WED_10)}"
    assert (await queue(service))[job_id] == ms(WED_10)
    record = await service.store.record("c:x")
    assert record is not None and record["run_at"] == str(ms(WED_10))
    assert record["job"] == job_id


async def test_a_negative_retry_delay_is_clamped_to_now(service: SchedulingService) -> None:
    await running(service, {"a": action()})
    error = {"type": "TransientError", "message": "x"}
    applied = await service.retry(
        TARGET, node="a", step=1, attempt=1, delay=timedelta(seconds=-30), error=error, now=WED_10
    )
    assert applied.ok
    assert (await queue(service))["step:c:x:1:2"] == ms(WED_10)
    status = await service.status("c:x")
    assert status.run_at == WED_10


async def test_a_job_due_long_ago_keeps_its_key(service: SchedulingService) -> None:
    # arq's own enqueue fails on a due time more than a day old (negative TTL); ours does not
    await register(service, {"a": action()}, "a")
    long_ago = datetime.now(UTC) - timedelta(days=3)
    await service.enroll("c", "x", now=long_ago)
    assert (await queue(service))["step:c:x:1:1"] == ms(long_ago)
    extra = int(service.settings.job_expiry_extra * 1000)
    assert extra - 60_000 < await service.redis.pttl("arq:job:step:c:x:1:1") <= extra


# --- concurrency: exactly one winner --------------------------------------------------


async def test_concurrent_advances_have_exactly_one_winner(service: SchedulingService) -> None:
    eid = await running(service, {"a": action("b"), "b": action()})
    results = await asyncio.gather(
        *(
            service.advance(TARGET, from_node="a", to_node="b", step=1, attempt=1, reason="ok")
            for _ in range(50)
        )
    )
    assert sum(r.ok for r in results) == 1
    assert {(r.state, r.step) for r in results if not r.ok} == {("scheduled", 2)}
    history = (await service.status(eid)).history
    moves = [h for h in history if (h.from_state, h.to_state) == ("running", "scheduled")]
    assert len(moves) == 1
    assert set(await queue(service)) == {"step:c:x:1:1", "step:c:x:2:1"}


async def test_concurrent_store_applies_have_exactly_one_winner(
    service: SchedulingService,
) -> None:
    eid = await running(service, {"a": action()})
    entry = {"at": now_ms(), "from": "running", "to": "completed", "step": 2, "reason": "race"}

    def finish() -> Transition:
        return Transition(
            expect_states=("running",),
            expect_step=1,
            history=[entry],
            set={"state": "completed", "step": "2"},
        )

    results = await asyncio.gather(*(service.store.apply(eid, finish()) for _ in range(50)))
    assert sum(r.ok for r in results) == 1
    history = (await service.status(eid)).history
    assert [h.reason for h in history].count("race") == 1


async def test_event_and_timeout_race_has_one_winner(service: SchedulingService) -> None:
    await register(service, {"w": wait(), "done": EXIT}, "w")
    await service.enroll("c", "x")
    signals = [service.signal("c:x", "replied") for _ in range(25)]
    timeouts = [service.fire_timeout(TARGET, node="w", step=1) for _ in range(25)]
    results = await asyncio.gather(*signals, *timeouts)
    signalled = sum(r is True for r in results[:25])
    timed_out = sum(r.ok for r in results[25:] if isinstance(r, Applied))
    assert signalled + timed_out == 1
    status = await service.status("c:x")
    assert status.state == "completed"
    assert [h.from_state for h in status.history].count("waiting") == 1


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


CHILD = """
import asyncio, json, sys
from app.connection import create_redis
from app.scheduling import JobTarget, SchedulingService
from app.settings import Settings

async def main(url, tasks):
    settings = Settings(redis_url=url)
    redis = create_redis(settings)
    service = SchedulingService(redis, settings)
    target = JobTarget("c:x", "c", 1, None)
    await service.campaign_for("c", 1)  # load the definition first: race the transition only
    await redis.rpush("test:ready", 1)
    assert await redis.blpop("test:go", timeout=60), "no start signal"
    results = await asyncio.gather(*(
        service.advance(target, from_node="a", to_node="b", step=1, attempt=1, reason="ok")
        for _ in range(tasks)))
    print(json.dumps([r.ok for r in results]))
    await redis.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
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
