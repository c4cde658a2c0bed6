"""Retention: finished enrollments older than a cutoff are deleted with their history and
index entries (client.purge, ``campaign-worker purge``, the worker's periodic job)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.client import CampaignClient
from app.errors import CampaignNotFound, EnrollmentNotFound, InvalidRequest
from app.models import State
from app.retention import finished_cutoff, purge_finished
from app.settings import Settings
from worker.maintenance import maintenance_crons, retention_run
from worker.metrics import metrics

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=40)


def campaign(cid: str) -> dict[str, Any]:
    return {
        "id": cid,
        "entry": "a",
        "nodes": {
            "a": {
                "type": "wait",
                "event": "e",
                "timeout": "P3D",
                "on_event": "end",
                "on_timeout": "end",
            },
            "end": {"type": "exit"},
        },
    }


async def _age(client: CampaignClient, eid: str, when: datetime) -> None:
    await client.redis.hset(  # type: ignore[misc]
        client.service.keys.enrollment(eid), "updated_at", str(int(when.timestamp() * 1000))
    )


async def _setup(client: CampaignClient) -> None:
    """In campaign c: 3 old completed, 2 old cancelled, 1 recent completed, 1 waiting;
    in campaign d: 1 old completed."""
    for cid in ("c", "d"):
        await client.register_campaign(campaign(cid))
    for i in range(3):
        await client.enroll("c", f"old{i}")
        assert await client.signal(f"c:old{i}", "e")
        await _age(client, f"c:old{i}", OLD)
    for i in range(2):
        await client.enroll("c", f"gone{i}")
        assert await client.cancel(f"c:gone{i}", "unsubscribed")
        await _age(client, f"c:gone{i}", OLD)
    await client.enroll("c", "recent")
    assert await client.signal("c:recent", "e")
    await client.enroll("c", "active")
    await client.enroll("d", "old")
    assert await client.signal("d:old", "e")
    await _age(client, "d:old", OLD)


async def _keys(client: CampaignClient) -> set[str]:
    return {
        k.decode() for k in await client.redis.keys("*:enr:*") + await client.redis.keys("*:hist:*")
    }


async def test_purge_deletes_old_finished_records_history_and_index_entries(
    client: CampaignClient,
) -> None:
    await _setup(client)
    assert any(":hist:c:old0" in k for k in await _keys(client))

    dry = await client.purge(timedelta(days=30), dry_run=True)
    assert (dry.total, dry.by_state["completed"], dry.by_state["cancelled"]) == (6, 4, 2)
    assert (await client.status("c:old0")).state == State.COMPLETED  # nothing deleted

    only_c = await client.purge(timedelta(days=30), campaign_id="c")
    assert only_c.total == 5
    for eid in ("c:old0", "c:old1", "c:old2", "c:gone0", "c:gone1"):
        with pytest.raises(EnrollmentNotFound):
            await client.status(eid)
    remaining = await _keys(client)
    assert not any(k.endswith((":c:old0", ":c:gone1")) for k in remaining), remaining
    counts = await client.service.store.count_by_state("c")
    assert (counts["completed"], counts["cancelled"], counts["waiting"]) == (1, 0, 1)
    assert (await client.status("d:old")).state == State.COMPLETED  # other campaign kept

    everything = await client.purge(timedelta(0))  # PT0S: every finished enrollment
    assert everything.total == 2  # c:recent and d:old
    assert (await client.status("c:active")).state == State.WAITING
    assert await client.service.store.count_by_state("d") == dict.fromkeys(
        [s.value for s in State], 0
    )


async def test_an_enrollment_finished_after_the_cutoff_is_kept(client: CampaignClient) -> None:
    await client.register_campaign(campaign("c"))
    await client.enroll("c", "x")
    assert await client.cancel("c:x")
    result = await client.purge(NOW - timedelta(days=1))
    assert result.total == 0
    assert (await client.status("c:x")).state == State.CANCELLED


async def test_purge_of_an_unknown_campaign_is_named(client: CampaignClient) -> None:
    with pytest.raises(CampaignNotFound, match="nope"):
        await client.purge(timedelta(0), campaign_id="nope")


async def test_the_retention_job_uses_the_setting(
    client: CampaignClient, settings: Settings
) -> None:
    assert maintenance_crons(settings) == []
    kept = settings.model_copy(update={"retention": timedelta(days=30)})
    [job] = maintenance_crons(kept)
    assert job.name == "campaign:{arq:abort}:retention"
    await _setup(client)
    service = client.service
    service.settings = kept
    before = metrics.purged.labels(state="completed")._value.get()
    assert await retention_run({"service": service}) == 6
    assert metrics.purged.labels(state="completed")._value.get() - before == 4
    assert await retention_run({"service": service}) == 0


def test_purge_command(cli: Any, settings: Settings) -> None:
    async def setup() -> None:
        async with CampaignClient(settings=settings) as client:
            await _setup(client)

    asyncio.run(setup())
    code, out, _ = cli("purge", "--finished-before", "P30D", "--dry-run")
    assert (code, out.strip()) == (
        0,
        "would purge 6 finished enrollments (4 completed, 0 failed, 2 cancelled)",
    )
    code, out, _ = cli("purge", "--finished-before", "P30D", "--campaign", "d")
    assert (code, out.strip()) == (
        0,
        "purged 1 finished enrollment (1 completed, 0 failed, 0 cancelled)",
    )
    before = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    code, out, _ = cli("purge", "--finished-before", before)
    assert code == 0 and out.startswith("purged 6 ")
    for bad, message in [
        ("30 days", "neither an ISO 8601 duration"),
        ("P30X", "not an ISO 8601 duration"),
        ("2026-11-01T00:00:00", "has no UTC offset"),
    ]:
        code, _, err = cli("purge", "--finished-before", bad)
        assert code == 1 and message in err, err
    code, _, err = cli("purge", "--finished-before", "PT0S", "--campaign", "nope")
    assert code == 1 and "nope" in err


def test_purge_durations_at_the_edges(cli: Any, settings: Settings) -> None:
    """Too long a duration, a negative one, years and months are refused by name (no
    traceback); a plain number of seconds is a duration, as in CAMPAIGN_RETENTION."""

    async def setup() -> None:
        async with CampaignClient(settings=settings) as client:
            await _setup(client)

    asyncio.run(setup())
    for bad, message in [
        ("P99999999D", "'P99999999D' is too long"),
        ("-P1D", "'-P1D' is negative"),
        ("P1Y", "years and months have no fixed length"),
        ("P2M", "years and months have no fixed length"),
        ("P1Y2M3DT4H", "years and months have no fixed length"),
    ]:
        code, _, err = cli("purge", f"--finished-before={bad}", "--dry-run")
        assert code == 1 and message in err and "Traceback" not in err, (bad, err)
    code, out, _ = cli("purge", "--finished-before", str(30 * 86400), "--dry-run")
    assert (code, out.strip()) == (
        0,
        "would purge 6 finished enrollments (4 completed, 0 failed, 2 cancelled)",
    )
    code, out, _ = cli("purge", "--finished-before", "PT5M", "--dry-run")
    assert code == 0 and out.startswith("would purge 6 ")


async def test_a_negative_or_overflowing_duration_is_refused(client: CampaignClient) -> None:
    await _setup(client)
    keys = client.service.keys
    with pytest.raises(InvalidRequest, match="must not be a negative duration"):
        await purge_finished(client.redis, keys, timedelta(days=-1))
    with pytest.raises(InvalidRequest, match="too long"):
        await purge_finished(client.redis, keys, timedelta(days=99_999_999))
    with pytest.raises(InvalidRequest, match="timezone-aware"):
        finished_cutoff(datetime(2026, 1, 1))
    assert finished_cutoff(timedelta(days=1), NOW) == NOW - timedelta(days=1)
    result = await purge_finished(client.redis, keys, timedelta(days=30), dry_run=True)
    assert result.total == 6


async def test_client_purge_refuses_a_negative_duration(client: CampaignClient) -> None:
    with pytest.raises(InvalidRequest, match="negative"):
        await client.purge(timedelta(days=-1))
    with pytest.raises(InvalidRequest, match=r"UTC offset|timezone"):
        await client.purge(datetime(2026, 1, 1))
