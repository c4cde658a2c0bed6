"""CampaignClient (PRODUCT.md section 6) against a real Redis: typed errors, re-entry,
signals, cancel, bulk enrollment and its round trips, status history, replay, and clients
under different key prefixes sharing one Redis.

Jobs are read from the campaign queue and jobs hash (see ``app/keys.py``); steps are
claimed the way a worker claims them (:mod:`tests.queue_view`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from app import (
    AlreadyEnrolled,
    CampaignClient,
    CampaignNotFound,
    EnrollmentNotFound,
    InvalidRequest,
)
from app.jobs import JobTarget
from app.keys import Keys
from app.settings import Settings
from bench.roundtrips import RoundTrips
from tests.queue_view import claim_due, claim_one, leased, queued
from tests.queue_view import job_exists as stored
from worker.embedded_redis import EmbeddedRedis
from worker.step_queue import ClaimCode

EXIT = {"type": "exit"}


def action(next_: str | None = None) -> dict[str, Any]:
    return {"type": "action", "action": "log", "next": next_}


ONE_STEP = {"id": "c", "entry": "a", "nodes": {"a": action()}}
WAITING = {
    "id": "w",
    "entry": "wait_reply",
    "nodes": {
        "wait_reply": {
            "type": "wait",
            "event": ["replied", "clicked"],
            "timeout": "P3D",
            "on_event": "thanks",
            "on_timeout": "done",
        },
        "thanks": action("done"),
        "done": EXIT,
    },
}


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


async def queue(client: CampaignClient) -> dict[str, int]:
    """The client's campaign job queue: job id -> due time (ms)."""
    return await queued(client.redis, client.service.keys)


async def leases(client: CampaignClient) -> dict[str, int]:
    return await leased(client.redis, client.service.keys)


async def job_exists(client: CampaignClient, job_id: str) -> bool:
    """Whether the client's jobs hash holds a payload for ``job_id``."""
    return await stored(client.redis, client.service.keys, job_id)


async def commandstats(redis: Any) -> dict[str, int]:
    return {
        k.removeprefix("cmdstat_"): v["calls"]
        for k, v in (await redis.info("commandstats")).items()
    }


# --- enrolling -----------------------------------------------------------------------


async def test_enroll_returns_the_status(client: CampaignClient) -> None:
    assert await client.register_campaign(ONE_STEP) == 1
    status = await client.enroll(
        "c", "contact-42", attributes={"email": "a@b.c"}, timezone="Europe/Berlin"
    )
    assert status.enrollment_id == "c:contact-42"
    assert (status.campaign_id, status.contact_id, status.campaign_version) == (
        "c",
        "contact-42",
        1,
    )
    assert (status.state, status.node, status.step, status.attempt) == ("scheduled", "a", 1, 1)
    assert status.attributes == {"email": "a@b.c"} and status.timezone == "Europe/Berlin"
    assert status.run_at is not None
    assert await queue(client) == {"step:c:contact-42:1:1": ms(status.run_at)}
    assert await job_exists(client, "step:c:contact-42:1:1")


async def test_enrolling_twice_is_refused(client: CampaignClient) -> None:
    await client.register_campaign(ONE_STEP)
    await client.enroll("c", "x")
    with pytest.raises(
        AlreadyEnrolled, match=r"'x' is already enrolled in campaign 'c'.*scheduled"
    ):
        await client.enroll("c", "x")
    await client.cancel("c:x")
    with pytest.raises(AlreadyEnrolled, match="does not allow re-entry"):
        await client.enroll("c", "x")
    status = await client.status("c:x")
    assert status.state == "cancelled" and len(status.history) == 2


