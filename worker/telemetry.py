"""OpenTelemetry set-up from the standard ``OTEL_*`` variables, and the consumer span.

Tracing is on when an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER`` names an exporter, and
``OTEL_SDK_DISABLED`` is not true. Spans go over OTLP/HTTP protobuf (port 4318, what Jaeger
accepts). When off, the API's no-op tracer makes every span call nearly free.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import INVALID_SPAN, Link, Span, SpanKind, Status, StatusCode

from app.settings import ConfigError
from app.tracing import MESSAGING_SYSTEM, tracer
from app.tracing import enabled as tracing_enabled
from app.tracing import refresh as refresh_tracing

__all__ = [
    "check_otel_env",
    "consumer_span",
    "mark_error",
    "setup_tracing",
    "shutdown_tracing",
]

log = logging.getLogger("worker.telemetry")

_provider: Any = None


def tracing_requested(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces to be exported."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


#: The numeric ``OTEL_*`` variables the SDK's tracer provider, batch span processor and
#: OTLP/HTTP exporter read, with the range accepted here: (low, high, whole number).
#: Out of range, the SDK raises (a traceback) or silently falls back to a default.
OTEL_NUMBERS: dict[str, tuple[float, float, bool]] = {
    "OTEL_BSP_SCHEDULE_DELAY": (1, 3_600_000, True),  # milliseconds
    "OTEL_BSP_EXPORT_TIMEOUT": (1, 3_600_000, True),  # milliseconds
    "OTEL_BSP_MAX_QUEUE_SIZE": (1, 10_000_000, True),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": (1, 10_000_000, True),
    "OTEL_EXPORTER_OTLP_TIMEOUT": (0.001, 3600, False),  # seconds in the Python SDK
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": (0.001, 3600, False),
    "OTEL_ATTRIBUTE_COUNT_LIMIT": (0, 1_000_000, True),
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": (0, 100_000_000, True),
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": (0, 1_000_000, True),
    "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": (0, 100_000_000, True),
    "OTEL_SPAN_EVENT_COUNT_LIMIT": (0, 1_000_000, True),
    "OTEL_SPAN_LINK_COUNT_LIMIT": (0, 1_000_000, True),
    "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT": (0, 1_000_000, True),
    "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT": (0, 1_000_000, True),
}
#: The attribute limits also accept ``unset`` (no limit).
_UNSETTABLE = {name for name in OTEL_NUMBERS if name.endswith("_LIMIT")}
_RATIO_SAMPLERS = {"traceidratio", "parentbased_traceidratio"}


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def check_otel_env(env: Mapping[str, str] = os.environ) -> None:
    """Raise :class:`ConfigError` (one line naming the variable) for a bad numeric ``OTEL_*``.

    Checked before the SDK reads them: it would raise a traceback (a negative delay, a
    limit that is not a number) or log one and fall back to its default.
    """
    for name, (low, high, whole) in OTEL_NUMBERS.items():
        raw = env.get(name)
        if raw is None or (raw == "" and name.startswith("OTEL_EXPORTER_")):
            continue  # unset, or empty where the SDK treats empty as unset
        text = raw.strip()
        if name in _UNSETTABLE and text.lower() == "unset":
            continue
        kind = "a whole number" if whole else "a number"
        problem = f"{name}: must be {kind} from {_num(low)} to {_num(high)} (got {raw[:40]!r})"
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            raise ConfigError(problem) from None
        if not (math.isfinite(value) and low <= value <= high):
            raise ConfigError(problem)
    queue = env.get("OTEL_BSP_MAX_QUEUE_SIZE", "").strip() or "2048"
    batch = env.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "").strip() or "512"
    if int(batch) > int(queue):
        raise ConfigError(
            f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE: must not exceed OTEL_BSP_MAX_QUEUE_SIZE "
            f"({batch} > {queue})"
        )
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in _RATIO_SAMPLERS and "OTEL_TRACES_SAMPLER_ARG" in env:
        raw = env["OTEL_TRACES_SAMPLER_ARG"]
        try:
            rate = float(raw)
        except ValueError:
            rate = math.nan
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(
                f"OTEL_TRACES_SAMPLER_ARG: must be a ratio from 0 to 1 for {sampler} "
                f"(got {raw[:40]!r})"
            )


def setup_tracing(default_service_name: str = "campaign-worker") -> bool:
    """Install an SDK tracer provider if the environment asks for one; returns whether it did.

    Raises :class:`ConfigError` for a bad numeric ``OTEL_*`` variable (see
    :func:`check_otel_env`); nothing is installed then.
    """
    global _provider
    if _provider is not None or not tracing_requested():
        return _provider is not None
    check_otel_env()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if protocol != "http/protobuf":
        log.warning(
            "OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; using http/protobuf", protocol
        )
    attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service_name}
    provider = TracerProvider(resource=Resource.create(attrs))  # sampler from OTEL_TRACES_SAMPLER
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    refresh_tracing()
    _provider = provider
    log.info(
        "tracing on",
        extra={
            "exporter": "otlp-http",
            "service_name": provider.resource.attributes.get(SERVICE_NAME),
        },
    )
    return True


def shutdown_tracing() -> None:
    """Flush and stop the exporter (spans still buffered are sent)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def consumer_span(
    function: str,
    queue: str,
    job_id: str | None,
    job_try: int | None,
    lateness: float,
    carrier: Mapping[str, str] | None,
    *,
    link_only: bool,
) -> AbstractContextManager[Span]:
    """The CONSUMER span ``process <function>`` continuing the job's producer context.

    ``link_only`` starts a new trace linked to the producer instead of a child: used for
    wait timeouts, which fire hours or days after the span that scheduled them ended, and
    would otherwise stretch one trace over days with a long hole in it. With tracing off it
    is a no-op context (no span objects on the hot path).
    """
    if not tracing_enabled():
        return nullcontext(INVALID_SPAN)
    return _consumer_span(function, queue, job_id, job_try, lateness, carrier, link_only=link_only)


