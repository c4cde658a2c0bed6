"""A contact whose finished enrollment was purged and who is enrolled again goes on from
the purged enrollment's last step (its tombstone), so no job id and no idempotency key
(``{enrollment_id}:{step}``) of the new enrollment repeats one of the old."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from app.client import CampaignClient
from app.models import State
from tests.queue_view import payload, queued

CAMPAIGN: dict[str, Any] = {
    "id": "c",
    "entry": "send",
    "nodes": {
        "send": {"type": "action", "action": "log", "next": "wait"},
        "wait": {
            "type": "wait",
            "event": "e",
            "timeout": "P3D",
            "on_event": "end",
            "on_timeout": "end",
        },
        "end": {"type": "exit"},
    },
}


async def _job(client: CampaignClient, eid: str) -> tuple[str, str]:
    """The enrollment's current job id and the idempotency key its action will carry."""
    rec = await client.service.store.record(eid)
    assert rec is not None and rec.get("job"), rec
    doc = await payload(client.redis, client.service.keys, rec["job"])
    assert doc is not None
    return rec["job"], f"{eid}:{doc['a'][1]}"


async def _finish_and_purge(client: CampaignClient, eid: str) -> int:
    """Finish ``eid`` (enrolled at its wait, then the event: 2 steps), purge it; its step."""
    await client.enroll("c", eid.partition(":")[2], node="wait")
    assert await client.signal(eid, "e")
    st = await client.status(eid)
    assert st.state == State.COMPLETED
    assert (await client.purge(timedelta(0))).total == 1
    return st.step


@pytest.mark.parametrize("reentry", [False, True], ids=["plain", "reentry"])
async def test_enroll_after_purge_goes_on_from_the_purged_step(
    client: CampaignClient, reentry: bool
) -> None:
    await client.register_campaign({**CAMPAIGN, "reentry": reentry})
    await client.enroll("c", "x")
    first_job, first_key = await _job(client, "c:x")
    assert await client.cancel("c:x")
    assert (await client.purge(timedelta(0))).total == 1
    assert await client.service.store.count_by_state("c") == dict.fromkeys(
        [s.value for s in State], 0
    )

    st = await client.enroll("c", "x")
    assert (st.state, st.node) == (State.SCHEDULED, "send")
    assert st.step == 2  # the purged enrollment ended at step 1
    job, key = await _job(client, "c:x")
    assert (job, key) == ("step:c:x:2:1", "c:x:2")
    assert job != first_job and key != first_key
    assert set(await queued(client.redis, client.service.keys)) == {job}
    counts = await client.service.store.count_by_state("c")
    assert (counts["scheduled"], sum(counts.values())) == (1, 1)
    # the tombstone is gone once the enrollment exists again
    shard = client.service.keys.for_enrollment("c:x")
    assert await client.redis.hlen(shard.tombstones) == 0  # type: ignore[misc]

    # purged again, later: it goes on from the latest step
    assert await client.cancel("c:x")
    assert (await client.purge(timedelta(0))).total == 1
    assert await client.redis.hget(shard.tombstones, "c:x") == b"2"  # type: ignore[misc]
    assert (await client.enroll("c", "x")).step == 3


@pytest.mark.parametrize("reentry", [False, True], ids=["plain", "reentry"])
async def test_enroll_many_after_purge_goes_on_from_the_purged_step(
    client: CampaignClient, reentry: bool
) -> None:
    await client.register_campaign({**CAMPAIGN, "reentry": reentry})
    step = await _finish_and_purge(client, "c:x")
    assert step == 2
    rows = [{"contact_id": "new"}, {"contact_id": "x"}, {"contact_id": "x"}]
    result = await client.enroll_many("c", rows)
    assert (int(result), result.already_enrolled) == (2, 1)  # "x" twice: the first one wins
    assert (await client.status("c:new")).step == 1
    st = await client.status("c:x")
    assert (st.state, st.step) == (State.SCHEDULED, 3)
    assert await _job(client, "c:x") == ("step:c:x:3:1", "c:x:3")
    assert set(await queued(client.redis, client.service.keys)) == {
        "step:c:new:1:1",
        "step:c:x:3:1",
    }
    counts = await client.service.store.count_by_state("c")
    assert (counts["scheduled"], sum(counts.values())) == (2, 2)


async def test_a_placed_enrollment_after_purge_goes_on_too(client: CampaignClient) -> None:
    await client.register_campaign(CAMPAIGN)
    await _finish_and_purge(client, "c:x")
    result = await client.enroll_many("c", [{"contact_id": "x", "node": "wait"}])
    assert int(result) == 1
    st = await client.status("c:x")
    assert (st.state, st.node, st.step) == (State.WAITING, "wait", 3)
    assert set(await queued(client.redis, client.service.keys)) == {"timeout:c:x:3"}