async def test_reentry_after_cancel_and_completion_keeps_steps_growing(
    client: CampaignClient,
) -> None:
    await client.register_campaign({**ONE_STEP, "reentry": True})
    first = await client.enroll("c", "x")
    assert first.step == 1
    with pytest.raises(AlreadyEnrolled, match="is scheduled"):  # re-entry is only after the end
        await client.enroll("c", "x")

    assert await client.cancel("c:x")
    second = await client.enroll("c", "x")
    assert (second.state, second.step) == ("scheduled", 2)
    assert second.run_at is not None
    assert await queue(client) == {"step:c:x:2:1": ms(second.run_at)}

    # complete it the way a worker would: claim step 2, then next: null
    service = client.service
    claim = await claim_one(service, "c:x")
    assert (claim.code, claim.job_id) == (ClaimCode.STARTED, "step:c:x:2:1")
    target = JobTarget("c:x", "c", 1, None, base_step=1)
    assert claim.payload.target == target  # a re-entry's job carries its base step
    done = await service.advance(
        target, job_id=claim.job_id, from_node="a", to_node=None, step=2, attempt=1, reason="ok"
    )
    assert done.ok and (await client.status("c:x")).step == 3
    assert await queue(client) == {} and await leases(client) == {}
    third = await client.enroll("c", "x")
    assert (third.state, third.step) == ("scheduled", 4)
    assert set(await queue(client)) == {"step:c:x:4:1"}  # step 2's job ended with it

    # and in bulk: skipped while active, re-entered after the end
    assert await client.enroll_many("c", [{"contact_id": "x"}]) == 0
    assert await client.cancel("c:x")
    assert await client.enroll_many("c", [{"contact_id": "x"}]) == 1
    status = await client.status("c:x")
    assert (status.state, status.step) == ("scheduled", 5)
    assert set(await queue(client)) == {"step:c:x:5:1"}
    assert await job_exists(client, "step:c:x:5:1") and not await job_exists(client, "step:c:x:4:1")
    steps = [h.step for h in status.history]
    assert steps == sorted(steps) and steps[-1] == 5
    assert [h.to_state for h in status.history] == [
        "scheduled",
        "cancelled",
        "scheduled",
        "running",
        "completed",
        "scheduled",
        "cancelled",
        "scheduled",
    ]


async def test_unknown_campaign(client: CampaignClient) -> None:
    with pytest.raises(CampaignNotFound, match="'nope'"):
        await client.enroll("nope", "x")
    with pytest.raises(CampaignNotFound):
        await client.enroll_many("nope", [{"contact_id": "x"}])
    with pytest.raises(CampaignNotFound):
        await client.get_campaign("nope")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"contact_id": "x", "timezone": "Mars/Base"}, "timezone: unknown time zone 'Mars/Base'"),
        ({"contact_id": ""}, "contact_id must be a non-empty string of at most 256 characters"),
        ({"contact_id": "x" * 257}, "contact_id must be a non-empty string of at most 256"),
        ({"contact_id": 42}, "contact_id must be a non-empty string"),
        ({"contact_id": "a b"}, "contact_id 'a b' contains whitespace or control characters"),
        ({"contact_id": "a\nb"}, "contact_id 'a\\nb' contains whitespace or control characters"),
        ({"contact_id": "x", "attributes": ["not", "a", "dict"]}, "attributes must be a dict"),
        (
            {"contact_id": "x", "attributes": {"when": object()}},
            "attributes must be JSON-serializable",
        ),
    ],
)
async def test_invalid_requests_write_nothing(
    client: CampaignClient, redis: Any, kwargs: dict[str, Any], message: str
) -> None:
    await client.register_campaign(ONE_STEP)
    before = sorted(await redis.keys("*"))
    with pytest.raises(InvalidRequest, match="^" + re.escape(message)):
        await client.enroll("c", **kwargs)
    contacts = [{"contact_id": "ok1"}, {"contact_id": "ok2"}, kwargs]
    with pytest.raises(InvalidRequest, match="^" + re.escape(f"contacts[2]: {message}")):
        await client.enroll_many("c", contacts)
    assert sorted(await redis.keys("*")) == before


async def test_enroll_many_rejects_entries_without_a_contact_id(client: CampaignClient) -> None:
    await client.register_campaign(ONE_STEP)
    with pytest.raises(InvalidRequest, match=r"contacts\[1\]: must be a dict with a 'contact_id'"):
        await client.enroll_many("c", [{"contact_id": "a"}, {"id": "b"}])


# --- signals and cancel ---------------------------------------------------------------


async def test_signal_removes_the_timeout_job_and_schedules_on_event(
    client: CampaignClient,
) -> None:
    await client.register_campaign(WAITING)
    status = await client.enroll("w", "x")
    assert (status.state, status.node, status.step) == ("waiting", "wait_reply", 1)
    assert set(await queue(client)) == {"timeout:w:x:1"}
    assert await job_exists(client, "timeout:w:x:1")

    assert await client.signal("w:x", "bounced") is False  # not an event it waits for
    assert set(await queue(client)) == {"timeout:w:x:1"}
    assert (await client.status("w:x")).state == "waiting"

    assert await client.signal("w:x", "replied", payload={"text": "thanks!"}) is True
    assert "timeout:w:x:1" not in await queue(client)
    assert not await job_exists(client, "timeout:w:x:1")
    status = await client.status("w:x")
    assert (status.state, status.node, status.step) == ("scheduled", "thanks", 2)
    assert set(await queue(client)) == {"step:w:x:2:1"} and await job_exists(client, "step:w:x:2:1")
    record = await client.service.store.record("w:x")
    assert record is not None
    event = orjson.loads(record["event"])
    assert (event["name"], event["payload"]) == ("replied", {"text": "thanks!"})
    assert status.history[-1].reason == "event replied; action thanks"

    assert await client.signal("w:x", "replied") is False  # no longer waiting