@contextmanager
def _consumer_span(
    function: str,
    queue: str,
    job_id: str | None,
    job_try: int | None,
    lateness: float,
    carrier: Mapping[str, str] | None,
    *,
    link_only: bool,
) -> Iterator[Span]:
    """The CONSUMER span ``process <function>`` continuing the job's producer context.

    ``link_only`` starts a new trace linked to the producer instead of a child: used for
    wait timeouts, which fire hours or days after the span that scheduled them ended, and
    would otherwise stretch one trace over days with a long hole in it.
    """
    parent = propagate.extract(dict(carrier)) if carrier else None
    links: list[Link] = []
    if link_only and parent is not None:
        producer = trace.get_current_span(parent).get_span_context()
        if producer.is_valid:
            links.append(Link(producer, {"campaign.link": "wait started"}))
        parent = otel_context.Context()
    attributes: dict[str, Any] = {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": queue,
        "campaign.job.lateness_seconds": round(lateness, 6),
    }
    if job_id:
        attributes["messaging.message.id"] = job_id
    if job_try is not None:
        attributes["messaging.arq.job_try"] = job_try
    with tracer.start_as_current_span(
        f"process {function}", context=parent, kind=SpanKind.CONSUMER, links=links,
        attributes=attributes, record_exception=True, set_status_on_exception=True,
    ) as span:  # fmt: skip
        yield span


def mark_error(span: Span, exc: BaseException | None = None, description: str = "") -> None:
    """Error status on a span, with the exception recorded and ``error.type`` set."""
    if exc is not None:
        span.record_exception(exc)
        span.set_attribute("error.type", type(exc).__name__)
        description = description or f"{type(exc).__name__}: {exc}"
    span.set_status(Status(StatusCode.ERROR, description[:500]))
