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
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import arq.worker
from arq.connections import ArqRedis
from arq.cron import CronJob
from arq.worker import Function, Worker, func
from redis.asyncio.cluster import RedisCluster

from app import __version__, serialization
from app.connection import (
    arq_redis,
    check_shard_count,
    create_redis,
    is_cluster,
    open_redis,
    retarget,
    wait_for_redis,
)
from app.connection import (
    close_redis as close_client,
)
from app.models import State
from app.settings import ConfigError, Settings
from worker.engine import StepEngine
from worker.health import Health
from worker.http_server import HealthServer, build_app
from worker.instrument import instrument, instrument_all
from worker.metrics import metrics, prime
from worker.queue_stats import QueueStats
from worker.redis_errors import is_redis_error

__all__ = ["Runtime", "arq_worker_options", "check_eviction_policy", "run_worker", "worker_options"]

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
    if is_cluster(redis):  # every master holds data: each must refuse rather than evict
        per_node = await redis.info("memory", target_nodes=RedisCluster.PRIMARIES)
        policies = {str(i.get("maxmemory_policy", "unknown")) for i in per_node.values()}
        policy = next(iter(policies)) if len(policies) == 1 else ",".join(sorted(policies))
    else:
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


class Runtime:
    """What a worker process runs beside arq's ``Worker``: the health and metrics server,
    the start-up checks, and the step engine. ``campaign-worker run`` (:func:`run_worker`)
    and arq's own CLI (:func:`arq_worker_options`) both drive it."""

    def __init__(
        self,
        settings: Settings,
        campaign_functions: Mapping[str, Callable[..., Awaitable[Any]]] | None = None,
    ) -> None:
        self.settings = settings
        self.health = Health(poll_delay=settings.poll_delay)
        #: The campaign data's client: one server's, or a cluster's once :meth:`prepare`
        #: found one; ``arq`` is arq's connection (the same on one server).
        self.redis = create_redis(settings)
        self.arq = self.redis
        self.stats = QueueStats(self.redis, settings)
        self.worker_id = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self.server = HealthServer(
            build_app(self.health, metrics.registry, lambda: self.redis.ping(),
                      lambda: self.stats.refresh()),
            settings.http_host,
            settings.http_port,
        )  # fmt: skip
        self.engine_functions = {
            name: instrument(func(fn, name=name)).coroutine  # type: ignore[arg-type]
            for name, fn in (campaign_functions or {}).items()
        }
        self.engine: StepEngine | None = None
        self.engine_task: asyncio.Task[None] | None = None

    def ctx(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The ``ctx`` arq's jobs (and, with ``destination`` changed, the engine's) get."""
        return {**(extra or {}), "settings": self.settings, "worker_id": self.worker_id,
                "destination": self.settings.arq_queue, "campaign_redis": self.redis}  # fmt: skip

    async def start_server(self) -> None:
        """Serve /livez, /readyz and /metrics (readiness stays 503 until the engine runs)."""
        metrics.start_time.set(time.time())
        await self.server.start()

    async def wait_for_redis(self, stop: asyncio.Event | None = None) -> bool:
        """Wait for Redis with capped backoff, logging each attempt; False if stopped first."""

        def attempt(n: int, err: BaseException) -> None:
            self.health.redis_down(err)
            metrics.redis_up.set(0)
            log.warning(
                "waiting for redis at %s",
                self.settings.redacted_redis_url(),
                extra={"attempt": n, "error": repr(err)},
            )

        return await wait_for_redis(
            self.redis, backoff_max=self.settings.redis_backoff_max, stop=stop, on_attempt=attempt
        )

    async def prepare(self, arq_functions: Sequence[str], action_names: Sequence[str]) -> None:
        """With Redis answering: check it is fit for a job queue and prime the metrics.

        Raises :class:`ConfigError` when Redis holds another ``CAMPAIGN_SHARDS``.
        """
        self.health.polled()
        metrics.redis_up.set(1)
        redis = await open_redis(self.settings, self.redis)
        if redis is not self.redis:  # a Redis Cluster: its client, and arq's own connection
            self.redis = redis
            self.stats = QueueStats(redis, self.settings)
            self.arq = arq_redis(self.settings, redis)
            log.info("redis cluster mode", extra={"shards": self.settings.shards})
        await check_eviction_policy(self.redis)
        await check_shard_count(self.redis, self.settings, record=True)
        prime(metrics, [*self.engine_functions, *arq_functions], list(action_names),
              [s.value for s in State])  # fmt: skip
        metrics.info.labels(version=__version__).set(1)

    def start_engine(self, ctx: Mapping[str, Any], arq_functions: Sequence[str]) -> None:
        """Start claiming campaign jobs; ``ctx`` is arq's, after ``on_startup`` filled it."""
        engine_ctx = {**ctx, "destination": f"{self.settings.key_prefix}:queue",
                      "campaign_redis": self.redis}  # fmt: skip
        self.engine = StepEngine(self.settings, engine_ctx, self.engine_functions, self.health,
                                 self.worker_id)  # fmt: skip
        self.engine_task = asyncio.create_task(self.engine.run())
        self.health.worker_running = True
        log.info("worker started", extra={
            "worker_id": self.worker_id, "arq_queue": self.settings.arq_queue,
            "functions": [*self.engine_functions, *arq_functions],
        })  # fmt: skip

    async def stop_engine(self) -> None:
        """Stop claiming, give running steps ``CAMPAIGN_SHUTDOWN_GRACE``, hand back the rest."""
        self.health.draining = True
        engine, task = self.engine, self.engine_task
        if engine is None or task is None:
            return
        await engine.drain(self.settings.shutdown_grace)
        await _bounded(task, "the step loop")
        with contextlib.suppress(Exception):
            await self.redis.zrem(engine.keys.workers, self.worker_id)
        log.info("worker stopped", extra={"steps_started": engine.jobs_started})

    async def close(self, *, close_redis: bool = True) -> None:
        """Stop the HTTP server (and close Redis unless arq owns the connection)."""
        self.health.worker_running = False
        await self.server.stop()
        if close_redis:
            for client in {id(c): c for c in (self.redis, self.arq)}.values():
                with contextlib.suppress(Exception):
                    await close_client(client)

    async def recover(self) -> None:
        """After a Redis fault: on a cluster, let arq's next connections go to whichever
        master serves its slot now."""
        if self.arq is not self.redis:
            await retarget(self.arq)


