"""Placing an enrollment part-way through a campaign (moving contacts off the cron system):
``enroll(..., node=, run_at=)`` and ``enroll_many`` rows with ``node``/``run_at``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.client import CampaignClient
from app.errors import InvalidRequest, InvalidRow
from app.models import State
from tests.queue_view import queued

NOW = datetime(2026, 12, 2, 15, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=5)

CAMPAIGN: dict[str, Any] = {
    "id": "c",
    "entry": "welcome",
    "nodes": {
        "welcome": {"type": "action", "action": "log", "next": "pause"},
        "pause": {"type": "delay", "duration": "P1D", "next": "nudge"},
        "nudge": {"type": "action", "action": "log", "next": "reply"},
        "reply": {
            "type": "wait",
            "event": "replied",
            "timeout": "P3D",
            "on_event": "done",
            "on_timeout": "done",
        },
        "done": {"type": "exit"},
    },
}


@pytest.fixture
async def campaign(client: CampaignClient) -> CampaignClient:
    await client.register_campaign(CAMPAIGN)
    return client


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


async def test_an_action_node_is_scheduled_at_run_at(campaign: CampaignClient) -> None:
    status = await campaign.service.enroll("c", "a", node="nudge", run_at=LATER, now=NOW)
    assert (status.state, status.node, status.run_at) == (State.SCHEDULED, "nudge", LATER)
    assert await queued(campaign.redis, campaign.service.keys) == {"step:c:a:1:1": ms(LATER)}


async def test_a_wait_node_waits_with_run_at_as_its_deadline(campaign: CampaignClient) -> None:
    status = await campaign.service.enroll("c", "a", node="reply", run_at=LATER, now=NOW)
    assert (status.state, status.node, status.deadline) == (State.WAITING, "reply", LATER)
    assert await queued(campaign.redis, campaign.service.keys) == {"timeout:c:a:1": ms(LATER)}
    assert await campaign.signal("c:a", "replied")
    assert (await campaign.status("c:a")).state == State.COMPLETED


async def test_a_delay_node_ends_at_run_at_and_the_next_node_is_due_then(
    campaign: CampaignClient,
) -> None:
    status = await campaign.service.enroll("c", "a", node="pause", run_at=LATER, now=NOW)
    assert (status.state, status.node, status.run_at) == (State.SCHEDULED, "nudge", LATER)
    assert status.step == 2


async def test_an_iso_string_with_an_offset_is_the_same_instant(campaign: CampaignClient) -> None:
    when = "2026-12-02T21:00:00+01:00"  # 20:00 UTC = LATER
    status = await campaign.service.enroll("c", "a", node="nudge", run_at=when, now=NOW)
    assert status.run_at == LATER


async def test_a_past_run_at_is_due_at_once(campaign: CampaignClient) -> None:
    status = await campaign.service.enroll(
        "c", "a", node="nudge", run_at=NOW - timedelta(days=2), now=NOW
    )
    assert status.run_at == NOW


async def test_node_without_run_at_enters_that_node_now(campaign: CampaignClient) -> None:
    status = await campaign.service.enroll("c", "a", node="reply", now=NOW)
    assert (status.state, status.deadline) == (State.WAITING, NOW + timedelta(days=3))


@pytest.mark.parametrize(
    ("node", "run_at", "message"),
    [
        ("nope", None, "node 'nope' is not in campaign 'c' version 1"),
        ("", None, "node must be a non-empty string"),
        ("nudge", "tomorrow", "run_at 'tomorrow' is not an ISO 8601 date and time"),
        ("nudge", "2026-12-02T09:00:00", "has no UTC offset"),
        ("nudge", 1764680400, "run_at must be an ISO 8601 string or a datetime, not int"),
        ("nudge", "2046-12-02T09:00:00Z", "further ahead than CAMPAIGN_MAX_DURATION"),
    ],
)
async def test_bad_placement_is_refused_by_name(
    campaign: CampaignClient, node: str, run_at: Any, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
        await campaign.enroll("c", "a", node=node, run_at=run_at)
    assert await campaign.redis.exists(campaign.service.keys.enrollment("c:a")) == 0


async def test_enroll_many_places_each_row_and_groups_alike_rows(
    campaign: CampaignClient,
) -> None:
    rows: list[dict[str, Any]] = [
        {"contact_id": "p0"},
        {"contact_id": "p1", "node": "nudge", "run_at": LATER},
        {"contact_id": "p2", "node": "reply", "run_at": LATER.isoformat()},
        {"contact_id": "p3", "node": "nudge", "run_at": LATER + timedelta(hours=1)},
        {"contact_id": "p4", "node": "done"},
    ]
    result = await campaign.service.enroll_many("c", rows, now=NOW)
    assert result == 5
    got = {r["contact_id"]: await campaign.status(f"c:{r['contact_id']}") for r in rows}
    assert (got["p0"].state, got["p0"].node, got["p0"].run_at) == ("scheduled", "welcome", NOW)
    assert (got["p1"].node, got["p1"].run_at) == ("nudge", LATER)
    assert (got["p2"].state, got["p2"].deadline) == ("waiting", LATER)
    assert got["p3"].run_at == LATER + timedelta(hours=1)
    assert got["p4"].state == "completed"
    counts = await campaign.service.store.count_by_state("c")
    assert counts["scheduled"] == 3 and counts["waiting"] == 1 and counts["completed"] == 1


async def test_enroll_many_names_the_row_with_a_bad_node(campaign: CampaignClient) -> None:
    rows = [{"contact_id": "ok"}, {"contact_id": "bad", "node": "nope"}]
    with pytest.raises(InvalidRow) as caught:
        await campaign.enroll_many("c", rows)
    assert caught.value.row == 1 and "node 'nope'" in str(caught.value)
    assert caught.value.enrolled == 0  # the batch is written only once every row is valid


async def test_reentry_campaign_places_too(client: CampaignClient) -> None:
    await client.register_campaign({**CAMPAIGN, "reentry": True})
    status = await client.service.enroll("c", "a", node="nudge", run_at=LATER, now=NOW)
    assert (status.node, status.run_at) == ("nudge", LATER)


async def test_a_contact_twice_in_one_batch_keeps_its_first_row(campaign: CampaignClient) -> None:
    """The rows are grouped by how they start; a contact's second row must not win just
    because its group is written first: it counts as already enrolled, as in a later
    batch."""
    rows: list[dict[str, Any]] = [
        {"contact_id": "b", "node": "reply", "run_at": LATER},
        {"contact_id": "a"},
        {"contact_id": "a", "node": "reply", "run_at": LATER},
        {"contact_id": "a", "node": "nudge", "run_at": LATER},
    ]
    result = await campaign.service.enroll_many("c", rows, now=NOW)
    assert (int(result), result.already_enrolled) == (2, 2)
    st = await campaign.status("c:a")
    assert (st.state, st.node, st.run_at) == (State.SCHEDULED, "welcome", NOW)
    assert await queued(campaign.redis, campaign.service.keys) == {
        "step:c:a:1:1": ms(NOW),
        "timeout:c:b:1": ms(LATER),
    }
