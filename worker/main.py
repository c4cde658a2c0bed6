"""What ``campaign-worker run`` runs: the campaign jobs, wired to the runtime."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from arq.cron import CronJob
from arq.worker import func

from app.jobs import STEP_FUNCTION, TIMEOUT_FUNCTION
from app.scheduling import SchedulingService
from app.settings import Settings
from worker.actions import ActionRegistry, default_registry, egress_policy, make_http_session
from worker.diagnostics import ping
from worker.error_tracking import enabled as error_tracking_enabled
from worker.error_tracking import init_error_tracking, report_failure, shutdown_error_tracking
from worker.maintenance import maintenance_crons
from worker.metrics import metrics
from worker.processors import fire_timeout, run_step
from worker.reconciler import reconcile_cron
from worker.runtime import run_worker
from worker.telemetry import setup_tracing, shutdown_tracing

__all__ = ["campaign_functions", "cron_jobs", "functions", "make_hooks", "run", "serve"]

log = logging.getLogger("worker.transitions")


def functions(settings: Settings) -> list[Any]:
    """The arq functions a campaign worker serves on arq's own queue."""
    return [func(ping, name="ping", max_tries=1)]


def cron_jobs(settings: Settings) -> list[CronJob]:
    """The periodic jobs a campaign worker runs on arq's queue (one worker per tick)."""
    return [reconcile_cron(settings), *maintenance_crons(settings)]


def campaign_functions() -> dict[str, Any]:
    """The step engine's job functions, by name."""
    return {STEP_FUNCTION: run_step, TIMEOUT_FUNCTION: fire_timeout}


_CONTEXT = ("attempt", "job_id", "function", "campaign_id")


@functools.lru_cache(maxsize=16)
def _transitions_to(state: str) -> Any:
    return metrics.transitions.labels(to_state=state)


def _log_transition(enrollment_id: str, entry: dict[str, Any]) -> None:
    _transitions_to(entry["to"]).inc()
    if not log.isEnabledFor(logging.INFO):
        return
    extra = {"enrollment_id": enrollment_id, "from_state": entry.get("from"),
             "to_state": entry["to"], "node": entry.get("node"), "step": entry.get("step"),
             "reason": entry.get("reason")}  # fmt: skip
    extra.update((k, entry[k]) for k in _CONTEXT if k in entry)
    log.info("transition", extra=extra)


def _log_and_report(enrollment_id: str, entry: dict[str, Any]) -> None:
    _log_transition(enrollment_id, entry)
    if entry["to"] == "failed":
        report_failure(enrollment_id, entry)


def make_hooks(settings: Settings, actions: ActionRegistry) -> tuple[Any, Any]:
    """arq ``on_startup``/``on_shutdown``: the scheduling service (its transitions logged,
    counted, and failures reported to Sentry when it is on) and the shared HTTP session."""

    async def on_startup(ctx: dict[str, Any]) -> None:
        # ctx["redis"] is arq's connection; on a cluster the data has a client of its own.
        service = SchedulingService(ctx.get("campaign_redis") or ctx["redis"], settings)
        service.on_transition = _log_and_report if error_tracking_enabled() else _log_transition
        ctx["service"] = service
        ctx["actions"] = actions
        ctx["http"] = make_http_session(settings)

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        ctx["shutdown_done"] = True
        session = ctx.pop("http", None)
        if session is not None:
            await session.close()

    return on_startup, on_shutdown


async def serve(
    settings: Settings,
    actions: ActionRegistry,
    *,
    stop: asyncio.Event | None = None,
    install_signal_handlers: bool = True,
) -> int:
    """Run a campaign worker (step engine, arq maintenance jobs, HTTP server) until SIGTERM
    or ``stop``; returns the exit code."""
    on_startup, on_shutdown = make_hooks(settings, actions)
    return await run_worker(
        settings, functions(settings), campaign_functions(),
        cron_jobs=cron_jobs(settings), on_startup=on_startup, on_shutdown=on_shutdown,
        ctx={"action_names": actions.names()}, stop=stop,
        install_signal_handlers=install_signal_handlers,
    )  # fmt: skip


async def run(settings: Settings) -> int:
    """Run the worker until SIGTERM; returns the exit code."""
    actions = default_registry(settings.actions)
    egress_policy(settings)  # a bad CAMPAIGN_HTTP_ALLOWED_HOSTS stops here: exit 2, one line
    init_error_tracking(settings)  # so does SENTRY_DSN without sentry-sdk installed
    setup_tracing()
    try:
        return await serve(settings, actions)
    finally:
        shutdown_tracing()
        shutdown_error_tracking()
