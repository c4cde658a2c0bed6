"""A request's trace: the API's SERVER span continues the caller's traceparent, and the
worker's step spans join the same trace."""

from __future__ import annotations

from app.settings import Settings
from tests.campaigns import reply_timeout
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from tests.stand_ins import Receiver
from tests.worker.api.conftest import ApiProcess

SERVER = 2  # OTLP SpanKind


async def test_an_enrollment_made_over_http_is_one_trace_from_caller_to_worker(
    settings: Settings, client: object, svc: FakeService, otlp: Receiver
) -> None:
    del client  # (it empties the private Redis)
    url = settings.redis_url.get_secret_value()
    otel = otlp.env()
    api = await ApiProcess(url, OTEL_SERVICE_NAME="api-test", **otel).start()
    worker = WorkerProcess(url, OTEL_SERVICE_NAME="worker-test", **otel).start()
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        assert (await api.call("POST", "/v1/campaigns", reply_timeout(svc))).status == 201
        enrolled = await api.call(
            "POST", "/v1/campaigns/rt/enrollments", {"contact_id": "traced"},
            headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"},
        )  # fmt: skip
        assert enrolled.status == 201

        def in_trace(service: str) -> list[dict[str, object]]:
            return [x for x in otlp.spans
                    if x["trace_id"] == caller_trace and x["service"] == service]  # fmt: skip

        async def both_sides() -> bool:
            return bool(in_trace("api-test")) and len(in_trace("worker-test")) >= 1

        await eventually(both_sides, 30, 0.05, "spans of the API and the worker in one trace")
        server = next(x for x in in_trace("api-test") if x["kind"] == SERVER)
        assert server["name"] == "POST /v1/campaigns/{campaign_id}/enrollments"
        assert server["parent"] == caller_span
        assert server["attrs"]["http.route"] == "/v1/campaigns/{campaign_id}/enrollments"
        assert server["attrs"]["http.response.status_code"] == 201
        # the client's own spans (enroll) are children inside the API process
        assert any(x["parent"] == server["span_id"] for x in in_trace("api-test"))
        # ids never become span names
        assert all("traced" not in str(x["name"]) for x in otlp.spans)
    finally:
        assert worker.stop() == 0
        assert api.stop() == 0
