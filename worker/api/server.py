"""``campaign-worker api``: the aiohttp application and the process around it.

Open without a token: ``/openapi.json``, ``/livez``, ``/readyz``, ``/metrics`` and the
console's login page. ``/v1/...`` needs a bearer token, ``/ui/...`` a console session.
Every request is counted and timed (``campaign_api_requests_total``,
``campaign_api_request_duration_seconds``, labelled by route template, never by id) and
traced as a SERVER span continuing the caller's ``traceparent``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from redis.exceptions import RedisError

from app.client import CampaignClient
from app.connection import REDIS_DOWN_ERRORS
from app.errors import CampaignError, EnrollManyError, InvalidRequest
from app.settings import ConfigError, Settings
from worker.api.auth import Tokens
from worker.api.openapi import openapi_document
from worker.api.problems import Problem, from_campaign_error
from worker.api.routes import API_KEY, OPERATIONS, Api, bind
from worker.http_server import HealthServer

__all__ = ["ApiMetrics", "build_api", "run_api"]

log = logging.getLogger("worker.api")
tracer = trace.get_tracer("campaign_scheduler.api")

#: Bodies above this are refused with 413 before they are read whole: the console's forms
#: (each /v1 operation reads its body up to its own limit: routes.body_limit).
FORM_BODY_BYTES = 64 * 1024


class ApiMetrics:
    """The API's own series, in their own registry (served on its ``/metrics``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "campaign_api_requests",
            "Control API requests by method, route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "campaign_api_request_duration_seconds",
            "Control API request handling time by method and route template",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )


def _route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched"  # never the raw path: ids must not become label values
    return resource.canonical


def _problem_for(exc: BaseException) -> Problem | None:
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, EnrollManyError) and not isinstance(exc, InvalidRequest):
        redis = isinstance(exc.__cause__, (RedisError, *REDIS_DOWN_ERRORS))
        return Problem(503 if redis else 500, "Unavailable" if redis else "CampaignError",
                       str(exc), headers={"Retry-After": "1"} if redis else None,
                       enrolled=exc.enrolled)  # fmt: skip
    if isinstance(exc, ConfigError):
        return Problem(500, "ConfigError", str(exc))
    if isinstance(exc, CampaignError):
        return from_campaign_error(exc)
    if isinstance(exc, (*REDIS_DOWN_ERRORS, RedisError)):
        return Problem(
            503, "Unavailable", f"redis unreachable or refusing: {type(exc).__name__}",
            headers={"Retry-After": "1"},
        )  # fmt: skip
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return Problem(413, "TooLarge", f"the body is larger than this operation takes: {exc.text}")
    if isinstance(exc, web.HTTPNotFound):
        return Problem(404, "NotFound", "no such path (see /openapi.json)")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return Problem(405, "MethodNotAllowed", f"allowed here: {allowed}",
                       headers={"Allow": allowed})  # fmt: skip
    return None


def _middleware(metrics: ApiMetrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = _route_of(request)
        start = time.perf_counter()
        token = otel_context.attach(propagate.extract(request.headers))
        status = 500
        try:
            with tracer.start_as_current_span(
                f"{request.method} {route}", kind=SpanKind.SERVER,
                # the route template, not the path: span names and attributes stay
                # low-cardinality, as metric labels (the client's spans name the enrollment)
                attributes={"http.request.method": request.method, "http.route": route,
                            "url.scheme": request.scheme},
            ) as span:  # fmt: skip
                try:
                    response = await handler(request)
                except web.HTTPException as exc:
                    problem = _problem_for(exc) if not request.path.startswith("/ui") else None
                    if problem is None:
                        raise
                    response = problem.response()
                except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:
                    problem = _problem_for(exc)
                    if problem is None:
                        log.exception("request failed", extra={"route": route})
                        problem = Problem(
                            500, "InternalError", "an unexpected error; see the API's log"
                        )
                    response = problem.response()
                status = response.status
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            otel_context.detach(token)
            metrics.requests.labels(request.method, route, str(status)).inc()
            metrics.duration.labels(request.method, route).observe(time.perf_counter() - start)

    return middleware


def build_api(client: CampaignClient, settings: Settings, tokens: Tokens,
              metrics: ApiMetrics | None = None) -> web.Application:  # fmt: skip
    """The application: ``/v1`` operations, ``/openapi.json``, probes, metrics, console."""
    from app import __version__
    from worker.api.console import setup_console

    metrics = metrics or ApiMetrics()
    app = web.Application(middlewares=[_middleware(metrics)], client_max_size=FORM_BODY_BYTES)
    api = Api(client, settings, tokens)
    app[API_KEY] = api
    for op in OPERATIONS:
        if op.method == "GET":  # HEAD too, as for any GET
            app.router.add_get(op.path, bind(op, api), name=op.operation_id)
        else:
            app.router.add_route(op.method, op.path, bind(op, api), name=op.operation_id)
    document = orjson.dumps(openapi_document(__version__))

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    async def livez(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        try:
            await client.connect()
            await asyncio.wait_for(client.redis.ping(), 1.0)
        except Exception as exc:
            reason = f"redis unreachable: {type(exc).__name__}: {str(exc)[:200]}"
            return web.json_response({"status": "unavailable", "reason": reason}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics_handler(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        resp = web.Response(body=encoder(metrics.registry))
        resp.headers["Content-Type"] = content_type
        return resp

    async def root(_: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/", root)
    setup_console(app, api)
    return app


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a NUL in a header) as an error with a
    traceback; that is the caller's mistake, answered 400: one line at INFO instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"malformed request refused: {str(exc).splitlines()[0][:200]}"
            record.args = ()
        return True


def load_tokens(settings: Settings) -> Tokens:
    """The tokens, or ConfigError (exit 2) naming CAMPAIGN_API_TOKENS when there are none."""
    text = settings.api_tokens.get_secret_value() if settings.api_tokens else ""
    tokens = Tokens(text)
    if not len(tokens):
        raise ConfigError(
            "CAMPAIGN_API_TOKENS: no token configured; the API refuses to start without one "
            "(set it to one or more comma-separated tokens, ro:TOKEN for read-only)"
        )
    return tokens


async def run_api(settings: Settings, *, stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); returns the exit code."""
    from worker.telemetry import setup_tracing, shutdown_tracing

    tokens = load_tokens(settings)
    setup_tracing("campaign-api")
    logging.getLogger("aiohttp.server").addFilter(_MalformedRequests())
    client = CampaignClient(settings=settings)
    server = HealthServer(build_api(client, settings, tokens), settings.api_host, settings.api_port,
                          variables=("CAMPAIGN_API_HOST", "CAMPAIGN_API_PORT"))  # fmt: skip
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        log.info("control API listening", extra={"host": settings.api_host, "port": server.port,
                                                  "tokens": len(tokens)})  # fmt: skip
        await stop.wait()
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
        await client.close()
        shutdown_tracing()
