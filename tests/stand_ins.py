"""Local HTTP stand-ins for what the processes under test export to: an OTLP/HTTP trace
collector (``otlp`` fixture) and a base for others (tests/worker/test_error_tracking.py's
Sentry)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from worker.embedded_redis import free_port

__all__ = ["HttpStandIn", "Receiver", "otlp"]


class HttpStandIn:
    """An aiohttp server on a free port of 127.0.0.1; subclasses add their routes."""

    def __init__(self) -> None:
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class Receiver(HttpStandIn):
    """An OTLP/HTTP collector: decodes ExportTraceServiceRequest protobufs into ``spans``."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict[str, Any]] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/traces", self.handle)

    def env(self) -> dict[str, str]:
        """The environment of a process that exports here, in batches of 50 ms."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
                "OTEL_BSP_SCHEDULE_DELAY": "50"}  # fmt: skip

    async def handle(self, request: web.Request) -> web.Response:
        req = ExportTraceServiceRequest()
        req.ParseFromString(await request.read())
        for rs in req.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}.get(
                "service.name"
            )
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {a.key: _value(a.value) for a in s.attributes}
                    self.spans.append({
                        "name": s.name, "kind": s.kind, "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                        "attrs": attrs, "status": s.status.code, "service": service,
                        "links": [(ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links],
                        "events": [e.name for e in s.events],
                    })  # fmt: skip
        return web.Response(status=200)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture
async def otlp() -> AsyncIterator[Receiver]:
    """An OTLP/HTTP collector for the test's processes (``Receiver.env()``)."""
    r = Receiver()
    await r.start()
    yield r
    await r.stop()