def _create_worker(functions: Sequence[Function], cron_jobs: Sequence[CronJob],
                   **options: Any) -> Worker:  # fmt: skip
    """arq's ``Worker`` through ``arq.worker.create_worker``, looked up at call time: that is
    where sentry-sdk's arq integration (when on) wraps the job functions."""
    if cron_jobs:  # the integration iterates the cron jobs it is given: never pass None
        options["cron_jobs"] = list(cron_jobs)
    worker: Worker = arq.worker.create_worker({}, functions=list(functions), **options)
    return worker


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

    runtime = Runtime(settings, campaign_functions)
    await runtime.start_server()
    if ready is not None:
        ready(runtime.server)
    try:
        if not await runtime.wait_for_redis(stop):
            log.info("stopped before redis was reachable")
            return 0
        instrumented = instrument_all(functions)
        names = [f.name for f in instrumented]
        await runtime.prepare(names, list(ctx.get("action_names", [])) if ctx else [])
        started = asyncio.Event()

        async def startup_once(job_ctx: dict[str, Any]) -> None:
            # arq runs on_startup on every main(); we restart main() after a Redis fault.
            if not started.is_set():
                if on_startup is not None:
                    await on_startup(job_ctx)
                started.set()

        worker = _create_worker(
            instrumented, cron_jobs, redis_pool=runtime.arq, on_startup=startup_once,
            on_shutdown=on_shutdown, ctx=runtime.ctx(ctx), **worker_options(settings),
        )  # fmt: skip
        arq_task = asyncio.create_task(_supervise(worker, settings, stop, runtime.recover))
        started_task = asyncio.create_task(started.wait())
        stop_task = asyncio.create_task(stop.wait())
        await asyncio.wait({started_task, stop_task, arq_task}, return_when=asyncio.FIRST_COMPLETED)
        started_task.cancel()
        if not started.is_set():
            stop_task.cancel()
            await _close(worker, arq_task)
            return 0 if stop.is_set() else 1
        runtime.start_engine(worker.ctx, list(worker.functions))
        assert runtime.engine_task is not None
        await asyncio.wait({stop_task, runtime.engine_task}, return_when=asyncio.FIRST_COMPLETED)
        await runtime.stop_engine()
        await _close(worker, arq_task)
        return 0
    finally:
        await runtime.close()


