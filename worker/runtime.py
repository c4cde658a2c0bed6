"""Run a worker process: the step engine, arq's worker, and the HTTP server, supervised.

Campaign jobs (steps and wait timeouts) are claimed and finished by the step engine
(:mod:`worker.engine`); arq's ``Worker`` runs everything else (``ping``, the reconciler)
with its own functions, ``ctx``, hooks and cron. This module starts them, keeps arq's loop
up through Redis faults (arq lets them escape, issue #435), and drains on SIGTERM/SIGINT
within a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from arq.connections import ArqRedis
from arq.cron import CronJob
from arq.worker import Function, Worker, func

from app import __version__, serialization
from app.connection import create_redis, wait_for_redis
from app.keys import Keys
from app.models import State
from app.settings import ConfigError, Settings
from worker.engine import StepEngine
from worker.health import Health
from worker.http_server import HealthServer, build_app
from worker.instrument import instrument, instrument_all
from worker.metrics import metrics, prime
from worker.queue_stats import QueueStats
from worker.redis_errors import is_redis_error

__all__ = ["check_eviction_policy", "run_worker", "worker_options"]

log = logging.getLogger("worker.runtime")

Hook = Callable[[dict[str, Any]], Awaitable[None]]
#: arq's own queue holds only maintenance jobs: poll it calmly.
ARQ_POLL_DELAY = 0.5


def worker_options(settings: Settings) -> dict[str, Any]:
    """The arq ``Worker`` keyword arguments derived from settings."""
    return {
        "queue_name": settings.arq_queue,
        "max_jobs": 10,
        "job_timeout": settings.job_timeout,
        "keep_result": settings.keep_result,
        "poll_delay": max(settings.poll_delay, ARQ_POLL_DELAY),
        "max_tries": settings.max_tries,
        "job_serializer": serialization.dumps,
        "job_deserializer": serialization.loads,
        "expires_extra_ms": int(settings.job_expiry_extra * 1000),
        "handle_signals": False,
        "retry_jobs": True,
        "allow_abort_jobs": False,
        # Our own per-worker heartbeat and metrics replace arq's shared health key.
        "health_check_interval": 3600,
        "log_results": False,
    }


async def check_eviction_policy(redis: ArqRedis) -> str:
    """Warn loudly unless Redis runs with ``maxmemory-policy noeviction``.

    Uses INFO rather than CONFIG GET, which managed Redis services often disable.
    """
    info = await redis.info("memory")
    policy = str(info.get("maxmemory_policy", "unknown"))
    if policy != "noeviction":
        log.warning(
            "REDIS IS NOT SAFE FOR A JOB QUEUE: maxmemory-policy is %r, not 'noeviction'. "
            "Under memory pressure Redis will evict job keys and jobs will be LOST. "
            "Set 'maxmemory-policy noeviction' (see deploy/redis/redis.conf).",
            policy,
            extra={"maxmemory_policy": policy},
        )
    return policy


async def check_shard_count(redis: ArqRedis, settings: Settings) -> None:
    """Record ``CAMPAIGN_SHARDS`` at first start; refuse another count later, which would
    look for enrollments in the wrong shards."""
    key = Keys(settings.key_prefix).shard_count
    await redis.set(key, settings.shards, nx=True)
    raw = await redis.get(key)
    recorded = raw.decode("utf-8", "replace") if raw is not None else str(settings.shards)
    if recorded != str(settings.shards):
        raise ConfigError(
            f"CAMPAIGN_SHARDS: this Redis holds {recorded} shard(s) under prefix "
            f"{settings.key_prefix!r} (key {key}), not {settings.shards}"
        )


async def run_worker(
    settings: Settings,
    functions: Sequence[Function | Callable[..., Any]],
    campaign_functions: Mapping[str, Callable[..., Awaitable[Any]]] | None = None,
    *,
    cron_jobs: Sequence[CronJob] = (),
    on_startup: Hook | None = None,
    on_shutdown: Hook | None = None,
    ctx: dict[str, Any] | None = None,
    install_signal_handlers: bool = True,
    stop: asyncio.Event | None = None,
    ready: Callable[[HealthServer], None] | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or ``stop``); returns the process exit code.

    ``functions`` and ``cron_jobs`` run on arq's queue; ``campaign_functions`` (by job
    function name) are the step engine's.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, sig, stop)

    health = Health(poll_delay=settings.poll_delay)
    metrics.start_time.set(time.time())
    redis = create_redis(settings)
    worker_id = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
    server = HealthServer(
        build_app(health, metrics.registry, redis.ping, QueueStats(redis, settings).refresh),
        settings.http_host,
        settings.http_port,
    )
    await server.start()
    if ready is not None:
        ready(server)

    def attempt(n: int, err: BaseException) -> None:
        health.redis_down(err)
        metrics.redis_up.set(0)
        log.warning(
            "waiting for redis at %s",
            settings.redacted_redis_url(),
            extra={"attempt": n, "error": repr(err)},
        )

    try:
        if not await wait_for_redis(
            redis, backoff_max=settings.redis_backoff_max, stop=stop, on_attempt=attempt
        ):
            log.info("stopped before redis was reachable")
            return 0
        health.polled()
        metrics.redis_up.set(1)
        await check_eviction_policy(redis)
        await check_shard_count(redis, settings)

        instrumented = instrument_all(functions)
        engine_functions = {
            name: instrument(func(fn, name=name)).coroutine  # type: ignore[arg-type]
            for name, fn in (campaign_functions or {}).items()
        }
        prime(metrics, [*engine_functions, *(f.name for f in instrumented)],
              list(ctx.get("action_names", [])) if ctx else [], [s.value for s in State])  # fmt: skip
        metrics.info.labels(version=__version__).set(1)
        started = asyncio.Event()

        async def startup_once(job_ctx: dict[str, Any]) -> None:
            # arq runs on_startup on every main(); we restart main() after a Redis fault.
            if not started.is_set():
                if on_startup is not None:
                    await on_startup(job_ctx)
                started.set()

        worker = Worker(
            instrumented,
            redis_pool=redis,
            cron_jobs=list(cron_jobs) or None,
            on_startup=startup_once,  # type: ignore[arg-type]
            on_shutdown=on_shutdown,  # type: ignore[arg-type]
            ctx={
                **(ctx or {}),
                "settings": settings,
                "worker_id": worker_id,
                "destination": settings.arq_queue,
            },
            **worker_options(settings),
        )
        arq_task = asyncio.create_task(_supervise(worker, settings, stop))
        started_task = asyncio.create_task(started.wait())
        stop_task = asyncio.create_task(stop.wait())
        await asyncio.wait({started_task, stop_task, arq_task}, return_when=asyncio.FIRST_COMPLETED)
        started_task.cancel()
        if not started.is_set():
            stop_task.cancel()
            await _close(worker, arq_task)
            return 0 if stop.is_set() else 1
        engine_ctx = {**worker.ctx, "destination": f"{settings.key_prefix}:queue"}
        engine = StepEngine(settings, engine_ctx, engine_functions, health, worker_id)
        engine_task = asyncio.create_task(engine.run())
        health.worker_running = True
        log.info("worker started", extra={
            "worker_id": worker_id, "arq_queue": settings.arq_queue,
            "functions": [*engine_functions, *worker.functions],
        })  # fmt: skip
        await asyncio.wait({stop_task, engine_task}, return_when=asyncio.FIRST_COMPLETED)
        health.draining = True
        await engine.drain(settings.shutdown_grace)
        with contextlib.suppress(asyncio.CancelledError):
            await engine_task
        with contextlib.suppress(Exception):
            await redis.zrem(engine.keys.workers, worker_id)
        await _close(worker, arq_task)
        log.info("worker stopped", extra={"steps_started": engine.jobs_started})
        return 0
    finally:
        health.worker_running = False
        await server.stop()
        with contextlib.suppress(Exception):
            await redis.aclose()


async def _supervise(worker: Worker, settings: Settings, stop: asyncio.Event) -> None:
    """Run arq's loop; after a Redis fault (which ends it), wait for Redis and run it again."""
    failures = 0
    while not stop.is_set():
        try:
            await worker.main()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            if is_redis_error(exc):
                log.warning(
                    "arq loop stopped by a redis fault; restarting", extra={"error": repr(exc)}
                )
            else:
                log.exception("arq loop failed; restarting")
        await _forget_finished(worker)
        pause = min(0.1 * 2 ** min(failures, 10), settings.redis_backoff_max)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(pause):
                await stop.wait()
        await wait_for_redis(worker.pool, backoff_max=settings.redis_backoff_max, stop=stop)


