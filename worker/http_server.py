"""The HTTP server beside each worker: ``/livez``, ``/readyz`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from app.settings import ConfigError
from worker.health import Health

__all__ = ["HealthServer", "bind_error", "build_app"]

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[None]]


def build_app(
    health: Health,
    registry: CollectorRegistry,
    redis_probe: Probe | None = None,
    before_scrape: Callable[[], Awaitable[None]] | None = None,
) -> web.Application:
    """The aiohttp application; ``redis_probe`` raises when Redis does not answer."""

    async def livez(_: web.Request) -> web.Response:
        # Answering at all proves the process and its event loop are alive. Dependencies
        # are deliberately not checked here: a Redis outage must not cause restart storms.
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        reason = health.not_ready_reason()
        if reason is None and redis_probe is not None:
            try:
                await asyncio.wait_for(redis_probe(), 1.0)
            except Exception as exc:
                reason = f"redis unreachable: {type(exc).__name__}: {exc}"
        if reason is not None:
            return web.json_response({"status": "unavailable", "reason": reason}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics_handler(request: web.Request) -> web.Response:
        if before_scrape is not None:
            try:
                await before_scrape()
            except Exception:
                log.warning("refreshing metrics before scrape failed", exc_info=True)
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    app = web.Application()
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    return app


def bind_error(
    host: str,
    port: int,
    exc: BaseException,
    variables: tuple[str, str] = ("CAMPAIGN_HTTP_HOST", "CAMPAIGN_HTTP_PORT"),
) -> str:
    """One line naming the variable to fix when ``host:port`` cannot be listened on."""
    host_var, port_var = variables
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        variable = host_var
        reason = f"cannot resolve it ({exc.strerror or 'unknown name'})"
    elif not isinstance(exc, OSError):
        variable = host_var
        reason = "not a valid address"
    elif exc.errno == errno.EADDRINUSE:
        variable = port_var
        reason = "address already in use (another process listens there)"
    elif exc.errno == errno.EACCES:
        variable = port_var
        reason = "permission denied (ports below 1024 need privileges)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        variable = host_var
        reason = "not an address of this machine"
    else:
        variable = f"{host_var}/{port_var}"
        reason = exc.strerror or type(exc).__name__
    return f"{variable}: cannot listen on {where}: {reason}"


class HealthServer:
    """Runs an aiohttp application on host:port inside the current event loop (the worker's
    health server, the control API)."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        variables: tuple[str, str] = ("CAMPAIGN_HTTP_HOST", "CAMPAIGN_HTTP_PORT"),
        shutdown_timeout: float = 10.0,
    ) -> None:
        # aiohttp waits up to shutdown_timeout for requests in flight at stop (its default,
        # 60 s, outlives Kubernetes' 30 s grace period)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
        )
        self._host = host
        self._port = port
        self._variables = variables
        self.port: int | None = None

    async def start(self) -> None:
        """Listen; a host or port that cannot be bound raises :class:`ConfigError` (one line)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except (OSError, OverflowError, UnicodeError, ValueError) as exc:
            await self._runner.cleanup()
            raise ConfigError(bind_error(self._host, self._port, exc, self._variables)) from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("http server listening", extra={"host": self._host, "port": self.port})

    async def stop(self) -> None:
        await self._runner.cleanup()
