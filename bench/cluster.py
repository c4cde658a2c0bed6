"""Campaign steps on one Redis server against a 3-master Redis Cluster, in the same run.

    .venv/bin/python bench/cluster.py [--jobs N] [--repeats R] [--shards S]

Each repeat runs, one after the other:
- "one server": a private redis-server (deploy/redis/redis.conf), CAMPAIGN_SHARDS=S;
- "cluster": 3 cluster-enabled masters (no replicas: on a 2-core machine they would
  only take CPU from the masters), CAMPAIGN_SHARDS=S, built by tests/topologies.py.
Both run N contacts through a one-action campaign with one worker (bench/steps.py's
campaign_steps). Reported: steps/s, Redis commands per step (INFO commandstats, summed over
the masters), how the commands spread over the masters, and the commands per second an
idle worker sends (5 s at rest, nothing due).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis as sync_redis
from steps import campaign_steps

from app.settings import Settings
from tests.topologies import start_cluster
from worker.actions import default_registry
from worker.embedded_redis import EmbeddedRedis
from worker.main import serve

ROOT = Path(__file__).resolve().parents[1]
IDLE_SECONDS = 5.0
#: Redis main-thread CPU seconds per step (enrolling included), per run, in run order.
CPU_PER_STEP: list[float] = []


def calls(port: int, only: str | None = None) -> int:
    """Commands the server has run since its stats were reset (INFO excluded; the commands
    a script runs count too), or only those named ``only`` (e.g. ``evalsha``)."""
    stats = sync_redis.Redis(port=port).info("commandstats")
    if only is not None:
        return int(stats.get(f"cmdstat_{only}", {}).get("calls", 0))
    return sum(int(v["calls"]) for k, v in stats.items() if k not in {"cmdstat_info"})


def main_thread_cpu(port: int) -> float:
    """CPU seconds the server's main thread (the one that runs commands) has used."""
    info = sync_redis.Redis(port=port).info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


def reset(ports: list[int]) -> None:
    for port in ports:
        sync_redis.Redis(port=port).config_resetstat()


async def idle_rate(url: str, ports: list[int], shards: int, seconds: float) -> float:
    """Commands per second the masters get from one idle worker."""
    settings = Settings(redis_url=url, http_port=0, shards=shards)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, default_registry(), stop=stop,
                                     install_signal_handlers=False))  # fmt: skip
    await asyncio.sleep(min(2.0, seconds))  # started and settled
    reset(ports)
    await asyncio.sleep(seconds)
    rate = sum(calls(p) for p in ports) / seconds
    stop.set()
    await task
    return rate


async def measure(
    url: str, ports: list[int], n: int, shards: int
) -> tuple[float, float, list[int], float]:
    reset(ports)
    cpu = sum(main_thread_cpu(p) for p in ports)
    rate = await campaign_steps(url, n, shards=shards)
    per_master = [calls(p) for p in ports]
    scripts = sum(calls(p, "evalsha") for p in ports)
    CPU_PER_STEP.append((sum(main_thread_cpu(p) for p in ports) - cpu) / n)
    return rate, sum(per_master) / n, per_master, scripts / n


def flush(ports: list[int]) -> None:
    for port in ports:
        sync_redis.Redis(port=port).flushall()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--idle-seconds", type=float, default=IDLE_SECONDS)
    parser.add_argument("--deadline", type=float, default=0,
                        help="seconds after which to print every thread's stack and exit "
                        "(0: none)")  # fmt: skip
    args = parser.parse_args()
    if args.deadline:  # a hang shows where it is instead of being killed silently
        faulthandler.dump_traceback_later(args.deadline, exit=True)
    logging.disable(logging.WARNING)
    single: list[tuple[float, float, list[int], float]] = []
    cluster: list[tuple[float, float, list[int], float]] = []
    idle_single = idle_cluster = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            with EmbeddedRedis(config=ROOT / "deploy" / "redis" / "redis.conf") as server:
                single.append(await measure(server.url, [server.port], args.jobs, args.shards))
                if r == 0:
                    flush([server.port])
                    idle_single = await idle_rate(
                        server.url, [server.port], args.shards, args.idle_seconds
                    )
            with start_cluster(Path(tmp) / f"c{r}", masters=3, replicas=0) as c:
                masters = c.masters()
                cluster.append(await measure(c.url, masters, args.jobs, args.shards))
                if r == 0:
                    c.flushall()
                    idle_cluster = await idle_rate(c.url, masters, args.shards, args.idle_seconds)
    print(f"{args.jobs} one-action enrollments per run, {args.repeats} runs, one worker, "
          f"CAMPAIGN_SHARDS={args.shards}, poll_delay=0.01 s, max_jobs=50")  # fmt: skip
    print("| Redis | steps/s (median) | runs | commands/step | of which EVALSHA | spread over "
          "masters | idle worker, commands/s |")  # fmt: skip
    print("|---|--:|---|--:|--:|---|--:|")
    for name, runs, idle in (("one server", single, idle_single),
                             ("cluster, 3 masters", cluster, idle_cluster)):  # fmt: skip
        rates = [r for r, _, _, _ in runs]
        per_step = statistics.median(c for _, c, _, _ in runs)
        scripts = statistics.median(e for _, _, _, e in runs)
        last = runs[-1][2]
        spread = ", ".join(f"{100 * x / sum(last):.0f} %" for x in last)
        print(f"| {name} | {statistics.median(rates):,.0f} | "
              f"{', '.join(f'{x:,.0f}' for x in rates)} | {per_step:.1f} | {scripts:.2f} | {spread} | {idle:,.0f} |")  # fmt: skip
    print(_cpu_line(args.repeats))


def _cpu_line(repeats: int) -> str:
    single = [CPU_PER_STEP[i] for i in range(0, 2 * repeats, 2)]
    cluster = [CPU_PER_STEP[i] for i in range(1, 2 * repeats, 2)]
    one, many = statistics.median(single), statistics.median(cluster)
    return (f"Redis main-thread CPU per step (enroll + claim + finish): one server "
            f"{one * 1e6:.0f} us ({1 / one:,.0f} steps/s per Redis core), cluster "
            f"{many * 1e6:.0f} us summed over the masters ({1 / many:,.0f} steps/s per core)")  # fmt: skip


if __name__ == "__main__":
    t = time.perf_counter()
    asyncio.run(main())
    print(f"({time.perf_counter() - t:.0f} s)")
