"""Issue 10: limits on input (PRODUCT.md section 11) and named errors for bad input and
corrupt records, on the client against a real Redis.

Every limit is a setting with bounds; input past it is an ``InvalidRequest`` or
``InvalidCampaign`` naming the field and the limit. Nothing else escapes: no
``OverflowError``, ``RecursionError``, ``TypeError``, ``OSError`` or ``JSONDecodeError``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

import app.business_hours as bh_module
from app import CampaignClient, InvalidCampaign, InvalidRequest
from app.business_hours import BeyondHorizon, BusinessHours
from app.campaigns import Campaign, Limits, parse_campaign
from app.errors import CampaignError, CorruptRecord, EnrollManyError, InvalidRow
from app.models import EnrollManyResult, State
from app.registry import CampaignRegistry
from app.scheduling import SchedulingService
from app.settings import ConfigError, Settings

EXIT = {"type": "exit"}
WEEKDAYS_9_TO_5 = {
    "weekly": {d: ["09:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")},
    "holiday_country": "US",
}


def action(next_: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "action", "action": "log", "next": next_, **extra}


def campaign(nodes: dict[str, Any], entry: str = "a", **extra: Any) -> dict[str, Any]:
    return {"id": "c", "entry": entry, "nodes": nodes, **extra}


ONE_STEP = campaign({"a": action()})
WAITING = campaign(
    {"a": {"type": "wait", "event": "replied", "timeout": "P3D", "on_event": "b"}, "b": EXIT}
)


def rejection(definition: Any, limits: Limits | None = None) -> str:
    with pytest.raises(InvalidCampaign) as info:
        parse_campaign(definition, limits)
    return str(info.value)


def nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    cur = doc
    for _ in range(depth - 1):
        cur["x"] = {}
        cur = cur["x"]
    return doc


# --- the settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "value", "fragment"),
    [
        ("CAMPAIGN_MAX_ATTRIBUTES_BYTES", "1", "greater than or equal to 2"),
        ("CAMPAIGN_MAX_ATTRIBUTES_BYTES", "1e9", "valid integer"),
        ("CAMPAIGN_MAX_PAYLOAD_BYTES", "99999999999", "less than or equal to 16777216"),
        ("CAMPAIGN_MAX_DEFINITION_BYTES", "10", "greater than or equal to 1024"),
        ("CAMPAIGN_MAX_NODES", "0", "greater than or equal to 1"),
        ("CAMPAIGN_MAX_NODES", "1000000", "less than or equal to 100000"),
        ("CAMPAIGN_MAX_NAME_LENGTH", "5000", "less than or equal to 1024"),
        ("CAMPAIGN_MAX_REASON_LENGTH", "0", "greater than or equal to 16"),
        ("CAMPAIGN_MAX_DURATION", "P3651D", "from PT1M (60 seconds) to P3650D"),
        ("CAMPAIGN_MAX_DURATION", "inf", "valid timedelta"),
        ("CAMPAIGN_MAX_DURATION", "P999999999D", "from PT1M"),
        ("CAMPAIGN_MAX_DURATION", "1", "from PT1M"),
        ("CAMPAIGN_METRICS_MAX_CAMPAIGNS", "-1", "greater than or equal to 0"),
    ],
)
def test_limit_settings_are_bounded(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        Settings.load()
    assert str(info.value).startswith(f"{env}: ") and fragment in str(info.value)


def test_limit_defaults_match_product_section_11(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings.load()
    assert (s.max_attributes_bytes, s.max_payload_bytes) == (65_536, 65_536)
    assert (s.max_definition_bytes, s.max_nodes, s.max_name_length) == (1_048_576, 10_000, 128)
    assert s.max_duration == timedelta(days=3650)
    assert Limits.from_settings(s) == Limits()  # parse_campaign's defaults are the settings'
    monkeypatch.setenv("CAMPAIGN_MAX_DURATION", "P30D")
    assert Settings.load().max_duration == timedelta(days=30)


# --- limits on campaign definitions ------------------------------------------------------


def test_definition_size_node_count_and_name_lengths() -> None:
    big = campaign({"a": action(params={"blob": "x" * 1_100_000})})
    assert "1048576 (CAMPAIGN_MAX_DEFINITION_BYTES)" in rejection(big)
    many = {f"n{i}": action(f"n{i + 1}") for i in range(10_000)} | {"n10000": EXIT}
    assert "nodes: 10001 nodes, more than the limit of 10000 (CAMPAIGN_MAX_NODES)" in rejection(
        campaign(many, entry="n0")
    )
    long = "n" * 129
    message = rejection(campaign({"a": action(long), long: EXIT}))
    assert f"nodes.{long[:57]}...: node name 129 characters, more than the limit of 128" in message
    assert "CAMPAIGN_MAX_NAME_LENGTH" in message
    event = rejection(campaign({"a": {"type": "wait", "event": "e" * 129, "timeout": 1}}))
    assert "nodes.a.event: name" in event and "more than the limit of 128" in event
    assert "nodes.a.action: name" in rejection(
        campaign({"a": {"type": "action", "action": "x" * 200}})
    )
    outcome = rejection(campaign({"a": action(outcomes={"o" * 200: None})}))
    assert "nodes.a.outcomes: name" in outcome
    assert "id: 129 characters" in rejection({**ONE_STEP, "id": "c" * 129})
    # configured limits apply, and the defaults still accept exactly the limit
    assert parse_campaign({**ONE_STEP, "id": "c" * 128}).id == "c" * 128
    small = Limits(max_definition_bytes=2048, max_nodes=2, max_name_length=16)
    assert "more than the limit of 2 (CAMPAIGN_MAX_NODES)" in rejection(
        campaign({"a": action("b"), "b": action("c"), "c": EXIT}), small
    )
    assert "id: 17 characters, more than the limit of 16" in rejection(
        {**ONE_STEP, "id": "c" * 17}, small
    )


def test_a_node_named_empty_is_refused() -> None:
    assert "nodes: node name must be a non-empty string" in rejection(
        campaign({"a": action(""), "": EXIT})
    )
    assert "nodes: node name must be a non-empty string" in rejection(
        campaign({"": EXIT}, entry="")
    )


@pytest.mark.parametrize(
    ("node", "field"),
    [
        ({"type": "delay", "duration": "P999999999D", "next": None}, "nodes.a.duration"),
        ({"type": "wait", "event": "e", "timeout": "P999999999D"}, "nodes.a.timeout"),
        (action(retry={"max_delay": "P999999999D"}), "nodes.a.retry.max_delay"),
        (action(retry={"base_delay": "P3651D", "max_delay": "P3651D"}), "nodes.a.retry.base_delay"),
        (action(timeout="P999999999D"), "nodes.a.timeout"),
        ({"type": "delay", "duration": 1e9, "next": None}, "nodes.a.duration"),
    ],
)
def test_durations_past_ten_years_name_the_node_and_field(node: dict[str, Any], field: str) -> None:
    message = rejection(campaign({"a": node}))
    assert f"{field}: duration must be at most 3650d (CAMPAIGN_MAX_DURATION)" in message


def test_durations_past_what_a_timedelta_holds_name_the_field() -> None:
    for value in (1e300, "P9999999999D"):
        message = rejection(campaign({"a": {"type": "delay", "duration": value, "next": None}}))
        assert "nodes.a.duration: Input should be a valid timedelta" in message


def test_a_configured_max_duration_applies() -> None:
    limits = Limits(max_duration=timedelta(days=30))
    delay = campaign({"a": {"type": "delay", "duration": "P31D", "next": None}})
    assert "nodes.a.duration: duration must be at most 30d" in rejection(delay, limits)
    assert parse_campaign(delay).nodes["a"].duration == timedelta(days=31)  # type: ignore[union-attr]


async def test_ten_years_is_accepted_and_enrolls(client: CampaignClient) -> None:
    await client.register_campaign(
        campaign({"a": {"type": "delay", "duration": "P3650D", "next": "b"}, "b": action()})
    )
    st = await client.enroll("c", "x")
    assert st.state == State.SCHEDULED and st.run_at is not None
    assert st.run_at - datetime.now(UTC) > timedelta(days=3649)


def test_a_business_time_delay_past_ten_years_is_refused_fast() -> None:
    # 10 years of open time on a 9-to-5 schedule would end ~42 years from now
    for field, node in (
        ("duration", {"type": "delay", "duration": "P3650D", "business_time": True, "next": None}),
        ("timeout", {"type": "wait", "event": "e", "timeout": "P3000D", "business_time": True}),
    ):
        started = time.perf_counter()
        message = rejection(campaign({"a": node}, business_hours=WEEKDAYS_9_TO_5))
        assert time.perf_counter() - started < 2
        assert (
            f"nodes.a.{field}: " in message
            and "of business time does not end within 3650d" in message
        )
    ok = {"type": "delay", "duration": "P365D", "business_time": True, "next": None}
    assert parse_campaign(campaign({"a": ok}, business_hours=WEEKDAYS_9_TO_5))


def test_business_hours_add_never_computes_past_its_horizon() -> None:
    # one hour a week: a year of open time would end ~170 years from now
    sparse = BusinessHours.model_validate({"weekly": {"mon": ["09:00-10:00"]}})
    now = datetime.now(UTC)
    started = time.perf_counter()
    with pytest.raises(BeyondHorizon, match="does not end within"):
        sparse.add(now, timedelta(days=365))
    with pytest.raises(BeyondHorizon):
        sparse.add(now, timedelta(days=999_999_999))
    assert time.perf_counter() - started < 1.0
    assert sparse.add(now, timedelta(hours=3)) - now < timedelta(days=29)


# --- untyped errors that are now named ---------------------------------------------------


def test_a_chain_of_a_thousand_action_nodes_is_validated() -> None:
    nodes = {f"n{i}": action(f"n{i + 1}") for i in range(999)} | {"n999": action()}
    assert len(parse_campaign(campaign(nodes, entry="n0")).nodes) == 1000
    nodes["n999"] = action("n0")  # ... and closing it into a loop is a spinning cycle
    message = rejection(campaign(nodes, entry="n0"))
    assert "cycle n0 -> n1" in message and "(990 more) -> n0 passes through no delay" in message
    many = {f"n{i}": action(f"n{i + 1}") for i in range(9_999)} | {"n9999": EXIT}
    started = time.perf_counter()
    assert len(parse_campaign(campaign(many, entry="n0")).nodes) == 10_000
    assert time.perf_counter() - started < 5


def test_params_nested_too_deep_huge_integers_and_nan_name_the_field() -> None:
    assert "nodes.a.params.x.x" in rejection(campaign({"a": action(params=nested(256))}))
    assert "nested deeper than 64 levels" in rejection(campaign({"a": action(params=nested(256))}))
    assert "nodes.a.params.n: integer with 22 digits is outside the 64-bit range" in rejection(
        campaign({"a": action(params={"n": 2**70})})
    )
    assert "nodes.a.params.f: nan is not a JSON number" in rejection(
        campaign({"a": action(params={"f": float("nan")})})
    )
    assert "nodes.a.params: key 1 is not a string" in rejection(
        campaign({"a": action(params={1: "x"})})
    )
    assert parse_campaign(campaign({"a": action(params={"n": 2**64 - 1, "m": -(2**63)})}))


def test_a_ten_thousand_character_time_zone() -> None:
    assert "timezone: unknown time zone (10000 characters" in rejection(
        {**ONE_STEP, "timezone": "x" * 10_000}
    )


def test_a_campaign_instance_is_validated_again() -> None:
    forged = Campaign.model_construct(
        id="a:b", entry="a", nodes={"a": parse_campaign(ONE_STEP).nodes["a"]},
        timezone="UTC", business_hours=None, reentry=False, version=None,
    )  # fmt: skip
    assert "id: String should match pattern" in rejection(forged)
    assert parse_campaign(parse_campaign(ONE_STEP)).id == "c"


async def test_register_campaign_refuses_a_forged_instance(
    client: CampaignClient, redis: Any
) -> None:
    forged = Campaign.model_construct(
        id="a:b", entry="a", nodes={"a": parse_campaign(ONE_STEP).nodes["a"]},
        timezone="UTC", business_hours=None, reentry=False, version=None,
    )  # fmt: skip
    with pytest.raises(InvalidCampaign, match="id: String should match pattern"):
        await client.register_campaign(forged)
    # nothing of the refused campaign (the client's first call pins the shard count)
    assert await redis.keys("*") == [b"campaign:shards"]
    assert await client.register_campaign(parse_campaign(ONE_STEP)) == 1


async def test_the_client_uses_the_configured_limits(settings: Settings, redis: Any) -> None:
    tight = settings.model_copy(
        update={"max_nodes": 2, "max_attributes_bytes": 64, "max_payload_bytes": 32,
                "max_reason_length": 16, "max_duration": timedelta(days=5)}
    )  # fmt: skip
    async with CampaignClient(settings=tight) as client:
        with pytest.raises(InvalidCampaign, match=r"more than the limit of 2 \(CAMPAIGN_MAX_NODES"):
            await client.register_campaign(
                campaign({"a": action("b"), "b": action("c"), "c": EXIT})
            )
        with pytest.raises(InvalidCampaign, match="duration must be at most 5d"):
            await client.register_campaign(
                campaign({"a": {"type": "delay", "duration": "P6D", "next": None}})
            )
        await client.register_campaign(WAITING)
        with pytest.raises(InvalidRequest, match=r"attributes: \d+ bytes of JSON, more than the limit of 64 \(CAMPAIGN_MAX_ATTRIBUTES_BYTES\)"):  # fmt: skip
            await client.enroll("c", "x", {"k": "v" * 100})
        st = await client.enroll("c", "x", {"k": "v"})
        with pytest.raises(InvalidRequest, match=r"payload: \d+ bytes of JSON, more than the limit of 32 \(CAMPAIGN_MAX_PAYLOAD_BYTES\)"):  # fmt: skip
            await client.signal(st.enrollment_id, "replied", {"k": "v" * 100})
        with pytest.raises(InvalidRequest, match=r"at most 16 characters \(CAMPAIGN_MAX_REASON_LENGTH\)"):  # fmt: skip
            await client.cancel(st.enrollment_id, "r" * 17)
        assert await client.cancel(st.enrollment_id, "r" * 16)


async def test_attributes_payload_and_reason_limits_by_default(client: CampaignClient) -> None:
    await client.register_campaign(WAITING)
    with pytest.raises(InvalidRequest, match=r"^attributes: \d+ bytes of JSON, more than the limit of 65536 \(CAMPAIGN_MAX_ATTRIBUTES_BYTES\)"):  # fmt: skip
        await client.enroll("c", "x", {"big": "x" * 10_000_000})
    with pytest.raises(InvalidRow, match=r"^contacts\[1\]: attributes: \d+ bytes of JSON"):
        await client.enroll_many("c", [{"contact_id": "y"}, {"contact_id": "z", "attributes": {"b": "x" * 70_000}}])  # fmt: skip
    st = await client.enroll("c", "x", {"ok": "x" * 60_000})
    with pytest.raises(InvalidRequest, match=r"^payload: \d+ bytes of JSON, more than the limit of 65536"):  # fmt: skip
        await client.signal(st.enrollment_id, "replied", {"big": "x" * 70_000})
    with pytest.raises(InvalidRequest, match="at most 1000 characters"):
        await client.cancel(st.enrollment_id, "r" * 1_000_000)
    with pytest.raises(InvalidRequest, match="event must be a non-empty string of at most 128"):
        await client.signal(st.enrollment_id, "e" * 1_000_000)
    assert (await client.status(st.enrollment_id)).state == State.WAITING


async def test_bad_json_in_attributes_and_payloads_is_named(client: CampaignClient) -> None:
    await client.register_campaign(WAITING)
    for attributes, fragment in (
        (nested(256), "attributes.x.x"),
        ({"n": 2**70}, "attributes.n: integer with 22 digits"),
        ({"f": float("inf")}, "attributes.f: inf is not a JSON number"),
        ({1: "x"}, "attributes: key 1 is not a string"),
        ({"s": "\ud800"}, "attributes.s: is not valid Unicode"),
    ):
        with pytest.raises(
            InvalidRequest, match=r"^attributes must be JSON-serializable: "
        ) as info:
            await client.enroll("c", "x", attributes)
        assert fragment in str(info.value)
    st = await client.enroll("c", "x")
    for payload, fragment in (
        (nested(256), "payload.x.x"),
        ({"n": -(2**65)}, "payload.n: integer with 20 digits"),
        ({"f": float("nan")}, "payload.f: nan is not a JSON number"),
    ):
        with pytest.raises(InvalidRequest, match=r"^payload must be JSON-serializable: ") as info:
            await client.signal(st.enrollment_id, "replied", payload)
        assert fragment in str(info.value)
    for payload in (["a", "list"], "text", 42):
        with pytest.raises(InvalidRequest, match=r"^payload must be a dict"):
            await client.signal(st.enrollment_id, "replied", payload)  # type: ignore[arg-type]
    assert await client.signal(st.enrollment_id, "replied", {"n": 2**64 - 1})
    event = orjson.loads(
        await client.redis.hget(client.service.keys.enrollment(st.enrollment_id), "event")
    )
    assert event["payload"] == {"n": 2**64 - 1} and event["name"] == "replied"


async def test_a_ten_thousand_character_time_zone_on_enroll(client: CampaignClient) -> None:
    await client.register_campaign(ONE_STEP)
    with pytest.raises(InvalidRequest, match=r"^timezone: unknown time zone \(10000 characters"):
        await client.enroll("c", "x", timezone="x" * 10_000)
    with pytest.raises(InvalidRow, match=r"^contacts\[0\]: timezone: unknown time zone"):
        await client.enroll_many("c", [{"contact_id": "x", "timezone": "x" * 10_000}])
    with pytest.raises(InvalidRequest, match=r"^timezone: must be a non-empty string"):
        await client.enroll("c", "x", timezone=42)  # type: ignore[arg-type]


# --- corrupt records -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "commands_that_read_it"),
    [
        ("step", "not-a-number", {"status", "signal", "replay", "cancel"}),
        ("state", "bogus", {"status", "signal", "replay", "cancel"}),
        ("version", "v2", {"status", "signal", "replay", "cancel"}),
        ("campaign", "", {"status", "signal", "replay", "cancel"}),
        ("timezone", "x" * 10_000, {"signal", "replay", "cancel"}),
        ("attributes", "{not json", {"status"}),
        ("attributes", "[1, 2]", {"status"}),
        ("error", "{not json", {"status"}),
        ("run_at", "soon", {"status"}),
        ("updated_at", "9" * 30, {"status"}),
    ],
)
async def test_a_corrupt_field_is_a_named_error_for_that_enrollment(
    client: CampaignClient, redis: Any, field: str, value: str, commands_that_read_it: set[str]
) -> None:
    await client.register_campaign(WAITING)
    bad = await client.enroll("c", "bad")
    good = await client.enroll("c", "good")
    await redis.hset(client.service.keys.enrollment(bad.enrollment_id), field, value)
    eid = bad.enrollment_id
    commands = {  # cancel last: it rewrites the record
        "status": lambda: client.status(eid),
        "signal": lambda: client.signal(eid, "replied"),
        "replay": lambda: client.replay(eid),
        "cancel": lambda: client.cancel(eid),
    }
    for name, call in commands.items():
        if name in commands_that_read_it:
            with pytest.raises(CorruptRecord) as info:
                await call()
            assert str(info.value).startswith(f"enrollment 'c:bad': stored field '{field}'")
        elif name == "replay":
            with pytest.raises(InvalidRequest, match="only failed enrollments can be replayed"):
                await call()
        else:
            await call()
    # the other enrollment is untouched
    assert (await client.status(good.enrollment_id)).state == State.WAITING
    assert await client.signal(good.enrollment_id, "replied")


async def test_a_corrupt_history_entry_is_a_named_error(client: CampaignClient, redis: Any) -> None:
    await client.register_campaign(WAITING)
    st = await client.enroll("c", "x")
    await redis.rpush(client.service.keys.history(st.enrollment_id), b"not json")
    with pytest.raises(CorruptRecord, match="enrollment 'c:x': stored field 'history'"):
        await client.status(st.enrollment_id)
    await redis.rpush(client.service.keys.history(st.enrollment_id), b"[1, 2]")
    with pytest.raises(CorruptRecord, match="stored field 'history'"):
        await client.status(st.enrollment_id)
    assert await client.cancel(st.enrollment_id)  # cancel does not read the history


async def test_a_corrupt_stored_campaign_version(client: CampaignClient, redis: Any) -> None:
    await client.register_campaign(WAITING)
    st = await client.enroll("c", "x")
    await redis.hset(client.service.keys.campaign("c"), "v:1", b"{broken")
    fresh = CampaignClient(settings=client.settings)
    try:
        with pytest.raises(CorruptRecord, match="campaign 'c' version 1: the stored definition"):
            await fresh.get_campaign("c")
        with pytest.raises(CorruptRecord, match="campaign 'c' version 1"):
            await fresh.cancel(st.enrollment_id)
        await redis.hset(client.service.keys.campaign("c"), "latest", b"one")
        with pytest.raises(CorruptRecord, match="stored field 'latest'"):
            await fresh.get_campaign("c")
    finally:
        await fresh.close()


# --- item 9: a stored version loads as it was accepted -------------------------------------


async def test_a_stored_version_loads_as_accepted(
    client: CampaignClient, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hours = {**WEEKDAYS_9_TO_5, "holiday_subdivision": "CA"}
    definition = {**WAITING, "business_hours": hours}
    await client.register_campaign(definition)
    a = await client.enroll("c", "a")
    b = await client.enroll("c", "b")

    # An upgrade of the holidays data drops the subdivision: validating today would fail...
    real = bh_module._public_holidays

    def without_ca(country: str, subdiv: str | None, year: int) -> frozenset[Any]:
        if subdiv == "CA":
            raise NotImplementedError("no subdivision CA")
        return real(country, subdiv, year)

    monkeypatch.setattr(bh_module, "_public_holidays", without_ca)
    with pytest.raises(InvalidCampaign, match="unknown subdivision 'CA'"):
        parse_campaign(definition)

    # ... but the stored version loads, in a process that never saw it (no cache)
    async with CampaignClient(settings=client.settings) as fresh:
        loaded = await fresh.get_campaign("c", 1)
        assert loaded.business_hours is not None
        assert loaded.business_hours["holiday_subdivision"] == "CA"
        assert loaded.calendar is not None  # usable: the country's holidays stand in
        assert loaded.calendar_for("Europe/Berlin") is not None
        assert await fresh.cancel(a.enrollment_id)
        assert (await fresh.status(a.enrollment_id)).state == State.CANCELLED
        assert await fresh.signal(b.enrollment_id, "replied")  # plans on the calendar


async def test_a_stored_version_does_not_depend_on_todays_date(
    client: CampaignClient, redis: Any
) -> None:
    # Accepted a year ago, when the holidays it lists were still in the future: today it
    # would be "closed for a year" and refused. It still loads, and can be cancelled.
    today = datetime.now(UTC).date()
    closed = [(today + timedelta(days=i)).isoformat() for i in range(-5, 400)]
    hours = {"weekly": {"mon": ["09:00-17:00"]}, "holidays": closed}
    definition = {**WAITING, "business_hours": hours}
    assert "no open time in the 366 days" in rejection(definition)
    await client.register_campaign(WAITING)
    st = await client.enroll("c", "x")
    await client.redis.hset(client.service.keys.campaign("c"), "v:1", orjson.dumps(definition))
    registry = CampaignRegistry(client.redis, client.service.keys)
    assert (await registry.get("c", 1)).business_hours == hours
    service = SchedulingService(client.redis, client.settings)
    assert await service.cancel(st.enrollment_id)


# --- enroll_many says how far it got ---------------------------------------------------


async def test_enroll_many_stopped_by_the_iterable_says_how_far(client: CampaignClient) -> None:
    await client.register_campaign(ONE_STEP)

    def rows() -> Iterator[dict[str, Any]]:
        for i in range(2100):
            yield {"contact_id": f"c{i}"}
        raise OSError("disk went away")

    with pytest.raises(EnrollManyError) as info:
        await client.enroll_many("c", rows(), batch_size=1000)
    err = info.value
    assert (err.enrolled, err.row, err.processed) == (2000, 2100, 2000)
    assert isinstance(err.__cause__, OSError)
    assert str(err) == (
        "contacts[2100]: reading the contacts failed: OSError: disk went away; enroll_many "
        "stopped at row 2100: 2000 enrolled from rows 0-1999, nothing written from row 2000 on"
    )
    assert await client.redis.scard("campaign:{0}:idx:c:scheduled") == 2000
    # running the same rows again is safe: the first 2,000 are skipped
    again = await client.enroll_many("c", ({"contact_id": f"c{i}"} for i in range(2100)))
    assert (again, again.already_enrolled) == (100, 2000)


async def test_enroll_many_stopped_by_a_bad_row_says_how_far(client: CampaignClient) -> None:
    await client.register_campaign(ONE_STEP)
    rows: list[Any] = [{"contact_id": f"c{i}"} for i in range(1500)]
    rows[1200] = {"contact_id": "has space"}
    with pytest.raises(InvalidRequest) as info:  # an InvalidRow is an InvalidRequest
        await client.enroll_many("c", rows, batch_size=1000)
    err = info.value
    assert isinstance(err, InvalidRow)
    assert (err.enrolled, err.row, err.processed) == (1000, 1200, 1000)
    assert str(err).startswith("contacts[1200]: contact_id 'has space' contains whitespace")
    assert "stopped at row 1200: 1000 enrolled from rows 0-999, nothing written from row 1000 on" in str(err)  # fmt: skip
    assert err.reason == "contact_id 'has space' contains whitespace or control characters"


async def test_enroll_many_stopped_by_redis_says_how_far(
    client: CampaignClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await client.register_campaign(ONE_STEP)
    real = client.service.store.create_many
    calls = 0

    async def flaky(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RedisConnectionError("Connection reset by peer")
        return await real(*args)

    monkeypatch.setattr(client.service.store, "create_many", flaky)
    with pytest.raises(EnrollManyError) as info:
        await client.enroll_many("c", ({"contact_id": f"c{i}"} for i in range(2500)), batch_size=1000)  # fmt: skip
    err = info.value
    assert not isinstance(err, InvalidRequest)
    assert (err.enrolled, err.row, err.processed) == (1000, 1000, 1000)
    assert isinstance(err.__cause__, RedisConnectionError)
    assert "writing rows 1000-1999 failed: ConnectionError: Connection reset by peer" in str(err)
    assert "1000 enrolled from rows 0-999" in str(err)


async def test_enroll_many_reports_a_contact_whose_job_id_is_taken(
    client: CampaignClient, redis: Any
) -> None:
    await client.register_campaign(ONE_STEP)
    await client.enroll("c", "old")
    shard = client.service.keys.for_enrollment("c:x")
    # a leftover payload under the id x's first step would get
    await redis.hset(shard.jobs, "step:c:x:1:1", b'{"f": "run_step"}')
    result = await client.enroll_many("c", [{"contact_id": i} for i in ("a", "x", "old", "b")])
    assert isinstance(result, EnrollManyResult) and isinstance(result, int)
    assert result == 2 and result.enrolled == 2
    assert (result.already_enrolled, result.conflict_count, result.skipped) == (1, 1, 2)
    assert result.conflicts == (
        (1, "x", "job 'step:c:x:1:1' is still queued from an earlier enrollment with the same id"),
    )


def test_enroll_many_errors_are_campaign_errors() -> None:
    assert issubclass(InvalidRow, InvalidRequest) and issubclass(InvalidRow, EnrollManyError)
    assert issubclass(EnrollManyError, CampaignError) and issubclass(CorruptRecord, CampaignError)
    assert re.escape("x") == "x"
