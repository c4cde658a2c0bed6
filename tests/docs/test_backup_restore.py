"""The backup and restore procedure of docs/maintenance.md, run for real with its own
commands: enrollments waiting and scheduled (due now, and due later) on a Redis; the
documented backup (``redis-cli --rdb``, then ``BGSAVE`` and a copy of ``dump.rdb``); the
original server killed; a new redis-server from the copy with AOF turned back on; the
documented worker against it resumes, and every enrollment completes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.client import CampaignClient
from app.models import State
from app.settings import Settings
from tests.docs.blocks import ROOT, sessions
from tests.docs.test_commands import doc_shell
from tests.helpers import eventually
from worker.embedded_redis import EmbeddedRedis

N = 20

CAMPAIGNS = [
    {  # waits for a reply: signalled after the restore
        "id": "restore-wait", "entry": "wait",
        "nodes": {"wait": {"type": "wait", "event": "replied", "timeout": "PT10M",
                           "on_event": "thanks", "on_timeout": "done"},
                  "thanks": {"type": "action", "action": "log", "next": "done"},
                  "done": {"type": "exit"}},
    },
    {  # waits, and times out by itself after the restore
        "id": "restore-timeout", "entry": "wait",
        "nodes": {"wait": {"type": "wait", "event": "replied", "timeout": "PT2S",
                           "on_event": "done", "on_timeout": "nudge"},
                  "nudge": {"type": "action", "action": "log", "next": "done"},
                  "done": {"type": "exit"}},
    },
    {  # scheduled and due now: no worker runs before the backup
        "id": "restore-due", "entry": "hello",
        "nodes": {"hello": {"type": "action", "action": "log", "next": "done"},
                  "done": {"type": "exit"}},
    },
    {  # scheduled for later: a delay, then a step
        "id": "restore-later", "entry": "pause",
        "nodes": {"pause": {"type": "delay", "duration": "PT3S", "next": "hello"},
                  "hello": {"type": "action", "action": "log", "next": "done"},
                  "done": {"type": "exit"}},
    },
]  # fmt: skip

EXPECTED = {
    "restore-wait": State.WAITING,
    "restore-timeout": State.WAITING,
    "restore-due": State.SCHEDULED,
    "restore-later": State.SCHEDULED,
}


def _ids() -> list[str]:
    return [f"{c['id']}:contact-{i}" for c in CAMPAIGNS for i in range(N)]


async def _fill(url: str) -> None:
    async with CampaignClient(settings=Settings(redis_url=url)) as client:  # type: ignore[arg-type]
        for campaign in CAMPAIGNS:
            await client.register_campaign(campaign)
            await client.enroll_many(
                str(campaign["id"]), [{"contact_id": f"contact-{i}"} for i in range(N)]
            )
        for eid in _ids():
            status = await client.status(eid)
            assert status.state == EXPECTED[eid.split(":")[0]], status


async def _resume(url: str) -> None:
    async with CampaignClient(settings=Settings(redis_url=url)) as client:  # type: ignore[arg-type]
        for i in range(N):
            assert await client.signal(f"restore-wait:contact-{i}", "replied")

        async def all_completed() -> bool:
            states = [(await client.status(eid)).state for eid in _ids()]
            return all(s == State.COMPLETED for s in states)

        await eventually(all_completed, timeout=30, interval=0.2, what="every enrollment completed")
        history = (await client.status("restore-due:contact-0")).history
        assert history[0].reason == "enrolled", history  # written before the backup


def test_documented_backup_and_restore(private_redis: EmbeddedRedis, tmp_path: Path) -> None:
    session = next(s for s in sessions() if s.id == "docs/maintenance.md#backup-restore")
    asyncio.run(_fill(private_redis.url))
    with doc_shell(tmp_path, private_redis, flush=False) as shell:
        restored_url = f"redis://127.0.0.1:{shell.ports[6380]}/0"
        commands = [(b, c) for b in session.blocks if b.lang == "console" and b.skip is None
                    for c in b.commands()]  # fmt: skip
        texts = [c.text for _, c in commands]
        assert any("--rdb" in t for t in texts) and any("BGSAVE" in t for t in texts)
        lost = False
        for block, command in commands:
            if "6380" in command.text and not lost:
                private_redis.kill()  # the original server is gone from here on
                lost = True
            shell.run(command, str(block.path.relative_to(ROOT)))
        assert lost and any("campaign-worker run" in t for t in texts)
        asyncio.run(_resume(restored_url))
        assert (shell.cwd / "restore" / "appendonlydir").exists() or (
            shell.cwd / "restore" / "appendonly.aof"
        ).exists(), "AOF was not turned back on after the restore"
