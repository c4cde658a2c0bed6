"""Redis memory per waiting enrollment, and what each part of it costs.

    .venv/bin/python bench/memory.py [--contacts N]

A private redis-server (the project's redis.conf), a campaign whose entry is a wait with a
3-day timeout, N contacts (default 20,000) enrolled with ``enroll_many``, each with a
25-byte email attribute. Total: the ``used_memory`` delta of ``INFO memory`` divided by
N. Parts: ``MEMORY USAGE`` of one record, and of the shard's queue, payload hash and index
set divided by N (their per-entry share); the history list does not exist until an
enrollment first moves, so its row shows what it costs after one move.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.client import CampaignClient
from app.jobs import timeout_job_id
from app.settings import Settings
from worker.embedded_redis import EmbeddedRedis

CAMPAIGN = {"id": "mem", "entry": "w", "nodes": {
    "w": {"type": "wait", "event": "replied", "timeout": "P3D", "on_event": "done",
          "on_timeout": "done"},
    "done": {"type": "exit"}}}  # fmt: skip
TARGET = 800


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contacts", type=int, default=20_000)
    n = parser.parse_args().contacts
    with EmbeddedRedis(config=ROOT / "deploy" / "redis" / "redis.conf") as server:
        async with CampaignClient(settings=Settings(redis_url=server.url)) as client:  # type: ignore[arg-type]
            redis = client.redis
            await client.register_campaign(CAMPAIGN)
            await redis.execute_command("MEMORY", "PURGE")
            before = int((await redis.info("memory"))["used_memory"])
            rows = ({"contact_id": f"contact-{i:06d}",
                     "attributes": {"email": f"person{i:06d}@example.com"}} for i in range(n))  # fmt: skip
            assert await client.enroll_many("mem", rows) == n
            total = (int((await redis.info("memory"))["used_memory"]) - before) / n
            eid = "mem:contact-000001"
            shard = client.service.keys.for_enrollment(eid)
            record = await redis.memory_usage(shard.enrollment(eid))
            parts = {
                "record (hash, listpack)": record,
                "queue entry (sorted set)": await redis.memory_usage(shard.queue, samples=0) / n,
                "job payload (hash entry)": await redis.memory_usage(shard.jobs, samples=0) / n,
                "index entry (set)": await redis.memory_usage(
                    shard.state_index("mem", "waiting"), samples=0
                )
                / n,
            }
            payload = await redis.hget(shard.jobs, timeout_job_id(eid, 1))
            await client.signal(eid, "replied")  # its first move starts its history list
            history = await redis.memory_usage(shard.history(eid))
    print(f"{n} waiting enrollments (entry: a wait with a timeout; a 25-byte email attribute)")
    print("| part | bytes per enrollment |")
    print("|---|---:|")
    for name, value in parts.items():
        print(f"| {name} | {value:,.0f} |")
    print("| history list | 0 (none until the first move; then about "
          f"{history:,} with two entries) |")  # fmt: skip
    print(f"| **total, `INFO memory` delta / {n}** | **{total:,.0f}** (target <= {TARGET}) |")
    print(f"job payload: {payload.decode()}")


if __name__ == "__main__":
    asyncio.run(main())