def arq_worker_options(
    settings: Settings,
    functions: Sequence[Function | Callable[..., Any]],
    campaign_functions: Mapping[str, Callable[..., Awaitable[Any]]] | None = None,
    *,
    cron_jobs: Sequence[CronJob] = (),
    on_startup: Hook | None = None,
    on_shutdown: Hook | None = None,
    ctx: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``Worker`` keyword arguments under which arq's own ``Worker.run`` (``arq
    module.WorkerSettings``) runs the same worker as :func:`run_worker`.

    arq owns the loop, the Redis connection's lifetime and the signals there: the HTTP
    server, the checks and the step engine start in ``on_startup``, and the engine drains
    (``CAMPAIGN_SHUTDOWN_GRACE``) in ``on_shutdown``, which arq's ``close()`` runs after
    SIGTERM/SIGINT.
    """
    runtime = Runtime(settings, campaign_functions)
    instrumented = instrument_all(functions)
    names = [f.name for f in instrumented]
    action_names = list(ctx.get("action_names", [])) if ctx else []

    async def startup(job_ctx: dict[str, Any]) -> None:
        await runtime.start_server()
        try:
            # arq has just read INFO on this connection: Redis answers, no waiting here.
            await runtime.prepare(names, action_names)
        except ConfigError as exc:  # exit 2 with one line, as campaign-worker run does
            print(f"campaign-worker: configuration error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None  # out of arq's loop; its close() runs shutdown
        if on_startup is not None:
            await on_startup(job_ctx)
        runtime.start_engine(job_ctx, [*names, *(c.name for c in cron_jobs)])

    async def shutdown(job_ctx: dict[str, Any]) -> None:
        try:
            await runtime.stop_engine()
            if on_shutdown is not None:
                await on_shutdown(job_ctx)
        finally:
            await runtime.close(close_redis=False)  # arq closes its pool after this hook

    options = worker_options(settings)
    # arq's CLI has no other way to stop: let its handlers take SIGTERM/SIGINT.
    options["handle_signals"] = True
    return {
        **options,
        "functions": instrumented,
        "cron_jobs": list(cron_jobs),
        "redis_pool": runtime.redis,
        "on_startup": startup,
        "on_shutdown": shutdown,
        "ctx": runtime.ctx(ctx),
    }


async def _supervise(
    worker: Worker, settings: Settings, stop: asyncio.Event,
    recover: Callable[[], Awaitable[None]] | None = None,
) -> None:  # fmt: skip
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
        await _wait_for_arq_redis(worker, settings, stop, recover)


async def _wait_for_arq_redis(
    worker: Worker, settings: Settings, stop: asyncio.Event,
    recover: Callable[[], Awaitable[None]] | None,
) -> None:  # fmt: skip
    """PING arq's connection until it answers; before each try, ``recover`` (on a cluster
    the slot map may only show the promoted replica a few seconds after the fault)."""
    delay = 0.1
    while not stop.is_set():
        if recover is not None:
            await recover()
        try:
            await worker.pool.ping()
            return
        except Exception as exc:
            if not is_redis_error(exc):
                raise
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
        delay = min(delay * 2, settings.redis_backoff_max)


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
    await _bounded(arq_task, "arq's loop")
    # close() cancels what still runs and waits for arq to re-queue it.
    await _bounded(worker.close(), "arq's close()")
    # arq's close() runs on_shutdown only after a Redis call that fails when Redis is down
    # or read-only: make sure our resources (the HTTP session) are released anyway.
    if worker.on_shutdown is not None and not worker.ctx.get("shutdown_done"):
        with contextlib.suppress(Exception):
            await worker.on_shutdown(worker.ctx)


#: Seconds a step of the shutdown may take once the drain is over: a process asked to stop
#: must stop, even if a library call never returns.
CLOSE_TIMEOUT = 10.0


async def _bounded(awaitable: Awaitable[Any], what: str) -> None:
    """Await ``awaitable`` for at most :data:`CLOSE_TIMEOUT` seconds, errors logged."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await awaitable
    except TimeoutError:
        log.warning("%s did not finish within %ss; exiting anyway", what, CLOSE_TIMEOUT)
    except (asyncio.CancelledError, Exception):  # noqa: S110 - a stop must not fail on it
        pass


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    if stop.is_set():
        log.warning("second %s: exiting without waiting", sig.name)
        raise SystemExit(0)
    log.info("%s received: draining", sig.name)
    stop.set()
