"""Campaign definitions (PRODUCT.md section 2): validation rules and the versioned registry.

Validation is pure (no Redis); the registry tests run on the session's private Redis.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from app.campaigns import ActionNode, DelayNode, WaitNode, parse_campaign
from app.errors import CampaignNotFound, InvalidCampaign
from app.jobs import JobTarget, timeout_job_id
from app.keys import Keys
from app.registry import CampaignRegistry
from app.scheduling import SchedulingService
from app.settings import Settings
from tests.queue_view import claim_one, payload
from worker.step_queue import ClaimCode

EXAMPLE: dict[str, Any] = {  # the example of PRODUCT.md section 2
    "id": "onboarding",
    "timezone": "America/New_York",
    "business_hours": {
        "weekly": {
            "mon": ["09:00-12:00", "13:00-17:00"],
            "tue": ["09:00-17:00"],
            "wed": ["09:00-17:00"],
            "thu": ["09:00-17:00"],
            "fri": ["09:00-16:00"],
        },
        "holidays": ["2026-12-25"],
        "holiday_country": "US",
        "spread": "PT15M",
    },
    "entry": "welcome",
    "nodes": {
        "welcome": {
            "type": "action",
            "action": "http",
            "params": {"url": "https://crm.example/send"},
            "next": "wait_reply",
            "retry": {
                "max_attempts": 5,
                "backoff": "exponential",
                "base_delay": "PT10S",
                "max_delay": "PT1H",
                "jitter": True,
            },
        },
        "wait_reply": {
            "type": "wait",
            "event": "replied",
            "timeout": "P3D",
            "on_event": "thanks",
            "on_timeout": "nudge_delay",
        },
        "nudge_delay": {"type": "delay", "duration": "P2D", "business_time": True, "next": "nudge"},
        "nudge": {
            "type": "action",
            "action": "http",
            "params": {"url": "https://crm.example/send"},
            "outcomes": {"bounced": "done"},
            "next": "done",
        },
        "thanks": {"type": "action", "action": "log", "next": "done"},
        "done": {"type": "exit"},
    },
}


def campaign(nodes: dict[str, Any], entry: str = "a", **extra: Any) -> dict[str, Any]:
    return {"id": "c", "entry": entry, "nodes": nodes, **extra}


def action(next_: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "action", "action": "log", "next": next_, **extra}


def rejection(definition: dict[str, Any]) -> str:
    with pytest.raises(InvalidCampaign) as info:
        parse_campaign(definition)
    return str(info.value)


# --- validation: accepted --------------------------------------------------------------


def test_the_product_example_is_valid() -> None:
    c = parse_campaign(EXAMPLE)
    assert c.entry == "welcome"
    assert isinstance(c.nodes["welcome"], ActionNode)
    assert c.nodes["welcome"].retry.base_delay == timedelta(seconds=10)
    assert isinstance(c.nodes["wait_reply"], WaitNode)
    assert c.nodes["wait_reply"].timeout == timedelta(days=3)
    assert isinstance(c.nodes["nudge_delay"], DelayNode)
    assert c.nodes["nudge_delay"].business_time is True
    assert c.calendar is not None and c.calendar.timezone == "America/New_York"
    assert c.version is None  # only the registry gives versions


def test_durations_in_seconds_are_accepted() -> None:
    c = parse_campaign(campaign({"a": {"type": "delay", "duration": 90, "next": None}}))
    node = c.nodes["a"]
    assert isinstance(node, DelayNode) and node.duration == timedelta(seconds=90)


def test_a_cycle_through_a_wait_is_accepted() -> None:
    c = parse_campaign(
        campaign(
            {
                "a": action("b"),
                "b": action("w"),
                "w": {
                    "type": "wait",
                    "event": "x",
                    "timeout": "P1D",
                    "on_event": "a",
                    "on_timeout": "a",
                },
            }
        )
    )
    assert set(c.nodes) == {"a", "b", "w"}


def test_a_cycle_through_a_delay_is_accepted() -> None:
    c = parse_campaign(
        campaign({"a": action("d"), "d": {"type": "delay", "duration": "P1D", "next": "a"}})
    )
    assert set(c.nodes) == {"a", "d"}


# --- validation: every rejection names the node and the field --------------------------


def test_unknown_node_type() -> None:
    msg = rejection(campaign({"a": {"type": "email", "next": None}}))
    assert "nodes.a:" in msg
    assert "'email'" in msg and "'type'" in msg


def test_reference_to_a_missing_node() -> None:
    msg = rejection(
        {
            "id": "c",
            "entry": "wait_reply",
            "nodes": {
                "wait_reply": {
                    "type": "wait",
                    "event": "replied",
                    "timeout": "P3D",
                    "on_event": "done",
                    "on_timeout": "nudge",
                },
                "done": {"type": "exit"},
            },
        }
    )
    assert "nodes.wait_reply.on_timeout: no node named 'nudge'" in msg


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (action("gone"), "nodes.a.next: no node named 'gone'"),
        (
            action(None, outcomes={"bounced": "gone"}),
            "nodes.a.outcomes.bounced: no node named 'gone'",
        ),
        ({"type": "delay", "duration": 1, "next": "gone"}, "nodes.a.next: no node named 'gone'"),
        (
            {"type": "wait", "event": "e", "timeout": 1, "on_event": "gone"},
            "nodes.a.on_event: no node named 'gone'",
        ),
    ],
)
def test_every_reference_field_is_checked(node: dict[str, Any], expected: str) -> None:
    assert expected in rejection(campaign({"a": node}))


def test_every_missing_reference_is_listed() -> None:
    msg = rejection(campaign({"a": action("x", outcomes={"o": "y"})}))
    assert "nodes.a.next: no node named 'x'" in msg
    assert "nodes.a.outcomes.o: no node named 'y'" in msg


def test_entry_that_does_not_exist() -> None:
    msg = rejection(campaign({"a": {"type": "exit"}}, entry="start"))
    assert "entry: no node named 'start'" in msg


def test_unreachable_node() -> None:
    msg = rejection(campaign({"a": action(None), "orphan": {"type": "exit"}}))
    assert "nodes.orphan: unreachable from entry 'a'" in msg
    assert "nodes.a:" not in msg


def test_cycle_through_no_delay_or_wait() -> None:
    msg = rejection(campaign({"a": action("b"), "b": action("c"), "c": action("a")}))
    assert "nodes.a: cycle a -> b -> c -> a passes through no delay or wait node" in msg


@pytest.mark.parametrize(
    "nodes",
    [
        {"a": action("a")},
        {"a": action(None, outcomes={"again": "a"})},
        {"a": action("b"), "b": action(None, outcomes={"retry": "a"})},
    ],
    ids=["self-loop", "outcome-self-loop", "loop-through-outcome"],
)
def test_action_only_cycles_are_rejected_whatever_the_field(nodes: dict[str, Any]) -> None:
    msg = rejection(campaign(nodes))
    assert "nodes.a: cycle a -> " in msg and "passes through no delay or wait" in msg


def test_bad_time_zone() -> None:
    msg = rejection(campaign({"a": {"type": "exit"}}, timezone="Mars/Olympus_Mons"))
    assert "timezone: unknown time zone 'Mars/Olympus_Mons'" in msg


def test_business_hours_with_no_windows_never_open() -> None:
    msg = rejection(campaign({"a": {"type": "exit"}}, business_hours={"weekly": {}}))
    assert "business_hours" in msg and "no open time in the 366 days" in msg


def test_business_hours_closed_by_holidays_for_a_year() -> None:
    # Only Mondays are open, and every Monday from last week to well past a year is a holiday.
    today = datetime.now(UTC).date()
    first = today - timedelta(days=today.weekday() + 7)
    mondays = [(first + timedelta(weeks=k)).isoformat() for k in range(60)]
    hours = {"weekly": {"mon": ["09:00-17:00"]}, "holidays": mondays}
    msg = rejection(campaign({"a": {"type": "exit"}}, business_hours=hours))
    assert "business_hours" in msg and "no open time in the 366 days" in msg
    # one Monday less a year out and it is open again: the rule is the horizon, not the list
    open_again = {"weekly": {"mon": ["09:00-17:00"]}, "holidays": mondays[:40]}
    assert parse_campaign(campaign({"a": {"type": "exit"}}, business_hours=open_again))


@pytest.mark.parametrize(
    ("node", "field"),
    [
        ({"type": "delay", "duration": -5, "next": None}, "nodes.a.duration"),
        ({"type": "delay", "duration": "-PT5S", "next": None}, "nodes.a.duration"),
        ({"type": "wait", "event": "e", "timeout": "-P1D"}, "nodes.a.timeout"),
        (action(None, timeout="-PT1M"), "nodes.a.timeout"),
        (action(None, retry={"base_delay": -1}), "nodes.a.retry.base_delay"),
    ],
)
def test_negative_duration(node: dict[str, Any], field: str) -> None:
    msg = rejection(campaign({"a": node}))
    assert f"{field}: duration must not be negative" in msg


def test_negative_spread() -> None:
    hours = {"weekly": {"mon": ["09:00-17:00"]}, "spread": -60}
    msg = rejection(campaign({"a": {"type": "exit"}}, business_hours=hours))
    assert "business_hours.spread" in msg and "negative" in msg


def test_message_starts_with_what_failed() -> None:
    assert rejection(campaign({"a": {"type": "exit"}}, entry="b")).startswith("invalid campaign: ")


# --- the registry ---------------------------------------------------------------------


@pytest.fixture
def service(redis: Any, settings: Settings) -> SchedulingService:
    return SchedulingService(redis, settings)


async def test_register_and_get_round_trip(service: SchedulingService, redis: Any) -> None:
    stored = await service.registry.register(EXAMPLE)
    assert stored.version == 1
    expected = parse_campaign(EXAMPLE).definition()
    assert stored.definition() == expected
    # a registry with no cache reads the same definition back from Redis
    fresh = CampaignRegistry(redis, Keys(service.settings.key_prefix))
    latest = await fresh.get("onboarding")
    assert latest.version == 1
    assert latest.definition() == expected
    assert (await fresh.get("onboarding", 1)).definition() == expected
    assert await fresh.ids() == ["onboarding"]
    # what is stored is plain JSON of the definition, without the version
    raw = await redis.hget(service.keys.campaign("onboarding"), "v:1")
    assert orjson.loads(raw) == expected and "version" not in orjson.loads(raw)


async def test_registering_again_makes_a_new_version(service: SchedulingService) -> None:
    assert (await service.registry.register(EXAMPLE)).version == 1
    changed = {**EXAMPLE, "timezone": "Europe/Berlin"}
    assert (await service.registry.register(changed)).version == 2
    v1 = await service.registry.get("onboarding", 1)
    v2 = await service.registry.get("onboarding")
    assert (v1.version, v1.timezone) == (1, "America/New_York")
    assert (v2.version, v2.timezone) == (2, "Europe/Berlin")


async def test_an_invalid_definition_stores_nothing(service: SchedulingService, redis: Any) -> None:
    await service.registry.register(EXAMPLE)
    broken = {**EXAMPLE, "entry": "nowhere"}
    with pytest.raises(InvalidCampaign, match="entry: no node named 'nowhere'"):
        await service.registry.register(broken)
    assert await redis.hget(service.keys.campaign("onboarding"), "latest") == b"1"
    assert (await service.registry.get("onboarding")).version == 1


async def test_unknown_campaign_and_version(service: SchedulingService) -> None:
    with pytest.raises(CampaignNotFound, match="'nope'"):
        await service.registry.get("nope")
    await service.registry.register(EXAMPLE)
    with pytest.raises(CampaignNotFound, match="no version 7"):
        await service.registry.get("onboarding", 7)


async def test_an_enrollment_stays_on_the_version_it_started_with(
    service: SchedulingService, redis: Any, settings: Settings
) -> None:
    # v1: a -> w (a wait); v2: the same ids, but w is an exit. The v1 enrollment keeps v1.
    v1 = campaign(
        {
            "a": action("w"),
            "w": {"type": "wait", "event": "replied", "timeout": "P1D", "on_event": "done"},
            "done": {"type": "exit"},
        }
    )
    v2 = campaign({"a": action("w"), "w": {"type": "exit"}})
    assert (await service.registry.register(v1)).version == 1
    first = await service.enroll("c", "old")
    assert first.campaign_version == 1
    assert (await service.registry.register(v2)).version == 2

    # A new service (empty cache) moves the v1 enrollment on: it reads version 1 from Redis.
    other = SchedulingService(redis, settings)
    old = await other.status("c:old")
    assert old.campaign_version == 1
    job = await payload(redis, other.keys, f"step:c:old:{old.step}:1")
    assert job is not None and job["k"]["version"] == 1
    target = _target(old.enrollment_id, job["k"])
    claim = await claim_one(other, old.enrollment_id)
    assert claim.code == ClaimCode.STARTED
    assert claim.payload.target == target  # what the worker parses from the job
    applied = await other.advance(
        target,
        job_id=claim.job_id,
        from_node="a",
        to_node="w",
        step=old.step,
        attempt=1,
        reason="ok",
    )
    assert applied.ok and applied.state == "waiting"  # v2 would have completed here
    moved = await other.status("c:old")
    assert (moved.state, moved.node, moved.campaign_version) == ("waiting", "w", 1)
    timeout_job = await payload(redis, other.keys, timeout_job_id("c:old", moved.step))
    assert timeout_job is not None and timeout_job["k"]["version"] == 1

    # a new enrollment starts on v2
    new = await other.enroll("c", "new")
    assert new.campaign_version == 2
    new_job = await payload(redis, other.keys, f"step:c:new:{new.step}:1")
    assert new_job is not None and new_job["k"]["version"] == 2


def _target(enrollment_id: str, kwargs: dict[str, Any]) -> JobTarget:
    """The target a step job's kwargs describe (what the worker builds from a job)."""
    return JobTarget(
        enrollment_id, enrollment_id.partition(":")[0], kwargs["version"], kwargs.get("tz")
    )
