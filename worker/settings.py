"""``arq worker.settings.WorkerSettings``: the campaign worker started by arq's own CLI.

It runs what ``campaign-worker run`` runs (the step engine, ``ping``, the reconciler and
maintenance crons, the health and metrics server, a drain on SIGTERM), with the settings
read from the environment when this module is imported. A bad setting prints one line and
exits 2, as ``campaign-worker run`` does.

What differs, because arq's CLI owns the process:

- Redis must answer at start (arq reads ``INFO`` before any hook runs), and a Redis fault
  while running ends the process (arq issue #435) rather than pausing it; run it under a
  supervisor that restarts it. ``campaign-worker run`` waits and survives both.
- arq handles the signals: a second SIGTERM does not cut the drain short.
- arq prints its own first lines (functions, Redis version) in its own format before the
  worker's JSON logging takes over in ``on_startup``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any
from urllib.parse import urlsplit

from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from app.settings import ConfigError, Settings, get_settings
from worker.actions import default_registry, egress_policy
from worker.error_tracking import init_error_tracking, shutdown_error_tracking
from worker.logs import configure_logging
from worker.main import campaign_functions, cron_jobs, functions, make_hooks
from worker.runtime import arq_worker_options
from worker.telemetry import check_otel_env, setup_tracing, shutdown_tracing

__all__ = ["WorkerSettings", "worker_settings"]


def worker_settings(settings: Settings) -> dict[str, Any]:
    """arq ``Worker`` keyword arguments for a campaign worker with ``settings``.

    Raises :class:`ConfigError` for a bad ``CAMPAIGN_ACTIONS``,
    ``CAMPAIGN_HTTP_ALLOWED_HOSTS``, ``OTEL_*`` number or ``SENTRY_DSN``.
    """
    actions = default_registry(settings.actions)
    egress_policy(settings)
    check_otel_env()
    # Now, not in on_startup: arq's create_worker, where sentry-sdk's arq integration wraps
    # the job functions, runs right after this import.
    init_error_tracking(settings)
    on_startup, on_shutdown = make_hooks(settings, actions)

    async def startup(ctx: dict[str, Any]) -> None:
        # arq's CLI configured logging after importing this module: take stdout back, in
        # one format, and let arq's lines go through it too.
        configure_logging(settings.log_level, settings.log_format)
        logging.getLogger("arq").handlers.clear()
        setup_tracing()
        await on_startup(ctx)

    async def shutdown(ctx: dict[str, Any]) -> None:
        try:
            await on_shutdown(ctx)
        finally:
            shutdown_tracing()
            shutdown_error_tracking()

    return arq_worker_options(
        settings, functions(settings), campaign_functions(), cron_jobs=cron_jobs(settings),
        on_startup=startup, on_shutdown=shutdown, ctx={"action_names": actions.names()},
    )  # fmt: skip


def _refuse_a_cluster(settings: Settings) -> None:
    """arq's CLI keeps one connection to the node in ``REDIS_URL``: on a Redis Cluster
    its own keys may live on another node. Checked before arq starts (its shutdown would
    fail on such a key), with a short synchronous probe: arq needs Redis up here anyway."""
    url = settings.redis_url.get_secret_value()
    if urlsplit(url).scheme not in {"redis", "rediss"}:
        return
    with contextlib.suppress(RedisError, OSError):  # down: arq reports it as it starts
        probe = SyncRedis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        try:
            info: dict[str, Any] = probe.info("cluster")  # type: ignore[assignment]
            enabled = int(info.get("cluster_enabled") or 0)
        finally:
            probe.close()
        if enabled:
            raise ConfigError(
                "REDIS_URL: a Redis Cluster; arq's CLI keeps one connection to one node, so "
                "run the worker with 'campaign-worker run' there"
            )


def _load() -> dict[str, Any]:
    try:
        settings = get_settings()
        _refuse_a_cluster(settings)
        return worker_settings(settings)
    except ConfigError as exc:
        print(f"campaign-worker: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


#: arq builds ``Worker(**vars(WorkerSettings))`` from the class attributes.
WorkerSettings = type("WorkerSettings", (), {
    "__doc__": "The campaign worker's arq settings: ``arq worker.settings.WorkerSettings``.",
    **_load(),
})  # fmt: skip