async def test_any_event_of_a_list_is_delivered(client: CampaignClient) -> None:
    await client.register_campaign(WAITING)
    await client.enroll("w", "x")
    assert await client.signal("w:x", "clicked") is True
    assert (await client.status("w:x")).node == "thanks"


async def test_cancel_removes_the_pending_job_and_is_final(client: CampaignClient) -> None:
    await client.register_campaign(ONE_STEP)
    await client.enroll("c", "x")
    assert await job_exists(client, "step:c:x:1:1")
    assert await client.cancel("c:x", reason="unsubscribed") is True
    assert await queue(client) == {}
    assert not await job_exists(client, "step:c:x:1:1")
    status = await client.status("c:x")
    assert (status.state, status.run_at) == ("cancelled", None)
    assert status.history[-1].reason == "cancelled: unsubscribed"
    assert await client.service.store.count_by_state("c") == {
        "scheduled": 0,
        "running": 0,
        "waiting": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 1,
    }
    assert await client.cancel("c:x") is False
    assert len((await client.status("c:x")).history) == 2


async def test_cancel_of_a_waiting_enrollment_removes_its_timeout(client: CampaignClient) -> None:
    await client.register_campaign(WAITING)
    await client.enroll("w", "x")
    assert await client.cancel("w:x") is True
    assert await queue(client) == {}
    assert not await job_exists(client, "timeout:w:x:1")
    assert await client.signal("w:x", "replied") is False
    assert (await client.status("w:x")).state == "cancelled"


async def test_unknown_enrollment(client: CampaignClient) -> None:
    await client.register_campaign(ONE_STEP)
    for call in (
        client.status("c:ghost"),
        client.signal("c:ghost", "replied"),
        client.cancel("c:ghost"),
        client.replay("c:ghost"),
    ):
        with pytest.raises(EnrollmentNotFound, match="'c:ghost'"):
            await call
    with pytest.raises(InvalidRequest):
        await client.status("")


# --- status and replay ----------------------------------------------------------------


async def test_status_returns_the_history_in_order(client: CampaignClient) -> None:
    await client.register_campaign(WAITING)
    await client.enroll("w", "x")
    await client.signal("w:x", "replied")
    service = client.service
    batch = await claim_due(service)  # the step is due now: claimed at the current time
    assert [(c.code, c.job_id) for c in batch.claims] == [(ClaimCode.STARTED, "step:w:x:2:1")]
    target = JobTarget("w:x", "w", 1, None)
    applied = await service.advance(
        target,
        job_id="step:w:x:2:1",
        from_node="thanks",
        to_node="done",
        step=2,
        attempt=1,
        reason="logged",
    )
    assert applied.ok
    status = await client.status("w:x")
    assert status.state == "completed"
    history = status.history
    assert [(h.from_state, h.to_state, h.node, h.step) for h in history] == [
        (None, "waiting", "wait_reply", 1),
        ("waiting", "scheduled", "thanks", 2),
        ("scheduled", "running", "thanks", 2),
        ("running", "completed", "done", 3),
    ]
    assert [h.at for h in history] == sorted(h.at for h in history)
    assert history[0].reason.startswith("enrolled")


async def test_replay_of_a_failed_enrollment(client: CampaignClient) -> None:
    await client.register_campaign(ONE_STEP)
    await client.enroll("c", "x")
    service = client.service
    claim = await claim_one(service, "c:x")
    failed = await service.fail(
        JobTarget("c:x", "c", 1, None),
        job_id=claim.job_id,
        node="a",
        step=1,
        attempt=1,
        error={"type": "PermanentError", "message": "HTTP 404"},
    )
    assert failed.ok
    status = await client.status("c:x")
    assert status.state == "failed" and status.error is not None
    assert status.error.message == "HTTP 404"
    assert await queue(client) == {} and await leases(client) == {}

    before = datetime.now(UTC) - timedelta(seconds=1)
    replayed = await client.replay("c:x")
    assert (replayed.state, replayed.node, replayed.step, replayed.attempt) == (
        "scheduled",
        "a",
        2,
        1,
    )
    assert replayed.run_at is not None and replayed.run_at >= before
    assert await queue(client) == {"step:c:x:2:1": ms(replayed.run_at)}  # a new step, now
    assert not await job_exists(client, "step:c:x:1:1")
    assert (replayed.history[-1].from_state, replayed.history[-1].reason) == (
        "failed",
        "replayed; action a",
    )
    with pytest.raises(
        InvalidRequest, match="is scheduled; only failed enrollments can be replayed"
    ):
        await client.replay("c:x")


