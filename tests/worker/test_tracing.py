"""Traces of a real campaign: an OTLP/HTTP receiver gets the spans of a real worker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app import CampaignClient
from app.models import State
from app.settings import Settings
from app.tracing import refresh as refresh_tracing
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from tests.stand_ins import Receiver
from tests.worker.test_processors import campaign, http, wait_state
from worker.embedded_redis import EmbeddedRedis
from worker.telemetry import tracing_requested

CLIENT_SPANS = InMemorySpanExporter()


@pytest.fixture(scope="module")
def client_tracing() -> Iterator[InMemorySpanExporter]:
    """The test process plays the API: its producer spans are kept in memory."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(CLIENT_SPANS))
        trace.set_tracer_provider(provider)
        refresh_tracing()
    yield CLIENT_SPANS


CONSUMER, PRODUCER, CLIENT = 5, 4, 3  # OTLP SpanKind enum values
ERROR = 2


async def test_one_enrollment_traced_end_to_end(
    client_tracing: InMemorySpanExporter, otlp: Receiver, svc: FakeService,
    redis_server: EmbeddedRedis, settings: Settings, redis: Any,
) -> None:  # fmt: skip
    worker = WorkerProcess(
        redis_server.url,
        **otlp.env(),
        OTEL_SERVICE_NAME="campaign-worker-test",
    ).start()
    try:
        await worker.wait_status("/readyz", 200)
        async with CampaignClient(settings=settings) as client:
            await client.register_campaign(campaign("traced", {
                "first": http("/ok", svc, "wait"),
                "wait": {"type": "wait", "event": "replied", "timeout": 0.2, "on_timeout": "last"},
                "last": http("/bad", svc),
            }))  # fmt: skip
            st = await client.enroll("traced", "t1")
            failed = await wait_state(client, st.enrollment_id, State.FAILED)
        eid = st.enrollment_id

        def mine(name: str) -> list[dict[str, Any]]:
            return [
                s
                for s in otlp.spans
                if s["name"] == name and s["attrs"].get("campaign.enrollment_id") == eid
            ]

        await eventually(lambda: _ready(len(mine("process run_step")) >= 2 and mine("process fire_timeout")), 15,
                         what="worker spans exported")  # fmt: skip
    finally:
        assert worker.stop() == 0

    enroll_span = next(s for s in client_tracing.get_finished_spans()
                       if s.attributes and s.attributes.get("campaign.enrollment_id") == eid)  # fmt: skip
    assert enroll_span.name == f"create {settings.key_prefix}:queue"
    assert enroll_span.kind == trace.SpanKind.PRODUCER
    assert enroll_span.attributes is not None
    assert enroll_span.attributes["messaging.message.id"] == f"step:{eid}:1:1"

    steps = sorted(mine("process run_step"), key=lambda s: s["attrs"]["campaign.step"])
    first, last = steps[0], steps[-1]
    # the first step continues the enroll call's trace (parent = the producer span)
    assert first["trace_id"] == f"{enroll_span.context.trace_id:032x}"
    assert first["parent"] == f"{enroll_span.context.span_id:016x}"
    assert first["kind"] == CONSUMER and first["service"] == "campaign-worker-test"
    attrs = first["attrs"]
    assert attrs["messaging.system"] == "arq"
    assert attrs["messaging.operation.type"] == "process"
    assert attrs["messaging.destination.name"] == f"{settings.key_prefix}:queue"
    assert attrs["messaging.message.id"] == f"step:{eid}:1:1"
    assert attrs["campaign.id"] == "traced" and attrs["campaign.node"] == "first"
    assert attrs["campaign.step"] == 1 and attrs["campaign.attempt"] == 1
    assert attrs["campaign.job.lateness_seconds"] >= 0
    # the action and its HTTP call are children of the consumer span
    action = next(
        s for s in otlp.spans if s["name"] == "action http" and s["parent"] == first["span_id"]
    )
    post = next(s for s in otlp.spans if s["name"] == "POST" and s["parent"] == action["span_id"])
    assert post["kind"] == CLIENT and post["attrs"]["http.response.status_code"] == 200
    assert svc.calls_for(eid)[0].headers["traceparent"].split("-")[1] == first["trace_id"]
    # the worker's own enqueue (first -> wait) is a producer span inside the consumer span
    advance = next(
        s for s in otlp.spans if s["kind"] == PRODUCER and s["parent"] == first["span_id"]
    )
    assert advance["attrs"]["messaging.message.id"] == f"timeout:{eid}:2"
    # the timeout fires long after: a new trace, linked to the span that scheduled it
    timeout = mine("process fire_timeout")[0]
    assert timeout["links"] == [(advance["trace_id"], advance["span_id"])]
    assert timeout["trace_id"] != first["trace_id"]
    # the failing step has error status and the exception recorded; the error keeps its trace id
    assert last["status"] == ERROR and last["attrs"]["campaign.job.outcome"] == "failed"
    failing_action = next(
        s for s in otlp.spans if s["name"] == "action http" and s["parent"] == last["span_id"]
    )
    assert failing_action["status"] == ERROR and "exception" in failing_action["events"]
    assert failed.error is not None and failed.error.trace_id == last["trace_id"]


def test_tracing_off_unless_configured() -> None:
    assert tracing_requested({}) is False
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}) is True
    assert (
        tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})
        is False
    )
    assert (
        tracing_requested(
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}
        )
        is False
    )


async def _ready(value: Any) -> Any:
    return value
