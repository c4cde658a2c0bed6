"""What ``campaign-worker run`` runs: the campaign jobs, wired to the runtime."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from arq.worker import func

from app.scheduling import STEP_FUNCTION, TIMEOUT_FUNCTION, SchedulingService
from app.settings import Settings
from worker.actions import ActionRegistry, default_registry
from worker.diagnostics import ping
from worker.metrics import metrics
from worker.processors import fire_timeout, run_step
from worker.runtime import run_worker
from worker.telemetry import setup_tracing, shutdown_tracing

__all__ = ["functions", "make_hooks", "run"]

log = logging.getLogger("worker.transitions")


def functions(settings: Settings) -> list[Any]:
    """The arq functions a campaign worker serves."""
    return [
        func(run_step, name=STEP_FUNCTION),
        func(fire_timeout, name=TIMEOUT_FUNCTION),
        func(ping, name="ping", max_tries=1),
    ]


def _log_transition(enrollment_id: str, entry: dict[str, Any]) -> None:
    metrics.transitions.labels(to_state=entry["to"]).inc()
    log.info(
        "transition",
        extra={"enrollment_id": enrollment_id, "from_state": entry.get("from"),
               "to_state": entry["to"], "node": entry.get("node"), "step": entry.get("step"),
               "reason": entry.get("reason")},
    )  # fmt: skip


def make_hooks(settings: Settings, actions: ActionRegistry) -> tuple[Any, Any]:
    """arq ``on_startup``/``on_shutdown``: the scheduling service and the shared HTTP session."""

    async def on_startup(ctx: dict[str, Any]) -> None:
        service = SchedulingService(ctx["redis"], settings)
        service.on_transition = _log_transition
        ctx["service"] = service
        ctx["actions"] = actions
        ctx["http"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(settings.max_jobs, 10))
        )

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        ctx["shutdown_done"] = True
        session = ctx.pop("http", None)
        if session is not None:
            await session.close()

    return on_startup, on_shutdown


async def run(settings: Settings) -> int:
    """Run the worker until SIGTERM; returns the exit code."""
    actions = default_registry(settings.actions)
    on_startup, on_shutdown = make_hooks(settings, actions)
    setup_tracing()
    try:
        return await run_worker(
            settings, functions(settings), on_startup=on_startup, on_shutdown=on_shutdown,
            ctx={"action_names": actions.names()},
        )  # fmt: skip
    finally:
        shutdown_tracing()
