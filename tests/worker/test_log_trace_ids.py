"""Log lines written inside a span carry its trace and span ids, so logs join traces."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from opentelemetry.sdk.trace import TracerProvider

from app import CampaignClient
from app.models import State
from app.settings import Settings
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from tests.stand_ins import Receiver
from tests.worker.test_processors import campaign, http, wait_state
from worker.embedded_redis import EmbeddedRedis
from worker.logs import JsonFormatter, TextFormatter


def _record(msg: str = "hello") -> logging.LogRecord:
    return logging.LogRecord("worker.test", logging.INFO, __file__, 1, msg, (), None)


def test_formatters_add_the_current_span_ids() -> None:
    tracer = TracerProvider().get_tracer("test")  # a provider of its own: no global state
    outside = orjson.loads(JsonFormatter().format(_record()))
    assert "trace_id" not in outside and "span_id" not in outside
    with tracer.start_as_current_span("outer") as span:
        ctx = span.get_span_context()
        doc = orjson.loads(JsonFormatter().format(_record()))
        text = TextFormatter().format(_record())
    assert doc["trace_id"] == f"{ctx.trace_id:032x}" and len(doc["trace_id"]) == 32
    assert doc["span_id"] == f"{ctx.span_id:016x}" and len(doc["span_id"]) == 16
    assert text.endswith(f"trace_id={doc['trace_id']}")
    assert "trace_id" not in TextFormatter().format(_record())


async def test_a_step_log_line_names_its_exported_span(
    otlp: Receiver, svc: FakeService, redis_server: EmbeddedRedis, settings: Settings,
    redis: Any,
) -> None:  # fmt: skip
    worker = WorkerProcess(
        redis_server.url,
        **otlp.env(),
    ).start()
    try:
        await worker.wait_status("/readyz", 200)
        async with CampaignClient(settings=settings) as client:
            await client.register_campaign(campaign("logged", {"first": http("/ok", svc)}))
            eid = (await client.enroll("logged", "l1")).enrollment_id
            await wait_state(client, eid, State.COMPLETED)

        def started() -> dict[str, Any] | None:
            return next((d for d in worker.lines if d.get("msg") == "job started"
                         and d.get("enrollment_id") == eid), None)  # fmt: skip

        line = await eventually(lambda: _now(started()), what="the step's 'job started' line")

        def exported() -> dict[str, Any] | None:
            return next((s for s in otlp.spans if s["name"] == "process run_step"
                         and s["attrs"].get("campaign.enrollment_id") == eid), None)  # fmt: skip

        span = await eventually(lambda: _now(exported()), 15, what="the step's span exported")
    finally:
        assert worker.stop() == 0
    assert line["trace_id"] == span["trace_id"]
    assert line["span_id"] == span["span_id"]  # "job started" is logged in the consumer span
    # every line the job writes (its bound context has job_try) carries the trace; lines
    # outside any span carry none
    mine = [d for d in worker.lines if d.get("enrollment_id") == eid and "job_try" in d]
    assert mine and all(d.get("trace_id") == span["trace_id"] for d in mine), mine
    assert all("trace_id" not in d for d in worker.lines if d.get("msg") == "worker started")


async def _now(value: Any) -> Any:
    return value
