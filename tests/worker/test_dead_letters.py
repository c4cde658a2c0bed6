"""``campaign-worker dead-letters --requeue ID|--all`` and ``--purge`` on real dead letters:
payloads corrupted in the jobs hash and dropped by a real claim (claim.lua)."""

from __future__ import annotations

import asyncio
from typing import Any

from app.client import CampaignClient
from app.settings import Settings
from tests.queue_view import claim_due, queued

CAMPAIGN: dict[str, Any] = {
    "id": "c",
    "entry": "a",
    "nodes": {"a": {"type": "action", "action": "log", "next": None}},
}


async def _dead_letters(settings: Settings, contacts: list[str], cancel: list[str]) -> None:
    """Enroll ``contacts``, corrupt their step payloads and let a claim dead-letter them;
    then cancel ``cancel``; and push one letter that names no enrollment."""
    async with CampaignClient(settings=settings) as client:
        await client.register_campaign(CAMPAIGN)
        shard = client.service.keys.shard(0)
        for contact in contacts:
            status = await client.enroll("c", contact)
            job = (await client.service.store.record(status.enrollment_id) or {})["job"]
            await client.redis.hset(shard.jobs, job, b'{"t": "x"}')  # type: ignore[misc]
        batch = await claim_due(client.service)
        assert len(batch.dead) == len(contacts)
        assert await queued(client.redis, client.service.keys) == {}
        for contact in cancel:
            assert await client.cancel(f"c:{contact}")
        await client.redis.lpush(shard.dead, b'{"job_id": "garbage", "reason": "no payload"}')  # type: ignore[misc]


def _queue(settings: Settings) -> dict[str, int]:
    async def read() -> dict[str, int]:
        async with CampaignClient(settings=settings) as client:
            return await queued(client.redis, client.service.keys)

    return asyncio.run(read())


def test_requeue_one_then_all_then_purge(cli: Any, settings: Settings) -> None:
    asyncio.run(_dead_letters(settings, ["x", "y", "z"], cancel=["z"]))
    code, out, _ = cli("dead-letters")
    assert code == 0 and "4 of 4 shown" in out

    code, out, err = cli("dead-letters", "--requeue", "step:c:x:1:1")
    assert code == 0, out
    assert "requeued step:c:x:1:1: enrollment c:x" in out
    assert err == "" and "had no job" not in out, out  # the reconciler logs for workers
    assert set(_queue(settings)) == {"step:c:x:1:1"}  # its job is back, due as before

    code, out, _ = cli("dead-letters", "--requeue", "step:c:x:1:1")
    assert code == 1  # that letter is gone now

    code, out, err = cli("dead-letters", "--requeue", "--all")
    assert code == 1  # the letter naming no enrollment stays
    assert err == "" and "had no job" not in out, out
    assert "requeued step:c:y:1:1: enrollment c:y" in out
    assert "dropped (the enrollment is cancelled) step:c:z:1:1" in out
    assert "kept 'garbage': names no enrollment" in out
    assert "requeued 1, dropped 1 (nothing to requeue), kept 1" in out
    assert set(_queue(settings)) == {"step:c:x:1:1", "step:c:y:1:1"}

    code, out, _ = cli("dead-letters", "--purge")
    assert (code, out) == (0, "purged 1 dead letter\n")
    assert cli("dead-letters")[1] == "no dead letters\n"


def test_bad_combinations_are_named(cli: Any) -> None:
    for argv, message in [
        (["--requeue"], "--requeue takes a job id or --all"),
        (["--requeue", "a", "--all"], "not both"),
        (["--all"], "--all goes with --requeue"),
        (["--purge", "--all"], "--all goes with --requeue"),
    ]:
        code, _, err = cli("dead-letters", *argv)
        assert code == 1 and message in err, (argv, err)
    code, _, err = cli("dead-letters", "--purge", "--requeue", "x")
    assert code == 2 and "not allowed with" in err
