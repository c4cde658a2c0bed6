"""The console at ``/ui/`` (placeholder until the pages land)."""

from __future__ import annotations

from aiohttp import web

from worker.api.routes import Api

__all__ = ["setup_console"]


def setup_console(app: web.Application, api: Api) -> None:
    """Add the console's routes to ``app``."""
    del app, api