async def test_replay_of_an_enrollment_that_did_not_fail(client: CampaignClient) -> None:
    await client.register_campaign(ONE_STEP)
    await client.enroll("c", "x")
    await client.cancel("c:x")
    with pytest.raises(InvalidRequest, match="is cancelled"):
        await client.replay("c:x")
    assert (await client.status("c:x")).state == "cancelled"


# --- bulk enrollment: 10,000 contacts in a few round trips ----------------------------


async def test_round_trip_counter_counts_what_the_client_waits_for(
    redis: Any, settings: Settings, redis_server: EmbeddedRedis
) -> None:
    async with (
        RoundTrips(redis_server.port) as trips,
        CampaignClient(trips.url, settings=settings) as c,
    ):
        await c.redis.ping()
        trips.count = 0
        for _ in range(3):
            await c.redis.ping()
        assert trips.count == 3
        async with c.redis.pipeline(transaction=False) as pipe:
            for i in range(5000):
                pipe.set(f"k{i}", "v" * 200)
            await pipe.execute()
        assert trips.count == 4


async def test_enroll_many_10000_contacts_in_few_round_trips(
    redis: Any, settings: Settings, redis_server: EmbeddedRedis
) -> None:
    n, batch = 10_000, 1000
    async with (
        RoundTrips(redis_server.port) as trips,
        CampaignClient(trips.url, settings=settings) as c,
    ):
        await c.register_campaign(ONE_STEP)  # also opens the client's connection
        trips.count = 0
        before = await commandstats(redis)
        contacts = ({"contact_id": f"contact-{i}", "attributes": {"i": i}} for i in range(n))
        enrolled = await c.enroll_many("c", contacts, batch_size=batch)
        after = await commandstats(redis)
        round_trips = trips.count
    assert enrolled == n
    # the key layout of app/keys.py, one shard: queue, payloads and index set of shard 0
    assert Keys(settings.key_prefix, settings.shards).shard(0).queue == "campaign:{0}:queue"
    assert await redis.zcard("campaign:{0}:queue") == n
    assert await redis.hlen("campaign:{0}:jobs") == n
    assert await redis.scard("campaign:{0}:idx:c:scheduled") == n
    some = [f"step:c:contact-{i}:1:1" for i in (0, 4321, n - 1)]
    assert None not in await redis.hmget("campaign:{0}:jobs", some)
    # one Lua call per batch (lua/enroll.lua), not one per contact
    calls = (
        after["evalsha"] - before.get("evalsha", 0) + after.get("eval", 0) - before.get("eval", 0)
    )
    assert calls == n // batch, calls
    assert after.get("script|exists", 0) == before.get("script|exists", 0)
    # one call per batch, plus loading the enroll script once per client (redis-py's
    # EVALSHA, NOSCRIPT, EVAL) and no read of the campaign (this client registered it)
    assert n // batch <= round_trips <= n // batch + 2, round_trips


async def test_enroll_many_skips_contacts_already_enrolled(client: CampaignClient) -> None:
    await client.register_campaign(ONE_STEP)
    await client.enroll("c", "c1")
    contacts = [{"contact_id": f"c{i}"} for i in range(5)]
    assert await client.enroll_many("c", contacts, batch_size=2) == 4
    assert await client.enroll_many("c", contacts, batch_size=2) == 0
    assert len(await queue(client)) == 5
    assert len((await client.status("c:c1")).history) == 1


async def test_enroll_many_after_a_script_flush(client: CampaignClient, redis: Any) -> None:
    # a restarted Redis has no scripts cached: the client loads the script again and goes on
    await client.register_campaign(ONE_STEP)
    assert await client.enroll_many("c", [{"contact_id": "before"}]) == 1
    await redis.script_flush()
    before = await commandstats(redis)
    assert await client.enroll_many("c", [{"contact_id": f"c{i}"} for i in range(3)]) == 3
    after = await commandstats(redis)
    assert len(await queue(client)) == 4
    assert after["script|load"] - before.get("script|load", 0) == 1
    assert len((await client.status("c:c0")).history) == 1