async def _forget_finished(worker: Worker) -> None:
    """Before restarting arq's loop: drop finished job tasks (arq re-raises their errors on
    its next poll, which would end the new loop at once) and give back the job slots a
    failed start leaked (arq's ``start_jobs`` takes one before its Redis calls and never
    returns it when they fail). arq has no hook for either."""
    for job_id, task in list(worker.tasks.items()):
        if task.done():
            del worker.tasks[job_id]
            if not task.cancelled() and task.exception() is not None:
                log.info("arq job ended by the fault", extra={"job_id": job_id})
    running = len(worker.tasks)
    worker.job_counter = running
    worker.sem = asyncio.BoundedSemaphore(worker.max_jobs + 1)
    for _ in range(running):  # the running tasks give theirs back when they end
        await worker.sem.acquire()


async def _close(worker: Worker, arq_task: asyncio.Task[None]) -> None:
    worker.allow_pick_jobs = False
    running = [t for t in worker.tasks.values() if not t.done()]
    if running:
        await asyncio.wait(running, timeout=5)
    arq_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await arq_task
    # close() cancels what still runs and waits for arq to re-queue it.
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await worker.close()
    # arq's close() runs on_shutdown only after a Redis call that fails when Redis is down
    # or read-only: make sure our resources (the HTTP session) are released anyway.
    if worker.on_shutdown is not None and not worker.ctx.get("shutdown_done"):
        with contextlib.suppress(Exception):
            await worker.on_shutdown(worker.ctx)


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    if stop.is_set():
        log.warning("second %s: exiting without waiting", sig.name)
        raise SystemExit(0)
    log.info("%s received: draining", sig.name)
    stop.set()
