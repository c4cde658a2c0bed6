"""What stays cheap with many enrollments in one Redis: load, memory, and the reads and
passes that must not grow with the number of enrollments (issue 14).

    .venv/bin/python bench/scale.py [--sizes 10000,1000000]

For each size N, a fresh private redis-server (the project's ``deploy/redis/redis.conf``,
plus ``--appendonly no --save ""`` so that loading a million is not disk-bound, and
``--maxmemory 0``: the file's 256 MB cap is too small for a million), a
campaign whose entry is a wait with a 3-day timeout, and N contacts enrolled with
``client.enroll_many`` in batches of 5,000 (attributes ``{"email": <25 bytes>}``).
Reported per size, one column each so the growth is visible:

- load time and contacts/s; ``used_memory`` delta (``INFO memory``) and bytes per
  enrollment;
- then, with the N enrollments in place: one ``/metrics`` refresh (``QueueStats.refresh``,
  the first of two calls), ``queue_overview`` (``campaign-worker info``), the first page
  of ``list_enrollments`` (limit 100, ``campaign-worker list``), one reconciler pass;
- the step engine's rate: the timeout jobs of 5,000 of those enrollments made due now,
  and a worker (in this process, as ``bench/steps.py`` runs it) fires them until the
  campaign has 5,000 completed enrollments (the wait has no ``on_timeout``, so a timeout
  completes the enrollment); the time includes the worker's start, as in steps.py.

Uses only the public client, the service, and the key helpers, so it runs against
whatever record format is in the tree.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.client import CampaignClient
from app.keys import Keys
from app.overview import list_enrollments, queue_overview
from app.settings import Settings
from worker.actions import default_registry
from worker.embedded_redis import EmbeddedRedis
from worker.main import serve
from worker.queue_stats import QueueStats
from worker.reconciler import reconcile

REDIS_CONF = ROOT / "deploy" / "redis" / "redis.conf"
#: No disk writes while loading, and no 256 MB cap (redis.conf's maxmemory is sized for
#: the compose file's container, not for a million enrollments).
EXTRA_ARGS = ("--appendonly", "no", "--save", "", "--maxmemory", "0")
BATCH = 5000
STEPS = 5000
CAMPAIGN = {
    "id": "scale",
    "entry": "wait",
    "nodes": {
        "wait": {
            "type": "wait",
            "event": "replied",
            "timeout": "P3D",
            "on_event": "done",
            "on_timeout": None,
        },
        "done": {"type": "exit"},
    },
}
T = TypeVar("T")


@dataclass
class Result:
    size: int
    figures: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def contacts(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        email = f"u{i:012d}@example.com"  # 25 bytes
        yield {"contact_id": f"c{i}", "attributes": {"email": email}}


async def timed(call: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    started = time.perf_counter()
    value = await call()
    return time.perf_counter() - started, value


async def used_memory(client: CampaignClient) -> int:
    return int((await client.redis.info("memory"))["used_memory"])


async def completed(client: CampaignClient, keys: Keys) -> int:
    async with client.redis.pipeline(transaction=False) as pipe:
        for shard in keys.all_shards():
            pipe.scard(shard.state_index("scale", "completed"))
        return sum(int(n) for n in await pipe.execute())


async def step_rate(client: CampaignClient, settings: Settings, keys: Keys) -> tuple[float, int]:
    """Steps/s of a worker firing STEPS timeouts made due now; and how many were made due."""
    due = 0
    for shard in keys.all_shards():
        ids = await client.redis.zrange(shard.queue, 0, STEPS - due - 1)
        if ids:
            await client.redis.zadd(shard.queue, dict.fromkeys(ids, 0), xx=True)
            due += len(ids)
        if due >= STEPS:
            break
    before = await completed(client, keys)
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(
        serve(settings, default_registry(), install_signal_handlers=False, stop=stop)
    )
    try:
        while await completed(client, keys) - before < due:
            if task.done():
                raise RuntimeError(f"the worker stopped: exit code {task.result()}")
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await task
    return due / elapsed, due


async def measure(size: int) -> Result:
    result = Result(size)
    f = result.figures
    with EmbeddedRedis(config=REDIS_CONF, extra_args=EXTRA_ARGS) as server:
        settings = Settings(
            redis_url=server.url,  # type: ignore[arg-type]
            poll_delay=0.01,
            max_jobs=50,
            http_port=0,
            reconcile_every=3600,  # no reconciler pass of its own during the step run
        )
        keys = Keys(settings.key_prefix, settings.shards)
        async with CampaignClient(settings=settings) as client:
            await client.register_campaign(CAMPAIGN)
            before = await used_memory(client)

            took, enrolled = await timed(
                lambda: client.enroll_many("scale", contacts(size), batch_size=BATCH)
            )
            assert enrolled == size, enrolled
            delta = await used_memory(client) - before
            f["load (enroll_many, batches of 5,000)"] = f"{took:,.2f} s"
            f["load rate"] = f"{size / took:,.0f} contacts/s"
            f["used_memory delta"] = f"{delta / 2**20:,.1f} MiB"
            f["bytes per enrollment"] = f"{delta / size:,.0f}"

            stats = QueueStats(client.redis, settings)
            first, _ = await timed(stats.refresh)
            await stats.refresh()
            f["/metrics refresh (QueueStats.refresh, 1st call)"] = f"{first * 1000:,.2f} ms"

            took, view = await timed(lambda: queue_overview(client.redis, keys, settings))
            assert view.campaigns[0].counts["waiting"] == size, view
            f["queue_overview (`info`)"] = f"{took * 1000:,.2f} ms"

            took, page = await timed(
                lambda: list_enrollments(client.redis, keys, "scale", limit=100)
            )
            assert len(page.items) == min(100, size), len(page.items)
            f["first page of list_enrollments, limit 100 (`list`)"] = f"{took * 1000:,.2f} ms"

            took, repaired = await timed(lambda: reconcile({"service": client.service}))
            if any(repaired.values()):
                result.notes.append(f"reconciler repaired {repaired} at {size:,}")
            f["one reconciler pass"] = f"{took:,.2f} s"
            f["reconciler rate"] = f"{size / took:,.0f} enrollments/s"

            rate, due = await step_rate(client, settings, keys)
            f[f"step engine: {due:,} timeouts fired"] = f"{rate:,.0f} steps/s"
    return result


async def run(sizes: list[int]) -> None:
    logging.disable(logging.WARNING)
    probe = EmbeddedRedis(config=REDIS_CONF, extra_args=EXTRA_ARGS)
    with probe:
        async with CampaignClient(settings=Settings(redis_url=probe.url)) as c:  # type: ignore[arg-type]
            version = (await c.redis.info("server"))["redis_version"]
    results = []
    for size in sizes:
        print(f"measuring {size:,} enrollments ...", file=sys.stderr, flush=True)
        results.append(await measure(size))
    print(
        f"Python {sys.version.split()[0]}, redis-server {version}: a fresh server per size, "
        f'deploy/redis/redis.conf with `--appendonly no --save "" --maxmemory 0` (no disk '
        f"writes while loading, no 256 MB cap); a campaign whose entry is a wait with a 3-day timeout; attributes "
        f'{{"email": <25 bytes>}}.'
    )
    print()
    names = list(dict.fromkeys(k for r in results for k in r.figures))
    width = max(len(n) for n in names)
    head = [f"{r.size:,} enrollments" for r in results]
    print(f"| {'':<{width}} | " + " | ".join(head) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * (len(h) + 1) + ":" for h in head) + "|")
    for name in names:
        cells = [r.figures.get(name, "-").rjust(len(h)) for r, h in zip(results, head, strict=True)]
        print(f"| {name:<{width}} | " + " | ".join(cells) + " |")
    for r in results:
        for note in r.notes:
            print(f"note: {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", default="10000,1000000", help="comma-separated enrollment counts")
    args = ap.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    asyncio.run(run(sizes))


if __name__ == "__main__":
    main()
