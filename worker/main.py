"""What ``campaign-worker run`` runs: every job function, wired to the runtime."""

from __future__ import annotations

from typing import Any

from arq.worker import func

from app.settings import Settings
from worker.diagnostics import ping
from worker.runtime import run_worker

__all__ = ["functions", "run"]


def functions(settings: Settings) -> list[Any]:
    """The arq functions a campaign worker serves."""
    return [func(ping, name="ping", timeout=120, max_tries=1)]


async def run(settings: Settings) -> int:
    """Run the worker until SIGTERM; returns the exit code."""
    return await run_worker(settings, functions(settings))