# --- two key prefixes on one Redis ------------------------------------------------------


async def test_two_key_prefixes_on_one_redis_keep_apart(
    client: CampaignClient, settings: Settings, redis: Any
) -> None:
    other_settings = settings.model_copy(update={"key_prefix": "other"})
    async with CampaignClient(settings=other_settings) as other:
        # the same campaign id under both prefixes, with different definitions
        assert await client.register_campaign({**ONE_STEP, "id": "w"}) == 1
        assert await other.register_campaign(WAITING) == 1
        assert (await client.get_campaign("w")).entry == "a"
        assert (await other.get_campaign("w")).entry == "wait_reply"

        # the same contact id: each prefix has its own enrollment, on its own definition
        mine = await client.enroll("w", "x")
        theirs = await other.enroll("w", "x")
        assert mine.enrollment_id == theirs.enrollment_id == "w:x"
        assert (mine.state, mine.node) == ("scheduled", "a")
        assert (theirs.state, theirs.node) == ("waiting", "wait_reply")
        assert mine.run_at is not None and theirs.deadline is not None
        assert await queue(client) == {"step:w:x:1:1": ms(mine.run_at)}
        assert await queue(other) == {"timeout:w:x:1": ms(theirs.deadline)}
        assert not await job_exists(client, "timeout:w:x:1")
        assert not await job_exists(other, "step:w:x:1:1")

        # every key lives under its prefix
        all_keys = {k.decode() for k in await redis.keys("*")}
        mine_keys = {k for k in all_keys if k.startswith("campaign:")}
        their_keys = {k for k in all_keys if k.startswith("other:")}
        assert mine_keys and their_keys
        assert all_keys == mine_keys | their_keys
        assert {k.replace("campaign:", "", 1) for k in mine_keys} >= {
            "{0}:queue",
            "{0}:jobs",
            "{0}:enr:w:x",
            "{0}:idx:w:scheduled",
            "{c}:campaign:w",
            "{c}:campaigns",
        }
        assert {k.replace("other:", "", 1) for k in their_keys} >= {
            "{0}:queue",
            "{0}:jobs",
            "{0}:enr:w:x",
            "{0}:idx:w:waiting",
            "{c}:campaign:w",
            "{c}:campaigns",
        }

        # a worker of one prefix claims only that prefix's jobs
        batch = await claim_due(client.service)
        assert [c.job_id for c in batch.claims] == ["step:w:x:1:1"]
        assert (await client.status("w:x")).state == "running"
        assert (await other.status("w:x")).state == "waiting"
        assert await queue(other) == {"timeout:w:x:1": ms(theirs.deadline)}
        assert await leases(other) == {}

        # signals and cancels through one client touch only its own enrollment
        assert await other.signal("w:x", "replied") is True
        assert await client.signal("w:x", "replied") is False  # not a wait here
        assert await client.cancel("w:x") is True
        assert (await client.status("w:x")).state == "cancelled"
        theirs = await other.status("w:x")
        assert (theirs.state, theirs.node, theirs.step) == ("scheduled", "thanks", 2)
        assert set(await queue(other)) == {"step:w:x:2:1"}
        assert await queue(client) == {} and await leases(client) == {}
        assert (await client.service.store.count_by_state("w"))["cancelled"] == 1
        assert (await other.service.store.count_by_state("w"))["scheduled"] == 1
        assert (await other.service.store.count_by_state("w"))["cancelled"] == 0


async def test_enroll_past_the_calendar_horizon_is_a_named_error(client: CampaignClient) -> None:
    from datetime import UTC, datetime

    from app.errors import InvalidRequest

    await client.register_campaign({"id": "far", "entry": "d", "nodes": {
        "d": {"type": "delay", "duration": "P3650D", "next": None}}})  # fmt: skip
    with pytest.raises(InvalidRequest, match="cannot schedule"):  # past year 9999
        await client.service.enroll("far", "k", now=datetime(9995, 1, 1, tzinfo=UTC))


async def test_enroll_over_a_stateless_hash_keeps_nothing_of_it(client: CampaignClient) -> None:
    await client.register_campaign(ONE_STEP)
    key = client.service.keys.enrollment("c:x")
    await client.redis.hset(key, mapping={"error": "{}", "base_step": "7"})  # debris
    status = await client.enroll("c", "x")
    assert status.error is None and status.step == 1
    raw = await client.redis.hgetall(key)
    assert b"error" not in raw and b"base_step" not in raw
