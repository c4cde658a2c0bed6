"""Moving enrollments to a new campaign version: ``migrate`` (node kept, mapped, or
reported) and ``replay --to-version``; a real worker then runs the new version."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.client import CampaignClient
from app.errors import CampaignNotFound, InvalidRequest
from app.jobs import JobTarget
from app.models import State
from app.settings import Settings
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from tests.queue_view import claim_due, claim_one, leased, payload, queued
from worker.embedded_redis import EmbeddedRedis

LATER = datetime.now(UTC) + timedelta(hours=1)


def v1(svc: FakeService) -> dict[str, Any]:
    return {
        "id": "c",
        "entry": "send",
        "nodes": {
            "send": {
                "type": "action",
                "action": "http",
                "params": {"url": svc.url("/bad")},
                "next": "wait",
            },
            "wait": {
                "type": "wait",
                "event": "replied",
                "timeout": "P3D",
                "on_event": "done",
                "on_timeout": "old_nudge",
            },
            "old_nudge": {"type": "action", "action": "log", "next": "done"},
            "done": {"type": "exit"},
        },
    }


def v2(svc: FakeService) -> dict[str, Any]:
    """The fix: "send" calls an endpoint that works; "old_nudge" became "nudge"."""
    doc = v1(svc)
    nodes = dict(doc["nodes"])
    nodes["send"] = {**nodes["send"], "params": {"url": svc.url("/ok")}}
    nodes["wait"] = {**nodes["wait"], "on_timeout": "nudge"}
    del nodes["old_nudge"]
    nodes["nudge"] = {"type": "action", "action": "log", "next": "done"}
    return {**doc, "nodes": nodes}


async def test_migrate_keeps_node_and_due_time_and_swaps_the_job_payload(
    client: CampaignClient, svc: FakeService
) -> None:
    await client.register_campaign(v1(svc))
    await client.enroll("c", "sched", node="send", run_at=LATER)
    await client.enroll("c", "waits", node="wait", run_at=LATER)
    await client.enroll("c", "stuck", node="old_nudge", run_at=LATER)
    assert await client.register_campaign(v2(svc)) == 2
    keys = client.service.keys

    dry = await client.migrate("c", 2, dry_run=True)
    assert (dry.total, dry.left_count) == (2, 1)
    assert (await client.status("c:sched")).campaign_version == 1

    report = await client.migrate("c", 2)
    assert report.moved == {"failed": 0, "scheduled": 1, "waiting": 1}
    assert report.left == [
        ("c:stuck", "old_nudge", "node 'old_nudge' is not in version 2 (map it with --map)")
    ]
    sched = await client.status("c:sched")
    assert (sched.campaign_version, sched.node, sched.run_at) == (
        2,
        "send",
        LATER.replace(microsecond=LATER.microsecond // 1000 * 1000),
    )
    assert "migrated from version 1 to 2" in sched.history[-1].reason
    jobs = await queued(client.redis, keys)
    assert set(jobs) == {"step:c:sched:1:1", "timeout:c:waits:1", "step:c:stuck:1:1"}
    doc = await payload(client.redis, keys, "step:c:sched:1:1")
    assert doc is not None and doc["k"]["version"] == 2
    doc = await payload(client.redis, keys, "timeout:c:waits:1")
    assert doc is not None and doc["k"]["version"] == 2 and doc["k"]["node"] == "wait"

    mapped = await client.migrate("c", 2, mapping={"old_nudge": "nudge"})
    assert (mapped.total, mapped.already, mapped.left_count) == (1, 2, 0)
    stuck = await client.status("c:stuck")
    assert (stuck.node, stuck.campaign_version) == ("nudge", 2)
    assert "(node old_nudge -> nudge)" in stuck.history[-1].reason
    doc = await payload(client.redis, keys, "step:c:stuck:1:1")
    assert doc is not None and doc["k"]["node"] == "nudge"


async def test_a_wait_whose_timeout_job_is_running_is_left_alone_until_it_is_done(
    client: CampaignClient, svc: FakeService
) -> None:
    """A worker that claimed the timeout job holds version 1's payload: migrate must not
    swap it (the record would say version 2 while the enrollment moved along version 1)."""
    await client.register_campaign(v1(svc))
    await client.enroll("c", "w", node="wait", run_at=LATER)
    await client.register_campaign(v2(svc))
    keys = client.service.keys
    claim = await claim_one(client.service, "c:w")
    assert claim.job_id == "timeout:c:w:1"
    assert "timeout:c:w:1" in await leased(client.redis, keys)
    before = await client.service.store.record("c:w")
    job_before = await payload(client.redis, keys, "timeout:c:w:1")

    report = await client.migrate("c", 2)
    assert await client.service.store.record("c:w") == before
    assert await payload(client.redis, keys, "timeout:c:w:1") == job_before
    assert (report.total, report.running, report.left_count) == (0, 1, 0)
    assert "timeout:c:w:1" in await leased(client.redis, keys)  # the worker keeps its lease

    # The worker hands the job back (e.g. shutting down): now nobody runs it.
    target = JobTarget("c:w", "c", 1, None, 0)
    released = await client.service.release_timeout(target, job_id="timeout:c:w:1", step=1)
    assert released.ok
    again = await client.migrate("c", 2)
    assert (again.moved["waiting"], again.running) == (1, 0)
    doc = await payload(client.redis, keys, "timeout:c:w:1")
    assert doc is not None and doc["k"]["version"] == 2
    assert (await client.status("c:w")).campaign_version == 2


async def test_a_scheduled_step_after_a_delay_moves_whatever_its_node(
    client: CampaignClient,
) -> None:
    """After a delay the step job enters the next node whatever its type (here a wait):
    such a scheduled enrollment migrates like any other."""
    doc: dict[str, Any] = {
        "id": "d",
        "entry": "send",
        "nodes": {
            "send": {"type": "action", "action": "log", "next": "pause"},
            "pause": {"type": "delay", "duration": "PT1H", "next": "wait"},
            "wait": {
                "type": "wait",
                "event": "e",
                "timeout": "P1D",
                "on_event": "end",
                "on_timeout": "end",
            },
            "end": {"type": "exit"},
        },
    }
    await client.register_campaign(doc)
    await client.enroll("d", "x", node="pause", run_at=LATER)
    st = await client.status("d:x")
    assert (st.state, st.node) == (State.SCHEDULED, "wait")  # the delay's next node, due later
    wait2 = {**doc["nodes"]["wait"], "timeout": "P2D"}
    await client.register_campaign({**doc, "nodes": {**doc["nodes"], "wait": wait2}})
    report = await client.migrate("d", 2)
    assert (report.moved["scheduled"], report.left) == (1, [])
    st = await client.status("d:x")
    assert (st.campaign_version, st.node, st.state) == (2, "wait", State.SCHEDULED)
    rec = await client.service.store.record("d:x") or {}
    job = await payload(client.redis, client.service.keys, rec["job"])
    assert job is not None and job["k"]["version"] == 2 and job["k"]["node"] == "wait"


async def test_a_node_of_another_kind_is_reported(client: CampaignClient, svc: FakeService) -> None:
    await client.register_campaign(v1(svc))
    await client.enroll("c", "x", node="wait", run_at=LATER)
    await client.register_campaign(v2(svc))
    report = await client.migrate("c", 2, mapping={"wait": "nudge"})
    assert report.left == [
        ("c:x", "wait", "node 'nudge' is a action node in version 2, not a wait")
    ]
    with pytest.raises(InvalidRequest, match="node 'nope' is not in version 2"):
        await client.migrate("c", 2, mapping={"wait": "nope"})
    with pytest.raises(InvalidRequest, match="state 'running' cannot be migrated"):
        await client.migrate("c", 2, states=["running"])
    with pytest.raises(CampaignNotFound):
        await client.migrate("c", 7)


@pytest.fixture
async def worker(redis_server: EmbeddedRedis, redis: Any) -> AsyncIterator[WorkerProcess]:
    proc = WorkerProcess(redis_server.url).start()
    await proc.wait_status("/readyz", 200)
    yield proc
    assert proc.stop() == 0


async def _state(client: CampaignClient, eid: str, state: State) -> Any:
    async def check() -> Any:
        st = await client.status(eid)
        return st if st.state == state else None

    return await eventually(check, 15, 0.02, f"{eid} to be {state}")


async def test_failed_ones_replay_on_the_fixed_version(
    client: CampaignClient, svc: FakeService, worker: WorkerProcess
) -> None:
    """The broken version fails at "send" (HTTP 400); replay --to-version 2 runs the fix,
    and migrate moves a failed one so that a plain replay runs the fix too."""
    await client.register_campaign(v1(svc))
    for contact in ("a", "b", "c"):
        await client.enroll("c", contact)
    for contact in ("a", "b", "c"):
        await _state(client, f"c:{contact}", State.FAILED)
    await client.register_campaign(v2(svc))

    st = await client.replay("c:a", to_version=2)
    assert st.campaign_version == 2 and "replayed on version 2 (was 1)" in st.history[-1].reason
    await _state(client, "c:a", State.WAITING)

    report = await client.migrate("c", 2, states=["failed"])
    assert report.moved["failed"] == 2
    assert (await client.status("c:b")).state == State.FAILED  # failed stays failed
    await client.replay("c:b")
    await _state(client, "c:b", State.WAITING)
    assert [c.path for c in svc.calls_for("c:a")] == ["/bad", "/ok"]
    assert [c.path for c in svc.calls_for("c:b")] == ["/bad", "/ok"]


def test_migrate_and_replay_commands(cli: Any, settings: Settings, tmp_path: Any) -> None:
    async def setup() -> None:
        svc = FakeService(port=9)
        async with CampaignClient(settings=settings) as client:
            await client.register_campaign(v1(svc))
            await client.enroll("c", "x", node="old_nudge", run_at=LATER)
            await client.enroll("c", "y", node="wait", run_at=LATER)
            await client.register_campaign(v2(svc))

    asyncio.run(setup())
    code, out, _ = cli("migrate", "c", "--to-version", "2", "--dry-run")
    assert code == 1
    assert "left c:x at node 'old_nudge': node 'old_nudge' is not in version 2" in out
    assert "would migrate 1 enrollment of 'c' to version 2" in out
    code, out, _ = cli("migrate", "c", "--to-version", "2", "--map", "old_nudge=nudge",
                       "--state", "scheduled")  # fmt: skip
    assert code == 0, out
    assert "migrated 1 enrollment of 'c' to version 2 (1 scheduled); 0 already on it" in out
    code, _, err = cli("migrate", "nope", "--to-version", "1")
    assert code == 1 and "no campaign named 'nope' is registered" in err, err
    for argv, message in [
        (["--map", "old_nudge"], "write it as OLD=NEW"),
        (["--map", "a=b", "--map", "a=c"], "mapped twice"),
        (["--map", "a=zzz"], "node 'zzz' is not in version 2"),
    ]:
        code, _, err = cli("migrate", "c", "--to-version", "2", *argv)
        assert code == 1 and message in err, (argv, err)
    code, _, err = cli("replay", "c:y", "--to-version", "9")
    assert code == 1 and "version 9" in err
    code, _, err = cli("replay", "c:y", "--to-version", "2")
    assert code == 1 and "only failed enrollments can be replayed" in err


def test_replay_group_says_what_it_skipped(cli: Any, settings: Settings) -> None:
    """``replay --group --to-version N``: a node missing in N is one clear line and exit 1
    (not "replayed 0 of 2"); a member skipped for another reason is printed, exit 1."""

    async def setup() -> None:
        svc = FakeService(port=9)
        async with CampaignClient(settings=settings) as client:
            await client.register_campaign(v1(svc))
            for contact in ("a", "b"):
                await client.enroll("c", contact)
            batch = await claim_due(client.service)
            assert len(batch.claims) == 2
            for claim in batch.claims:
                failed = await client.service.fail(
                    claim.payload.target, job_id=claim.job_id, node="send", step=1, attempt=1,
                    error={"type": "Boom", "message": "boom"},
                )  # fmt: skip
                assert failed.ok
            await client.register_campaign(v2(svc))
            without_send = v2(svc)
            without_send["nodes"]["post"] = without_send["nodes"].pop("send")
            without_send["entry"] = "post"
            assert await client.register_campaign(without_send) == 3
            await client.redis.hset(client.service.keys.enrollment("c:b"), "version", "x")  # type: ignore[misc]

    asyncio.run(setup())
    code, out, err = cli("replay", "--group", "c:send:Boom", "--to-version", "3")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "node 'send' is not in version 3" in err, err
    code, out, _ = cli("replay", "--group", "c:send:Boom", "--to-version", "2")
    assert code == 1
    assert "skipped c:b: enrollment 'c:b': stored field 'version'" in out
    assert "replayed 1 of 2 failed enrollments in c:send:Boom" in out
