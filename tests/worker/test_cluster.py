"""Redis Cluster and Sentinel, on real local topologies (tests/topologies.py): the whole
reply/timeout campaign through two worker subprocesses, with and without a master
SIGKILLed mid-way; every enrollment ends terminal, one effect per idempotency key."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any

import pytest

from app.client import CampaignClient
from app.models import State
from app.settings import ConfigError, Settings
from tests.campaigns import reply_timeout
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from tests.topologies import LocalCluster, LocalSentinel

SHARDS = "6"
_TERMINAL = {State.COMPLETED, State.FAILED, State.CANCELLED}
FAST = {"CAMPAIGN_SHARDS": SHARDS, "CAMPAIGN_RECONCILE_EVERY": "5", "CAMPAIGN_LEASE": "3",
        "CAMPAIGN_REDIS_BACKOFF_MAX": "0.5"}  # fmt: skip


def settings_for(url: str) -> Settings:
    return Settings(redis_url=url, shards=int(SHARDS))  # type: ignore[arg-type]


async def _all_terminal(client: CampaignClient, ids: list[str], timeout: float) -> Counter[str]:
    async def check() -> Counter[str] | None:
        states: Counter[str] = Counter()
        for start in range(0, len(ids), 200):
            for eid in ids[start : start + 200]:
                states[(await client.status(eid)).state.value] += 1
        active = sum(n for s, n in states.items() if s not in {"completed", "failed", "cancelled"})
        return states if active == 0 else None

    return await eventually(check, timeout, 0.5, "every enrollment terminal")


def _one_effect_per_key(svc: FakeService, ids: list[str]) -> None:
    """Each step's key reached the service (a re-run may repeat a key, never change it):
    first + (thanks or nudge) per enrollment, with the same body for every repeat."""
    bodies: dict[str, set[bytes]] = {}
    for call in svc.calls:
        bodies.setdefault(call.key, set()).add(call.raw)
    assert all(len(b) == 1 for b in bodies.values())
    per_enrollment = Counter(key.rsplit(":", 1)[0] for key in bodies)
    assert set(per_enrollment) == set(ids)
    assert set(per_enrollment.values()) == {2}


def _reconciled(workers: list[WorkerProcess]) -> int:
    total = 0.0
    for worker in workers:
        for line in worker.raw:
            if "enrollment had no job: re-created" in line:
                total += 1
    return int(total)


async def _run(url: str, svc: FakeService, n: int, fault: Any = None) -> tuple[list[str], Any]:
    workers = [WorkerProcess(url, **FAST).start() for _ in range(2)]
    try:
        for w in workers:
            await w.wait_status("/readyz", 200, timeout=30)
        async with CampaignClient(settings=settings_for(url)) as client:
            await client.register_campaign(reply_timeout(svc, max_attempts=None))
            contacts = [{"contact_id": f"c{i:04d}"} for i in range(n)]
            assert await client.enroll_many("rt", contacts) == n
            ids = [f"rt:c{i:04d}" for i in range(n)]
            # a third replies as soon as it waits; the rest time out into the nudge
            repliers = ids[::3]

            errors: Counter[str] = Counter()

            pending = set(repliers)

            async def reply() -> None:
                while pending:
                    for eid in list(pending):
                        try:
                            if await client.signal(eid, "replied"):
                                pending.discard(eid)
                            elif (await client.status(eid)).state in _TERMINAL:
                                pending.discard(eid)  # timed out before the reply
                        except Exception as exc:  # a failover in progress: try again
                            errors[type(exc).__name__] += 1
                            await asyncio.sleep(0.2)
                    await asyncio.sleep(0.05)

            replying = asyncio.create_task(reply())
            outcome = None
            if fault is not None:
                outcome = await fault(svc, workers)
            states = await _all_terminal(client, ids, timeout=90)
            try:
                await asyncio.wait_for(replying, 30)
            finally:
                print("client errors during the run:", dict(errors), "unreplied:", len(pending),
                      sorted(pending)[:3])  # fmt: skip
            failed = [await client.status(e) for e in ids] if states["failed"] else []
            errors_seen = Counter(
                f"{st.error.type}: {st.error.message} {(st.error.traceback or '')[-600:]}"
                for st in failed
                if st.error
            )
        assert states == Counter({"completed": n}), (states, errors_seen)
        _one_effect_per_key(svc, ids)
        return ids, (outcome, _reconciled(workers))
    finally:
        codes = [w.stop() for w in workers]
        assert codes == [0, 0], [w.raw[-20:] for w in workers]


async def test_reply_timeout_campaign_on_a_cluster(
    redis_cluster: LocalCluster, svc: FakeService
) -> None:
    svc.failing = False
    redis_cluster.reset_stats()
    await _run(redis_cluster.url, svc, 1000)
    stats = redis_cluster.command_stats()
    # every master ran claim/transition scripts: the shards spread over the cluster
    assert all(s.get("evalsha", 0) > 100 for s in stats.values()), stats


async def test_a_master_killed_mid_run_fails_over_and_nothing_is_lost(
    redis_cluster: LocalCluster, svc: FakeService
) -> None:
    seed = int(redis_cluster.url.rsplit(":", 1)[1].split("/")[0])
    victim = next(p for p in redis_cluster.masters() if p != seed)

    async def kill_a_master(svc: FakeService, workers: list[WorkerProcess]) -> float:
        await eventually(lambda: asyncio.sleep(0, len(svc.calls) > 400), 60, 0.05, "400 calls")
        redis_cluster.kill(victim)
        return await asyncio.to_thread(redis_cluster.wait_failover, victim, 30.0)

    _, (failover_s, reconciled) = await _run(redis_cluster.url, svc, 1000, kill_a_master)
    print(f"failover {failover_s:.1f}s, enrollments repaired by the reconciler: {reconciled}")


async def test_sentinel_failover_is_followed(
    redis_sentinel: LocalSentinel, svc: FakeService
) -> None:
    async def kill_master(svc: FakeService, workers: list[WorkerProcess]) -> float:
        await eventually(lambda: asyncio.sleep(0, len(svc.calls) > 150), 60, 0.05, "150 calls")
        old = redis_sentinel.kill_master()

        async def not_ready() -> bool:
            codes = [(await w.get("/readyz"))[0] for w in workers]
            return 503 in codes

        await eventually(not_ready, 15, 0.05, "/readyz 503 while the master is gone")
        took = await asyncio.to_thread(redis_sentinel.wait_failover, old, 30.0)
        for w in workers:
            await w.wait_status("/readyz", 200, timeout=30)  # back on the new master
        return took

    _, (failover_s, reconciled) = await _run(redis_sentinel.url, svc, 400, kill_master)
    print(f"sentinel failover {failover_s:.1f}s, repaired by the reconciler: {reconciled}")


async def test_client_and_worker_refuse_another_shard_count(redis_cluster: LocalCluster) -> None:
    url = redis_cluster.url
    worker = WorkerProcess(url, CAMPAIGN_SHARDS="6").start()
    await worker.wait_status("/readyz", 200, timeout=30)
    assert worker.stop() == 0
    async with CampaignClient(settings=Settings(redis_url=url, shards=3)) as client:  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=r"CAMPAIGN_SHARDS: this Redis holds 6 shard\(s\)"):
            await client.status("rt:x")
    other = WorkerProcess(url, CAMPAIGN_SHARDS="3").start()
    assert other.wait(30) == 2
    assert any(re.search(r"holds 6 shard", line) for line in other.raw), other.raw[-5:]
    untagged = WorkerProcess(url, CAMPAIGN_SHARDS="6", CAMPAIGN_QUEUE_NAME="maint").start()
    assert untagged.wait(30) == 2
    assert any("{arq:abort}" in line for line in untagged.raw), untagged.raw[-5:]


def test_arq_cli_refuses_a_cluster(redis_cluster: LocalCluster) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import ROOT, subprocess_env

    done = subprocess.run(
        [str(Path(sys.executable).parent / "arq"), "worker.settings.WorkerSettings"],
        cwd=ROOT, env=subprocess_env(REDIS_URL=redis_cluster.url, CAMPAIGN_HTTP_PORT="0"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout[-500:] + done.stderr[-500:]
    assert "campaign-worker run" in done.stderr


async def test_arq_follows_a_failover_of_its_own_slot(redis_cluster: LocalCluster) -> None:
    """ping (one of arq's jobs) is answered before and after the master that serves arq's
    slot ({arq:abort}) is SIGKILLed, and the reconciler's cron keeps running."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import subprocess_env

    url = redis_cluster.url
    arq_master = redis_cluster.master_for_key("campaign:{arq:abort}")
    seed = int(url.rsplit(":", 1)[1].split("/")[0])
    if arq_master == seed:  # keep the seed node up: the CLI below starts from it
        url = f"redis://127.0.0.1:{next(p for p in redis_cluster.masters() if p != seed)}/0"
    worker = WorkerProcess(url, CAMPAIGN_SHARDS=SHARDS, CAMPAIGN_RECONCILE_EVERY="1",
                           CAMPAIGN_REDIS_BACKOFF_MAX="0.5").start()  # fmt: skip
    exe = str(Path(sys.executable).parent / "campaign-worker")
    env = subprocess_env(REDIS_URL=url, CAMPAIGN_SHARDS=SHARDS)

    def ping() -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, "ping", "--timeout", "20"], env=env, capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    try:
        await worker.wait_status("/readyz", 200, timeout=30)
        first = await asyncio.to_thread(ping)
        assert first.returncode == 0 and "pong from" in first.stdout, first.stderr
        redis_cluster.kill(arq_master)
        await asyncio.to_thread(redis_cluster.wait_failover, arq_master, 30.0)
        again = await asyncio.to_thread(ping)
        assert again.returncode == 0 and "pong from" in again.stdout, (
            again.stderr,
            worker.raw[-10:],
        )

        def reconciled_after_failover() -> bool:
            runs = [d for d in worker.lines if d.get("msg") in {"reconciler run",
                                                                 "reconciler repaired enrollments"}]  # fmt: skip
            return len(runs) >= 2

        await eventually(lambda: asyncio.sleep(0, reconciled_after_failover()), 30, 0.2,
                         "reconciler runs")  # fmt: skip
    finally:
        assert worker.stop() == 0


async def test_database_other_than_0_is_named(redis_cluster: LocalCluster) -> None:
    url = redis_cluster.url.rsplit("/", 1)[0] + "/1"
    async with CampaignClient(settings=Settings(redis_url=url)) as client:  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="database 0 only"):
            await client.status("rt:x")
    worker = WorkerProcess(url).start()
    assert worker.wait(30) == 2
    assert any("database 0 only" in line for line in worker.raw), worker.raw[-5:]


async def test_a_client_that_writes_first_pins_the_shard_count(
    redis_cluster: LocalCluster, svc: FakeService
) -> None:
    async with CampaignClient(settings=settings_for(redis_cluster.url)) as client:
        await client.register_campaign(reply_timeout(svc, max_attempts=None))
        assert await client.enroll_many("rt", [{"contact_id": f"c{i}"} for i in range(30)]) == 30
    other = Settings(redis_url=redis_cluster.url, shards=4)  # type: ignore[arg-type]
    async with CampaignClient(settings=other) as client:
        with pytest.raises(ConfigError, match=r"holds 6 shard\(s\)"):
            await client.status("rt:c1")
