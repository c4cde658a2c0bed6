"""The control API against a real Redis: the contract's endpoints, errors and pages, and
the whole reply/timeout campaign driven only through HTTP with a real worker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from app.client import CampaignClient
from app.jobs import JobTarget
from app.models import State
from app.settings import Settings
from tests.campaigns import reply_timeout
from tests.conftest import subprocess_env
from tests.fake_service import FakeService
from tests.helpers import WorkerProcess, eventually
from tests.queue_view import claim_one
from tests.worker.api.conftest import RO, RW, ApiCaller, ApiProcess, Reply
from worker.api.problems import CONTENT_TYPE
from worker.api.routes import OPERATIONS


def assert_problem(reply: Reply, status: int, title: str, *needles: str) -> dict[str, Any]:
    """An RFC 9457 body with that status and title whose detail names each needle."""
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["Content-Type"].startswith(CONTENT_TYPE), reply.headers
    body = reply.body
    assert isinstance(body, dict), body
    assert {"type", "title", "status", "detail"} <= body.keys(), body
    assert body["status"] == status and body["title"] == title, body
    assert body["type"].endswith(f":problem:{title}"), body
    for needle in needles:
        assert needle in body["detail"], (needle, body["detail"])
    return body


async def test_the_reply_timeout_campaign_driven_only_through_http(
    api: ApiCaller, settings: Settings, svc: FakeService
) -> None:
    # 3 s to reply: the replies below go out well within it, the others time out
    created = await api.post("/v1/campaigns", reply_timeout(svc, timeout=3))
    assert (created.status, created.body) == (201, {"id": "rt", "version": 1})
    one = await api.post("/v1/campaigns/rt/enrollments",
                         {"contact_id": "c-0", "timezone": "Europe/Berlin", "attributes": {"n": 0}})  # fmt: skip
    assert one.status == 201 and one.body["enrollment_id"] == "rt:c-0", one.body
    assert one.body["state"] == "scheduled" and one.body["timezone"] == "Europe/Berlin"
    batch = await api.post("/v1/campaigns/rt/enrollments/batch",
                           {"contacts": [{"contact_id": f"c-{n}"} for n in range(40)]})  # fmt: skip
    assert batch.status == 200 and batch.body["enrolled"] == 39, batch.body
    assert batch.body["skipped"] == 1 and batch.body["already_enrolled"] == 1

    worker = WorkerProcess(settings.redis_url.get_secret_value(), CAMPAIGN_LOG_LEVEL="WARNING")
    worker.start()
    try:
        ids = [f"rt:c-{n}" for n in range(40)]

        async def waiting() -> bool:
            page = await api.get("/v1/campaigns/rt/enrollments?state=waiting&limit=1000")
            return len(page.body["items"]) == 40

        await eventually(waiting, 20, 0.02, "all 40 waiting")
        accepted = []
        for eid in ids[::2]:
            r = await api.post(f"/v1/enrollments/{eid}/signal",
                               {"event": "replied", "payload": {"via": "api"}})  # fmt: skip
            assert r.status == 200, r.body
            accepted.append(r.body["accepted"])
        assert accepted == [True] * 20

        async def all_done() -> bool:
            campaign = await api.get("/v1/campaigns/rt")
            return campaign.body["counts"]["completed"] == 40

        await eventually(all_done, 60, 0.1, "all 40 completed")
        paths = Counter()
        for eid in ids:
            status = (await api.get(f"/v1/enrollments/{eid}")).body
            assert status["state"] == "completed", status
            nodes = [h["node"] for h in status["history"]]
            paths["thanks" if "thanks" in nodes else "nudge"] += 1
            assert ("thanks" in nodes) != ("nudge" in nodes), nodes
        assert paths == {"thanks": 20, "nudge": 20}
        # effectively once: one call per idempotency key and step
        keys = Counter(c.key for c in svc.calls)
        assert len(svc.calls) == 80 and max(keys.values()) == 1, keys.most_common(3)
        # the node counts of GET /v1/campaigns/{id} agree with the client's
        await api.post("/v1/campaigns", reply_timeout(svc, timeout=60))

        async def counted() -> Any:  # counts by node are reused for up to NODE_COUNT_TTL
            body = (await api.get("/v1/campaigns/rt")).body
            return body["by_node"].get("done", {}).get("completed") == 40 and body

        detail = await eventually(counted, 10, 0.1, "by_node to show the 40 at done")
        assert detail["versions"] == [1, 2] and detail["by_node_complete"] is True
        assert detail["definition"]["nodes"]["wait"]["timeout"] == "PT1M"
        assert detail["by_node"]["done"]["completed"] == 40
        # signal again: not waiting any more
        late = await api.post(f"/v1/enrollments/{ids[0]}/signal", {"event": "replied"})
        assert (late.status, late.body) == (200, {"accepted": False})
        # cancel a new one while it waits; cancelling again says it had ended
        await api.post("/v1/campaigns/rt/enrollments", {"contact_id": "late"})
        await eventually(lambda: _state_is(api, "rt:late", "waiting"), 20, 0.02, "late waiting")
        c1 = await api.post("/v1/enrollments/rt:late/cancel", {"reason": "unsubscribed"})
        c2 = await api.post("/v1/enrollments/rt:late/cancel")
        assert (c1.body, c2.body) == ({"cancelled": True}, {"cancelled": False})
        st = (await api.get("/v1/enrollments/rt:late")).body
        assert st["state"] == "cancelled" and "unsubscribed" in st["history"][-1]["reason"]
        q = (await api.get("/v1/queue")).body
        assert q["workers_alive"] == 1 and q["campaigns"][0]["counts"]["completed"] == 40
    finally:
        assert worker.stop() == 0


async def _state_is(api: ApiCaller, eid: str, *states: str) -> bool:
    reply = await api.get(f"/v1/enrollments/{eid}")
    return reply.status == 200 and reply.body["state"] in states


async def test_failures_are_grouped_and_replayed_through_http(
    api: ApiCaller, settings: Settings, svc: FakeService
) -> None:
    svc.failing = True
    await api.post("/v1/campaigns", reply_timeout(svc, fail_path="/toggle", timeout=0.5))
    await api.post("/v1/campaigns/rt/enrollments/batch",
                   {"contacts": [{"contact_id": f"f-{n}"} for n in range(6)]})  # fmt: skip
    worker = WorkerProcess(settings.redis_url.get_secret_value(), CAMPAIGN_LOG_LEVEL="WARNING")
    worker.start()
    try:

        async def grouped() -> Any:
            items = (await api.get("/v1/failures")).body["items"]
            return items and items[0]["count"] == 6 and items[0]

        group = await eventually(grouped, 30, 0.05, "6 failures in one group")
        assert group["group"] == "rt:first:TransientError" or group["group"].startswith("rt:first:")
        assert group["latest_enrollment_id"].startswith("rt:f-") and group["latest_message"]
        one = group["latest_enrollment_id"]
        st = (await api.get(f"/v1/enrollments/{one}")).body
        assert st["state"] == "failed" and st["error"]["type"] == group["error_type"]
        svc.failing = False
        replayed = await api.post(f"/v1/enrollments/{one}/replay")
        assert replayed.status == 200 and replayed.body["state"] in {"scheduled", "running",
                                                                      "waiting", "completed"}  # fmt: skip
        again = await api.post(f"/v1/enrollments/{one}/replay")
        assert_problem(again, 409, "InvalidState", "only failed enrollments can be replayed")
        rest = await api.post("/v1/failures/replay", {"group": group["group"]})
        assert rest.status == 200, rest.body
        assert rest.body["replayed"] == 5 and rest.body["total"] == 5 and not rest.body["skipped"]

        async def completed() -> bool:
            return (await api.get("/v1/campaigns/rt")).body["counts"]["completed"] == 6

        await eventually(completed, 30, 0.05, "all 6 completed after the replays")
        assert (await api.get("/v1/failures")).body == {"items": []}
    finally:
        assert worker.stop() == 0


async def test_every_error_is_a_problem_naming_what_was_wrong(
    api: ApiCaller, svc: FakeService
) -> None:
    definition = reply_timeout(svc)
    assert (await api.post("/v1/campaigns", definition)).status == 201
    await api.post("/v1/campaigns/rt/enrollments", {"contact_id": "a"})

    assert_problem(await api.get("/v1/queue", token=None), 401, "Unauthorized", "Bearer")
    wrong = await api.get("/v1/queue", token="not-a-token-0123456789")
    assert_problem(wrong, 401, "Unauthorized")
    assert wrong.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await api.get("/v1/queue", token=RO)).status == 200  # ro reads
    assert_problem(await api.post("/v1/campaigns/rt/enrollments", {"contact_id": "b"}, token=RO),
                   403, "Forbidden", "read-only")  # fmt: skip
    assert_problem(await api.get("/v1/campaigns/nope"), 404, "CampaignNotFound", "'nope'")
    assert_problem(await api.post("/v1/campaigns/nope/enrollments", {"contact_id": "x"}),
                   404, "CampaignNotFound", "'nope'")  # fmt: skip
    assert_problem(
        await api.get("/v1/enrollments/rt:nobody"), 404, "EnrollmentNotFound", "rt:nobody"
    )
    assert_problem(await api.post("/v1/campaigns/rt/enrollments", {"contact_id": "a"}),
                   409, "AlreadyEnrolled")  # fmt: skip
    assert_problem(await api.post("/v1/enrollments/rt:a/replay"), 409, "InvalidState", "scheduled")

    bad_ref = {**definition, "nodes": {**definition["nodes"],
                                       "wait": {**definition["nodes"]["wait"], "on_timeout": "nope"}}}  # fmt: skip
    assert_problem(await api.post("/v1/campaigns", bad_ref), 422, "InvalidCampaign",
                   "nodes.wait.on_timeout", "'nope'")  # fmt: skip
    assert_problem(await api.post("/v1/campaigns", [1]), 422, "InvalidCampaign", "JSON object")
    tz = await api.post(
        "/v1/campaigns/rt/enrollments", {"contact_id": "z", "timezone": "Mars/Base"}
    )
    assert assert_problem(tz, 422, "InvalidRequest", "timezone", "Mars/Base")["errors"][0][
        "field"] == "timezone"  # fmt: skip
    typo = assert_problem(await api.post("/v1/campaigns/rt/enrollments", {"contact": "z"}),
                          422, "InvalidRequest", "contact_id", "contact")  # fmt: skip
    assert {e["field"] for e in typo["errors"]} == {"contact_id", "contact"}
    row = await api.post("/v1/campaigns/rt/enrollments/batch",
                         {"contacts": [{"contact_id": "ok"}, {"contact_id": 7}]})  # fmt: skip
    bad_row = assert_problem(row, 422, "InvalidRequest", "contacts.1.contact_id")
    assert bad_row["errors"] == [{"field": "contacts.1.contact_id",
                                  "message": "Input should be a valid string", "value": 7}]  # fmt: skip
    naive = await api.post(
        "/v1/campaigns/rt/enrollments", {"contact_id": "n", "run_at": "2030-01-01T00:00:00"}
    )
    assert_problem(naive, 422, "InvalidRequest", "run_at")
    assert_problem(
        await api.get("/v1/campaigns/rt/enrollments?limit=0"), 422, "InvalidRequest", "limit"
    )
    assert_problem(
        await api.get("/v1/campaigns/rt/enrollments?state=sleeping"), 422, "InvalidRequest", "state"
    )
    assert_problem(
        await api.get("/v1/campaigns/rt/enrollments?cursor=garbage"),
        422,
        "InvalidRequest",
        "cursor",
    )
    assert_problem(await api.post("/v1/campaigns/rt/enrollments", data=b"{not json",
                                  headers={"Content-Type": "application/json"}), 400, "BadRequest", "JSON")  # fmt: skip
    assert_problem(await api.post("/v1/campaigns/rt/enrollments"), 400, "BadRequest", "JSON body")
    assert_problem(await api.post("/v1/enrollments/rt:a/signal", {"event": "x", "payload": [1]}),
                   422, "InvalidRequest", "payload")  # fmt: skip
    too_many = {"contacts": [{"contact_id": f"m{n}"} for n in range(5001)]}
    assert_problem(await api.post("/v1/campaigns/rt/enrollments/batch", too_many), 413, "TooLarge",
                   "5001", "5000")  # fmt: skip
    twice = await api.get("/v1/campaigns/rt/enrollments?limit=1&limit=2")
    assert_problem(twice, 422, "InvalidRequest", "limit: given more than once")
    assert_problem(await api.post("/v1/failures/replay", {"group": "nope:a:B"}), 404,
                   "CampaignNotFound", "'nope'")  # fmt: skip
    assert (await api.call("HEAD", "/v1/queue")).status == 200
    assert_problem(await api.get("/v1/nothing-here"), 404, "NotFound")
    assert_problem(await api.call("DELETE", "/v1/queue"), 405, "MethodNotAllowed", "GET")
    # nothing was enrolled by the refused calls
    page = (await api.get("/v1/campaigns/rt/enrollments")).body
    assert [i["enrollment_id"] for i in page["items"]] == ["rt:a"]


async def test_pages_cover_2500_enrollments_once_each(api: ApiCaller, svc: FakeService) -> None:
    await api.post("/v1/campaigns", reply_timeout(svc))
    for start in range(0, 2500, 1000):
        reply = await api.post("/v1/campaigns/rt/enrollments/batch",
                               {"contacts": [{"contact_id": f"p{n:04d}"} for n in
                                             range(start, min(start + 1000, 2500))]})  # fmt: skip
        assert reply.status == 200, reply.body
    for limit in (1000, 333):
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
            page = (await api.get(f"/v1/campaigns/rt/enrollments{query}")).body
            assert len(page["items"]) <= limit
            seen += [i["enrollment_id"] for i in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)) == 2500, (limit, len(seen), len(set(seen)))
        assert pages >= 2500 // limit
    filtered = (
        await api.get("/v1/campaigns/rt/enrollments?state=scheduled&node=first&limit=5")
    ).body
    assert len(filtered["items"]) == 5 and all(i["node"] == "first" for i in filtered["items"])
    assert "history" not in filtered["items"][0]
    none = (await api.get("/v1/campaigns/rt/enrollments?state=failed")).body
    assert none == {"items": [], "next_cursor": None}


async def test_the_document_lists_every_operation_and_is_served_without_a_token(
    api: ApiCaller,
) -> None:
    doc = (await api.get("/openapi.json", token=None)).body
    assert doc["openapi"] == "3.1.0"
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {(op.method, op.path) for op in OPERATIONS}
    enroll = doc["paths"]["/v1/campaigns/{campaign_id}/enrollments"]["post"]
    body_ref = enroll["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert doc["components"]["schemas"][body_ref.rsplit("/", 1)[1]]["required"] == ["contact_id"]
    assert set(enroll["responses"]) >= {"201", "401", "403", "404", "409", "422"}
    problem = enroll["responses"]["409"]["content"]
    assert list(problem) == [CONTENT_TYPE]
    # links let a client (or a stateful test) go from a created enrollment to its status
    links = enroll["responses"]["201"]["links"]
    assert links["getEnrollment"]["parameters"] == {
        "enrollment_id": "$response.body#/enrollment_id"
    }


async def test_requests_are_counted_by_route_template_not_by_id(api: ApiCaller) -> None:
    await api.get("/v1/enrollments/x:secret-contact-1")
    await api.get("/v1/enrollments/x:secret-contact-2")
    await api.get("/v1/queue", token=None)
    text = (await api.get("/metrics", token=None)).body
    assert 'route="/v1/enrollments/{enrollment_id}",status="404"} 2.0' in text, text
    assert 'campaign_api_requests_total{method="GET",route="/v1/queue",status="401"} 1.0' in text
    assert "secret-contact" not in text and RW not in text
    assert "campaign_api_request_duration_seconds_bucket" in text


async def test_probes_answer_without_a_token(api: ApiCaller) -> None:
    assert (await api.get("/livez", token=None)).body == {"status": "ok"}
    assert (await api.get("/readyz", token=None)).body == {"status": "ok"}


def _api_exit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "campaign-worker"
    return subprocess.run([str(exe), "api"], env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=30)  # fmt: skip


@pytest.mark.parametrize(
    ("tokens", "says"),
    [
        (None, "CAMPAIGN_API_TOKENS: no token configured"),
        (" , ", "CAMPAIGN_API_TOKENS: no token configured"),
        ("short-secret", "CAMPAIGN_API_TOKENS: token 1 is shorter than 16"),
        ("ok-token-0123456789abc,bad token with spaces", "token 2 has a character"),
    ],
)
def test_the_api_refuses_to_start_without_a_usable_token(tokens: str | None, says: str) -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:1/0"}
    if tokens is not None:
        env["CAMPAIGN_API_TOKENS"] = tokens
    done = _api_exit(env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    for secret in ("short-secret", "ok-token-0123456789abc", "bad token"):
        assert secret not in done.stderr


async def test_redis_down_is_a_503_problem_and_the_api_lives(private_redis: Any) -> None:
    proc = await ApiProcess(private_redis.url).start()
    try:
        assert (await proc.call("GET", "/v1/queue")).status == 200
        private_redis.close()
        down = await proc.call("GET", "/v1/queue")
        assert_problem(down, 503, "Unavailable")
        assert down.headers["Retry-After"] == "1"
        assert (await proc.call("GET", "/readyz")).status == 503
        assert (await proc.call("GET", "/livez")).status == 200
        assert proc.proc is not None and proc.proc.poll() is None
    finally:
        assert proc.stop() == 0


async def test_the_client_and_the_api_agree_on_a_status(api: ApiCaller, client: CampaignClient,
                                                         svc: FakeService) -> None:  # fmt: skip
    await client.register_campaign(reply_timeout(svc))
    st = await client.enroll("rt", "same", attributes={"k": [1, 2]}, timezone="Asia/Tokyo")
    over_http = (await api.get("/v1/enrollments/rt:same")).body
    assert over_http == st.model_dump(mode="json")
    assert State(over_http["state"]) is State.SCHEDULED


async def test_numbers_past_64_bits_are_refused_as_422s(api: ApiCaller) -> None:
    """Found by schemathesis: a refused integer too large for the JSON encoder."""
    huge = b'{"group": "a:b:c", "to_version": -804553636655030206464}'
    reply = await api.post("/v1/failures/replay", data=huge,
                           headers={"Content-Type": "application/json"})  # fmt: skip
    body = assert_problem(reply, 422, "InvalidRequest", "to_version")
    assert body["errors"][0]["value"] == "-804553636655030206464"
    reply = await api.get("/v1/campaigns/x/enrollments?limit=99999999999999999999999")
    assert_problem(reply, 422, "InvalidRequest", "limit")


async def test_review_findings_stay_fixed(api: ApiCaller, client: CampaignClient,
                                          svc: FakeService) -> None:  # fmt: skip
    """A hostile review found these; each answered a 500, or read far too much."""
    await api.post("/v1/campaigns", reply_timeout(svc))
    # bytes that are no token in the Authorization header: a 401, not a 500
    host, port = api.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/queue HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                 b"Connection: close\r\n\r\n")  # fmt: skip
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"401", status_line
    # a body larger than the operation takes is refused before it is parsed
    big = await api.post("/v1/campaigns/rt/enrollments",
                         {"contact_id": "big", "attributes": {"x": "y" * 300_000}})  # fmt: skip
    assert_problem(big, 413, "TooLarge")
    # a corrupt dead letter and a corrupt error record: listed, not a 500
    shard = client.service.keys.shard(0)
    await client.redis.lpush(shard.dead, b'{"job_id": "j1", "reason": "r", "at": 1e20}')
    await client.redis.lpush(shard.dead, b'{"job_id": "j2", "reason": "r", "at": "nan"}')
    letters = await api.get("/v1/dead-letters")
    assert letters.status == 200 and [d["at"] for d in letters.body["items"]] == [None, None]
    await client.register_campaign({"id": "colon", "entry": "a:b", "nodes": {
        "a:b": {"type": "action", "action": "no-such-action", "next": None}}})  # fmt: skip
    st = await client.enroll("colon", "c")
    await client.service.fail(JobTarget(st.enrollment_id, "colon", st.step, None),
                              job_id=(await claim_one(client.service, st.enrollment_id)).job_id,
                              node="a:b", step=st.step, attempt=1,
                              error={"type": "UnknownAction", "message": "m", "at": "zzz"})  # fmt: skip
    groups = await api.get("/v1/failures")
    assert groups.status == 200, groups.body
    assert [g["group"] for g in groups.body["items"]] == ["colon:a:b:UnknownAction"]
    # a node name with ':' in it: its group can be replayed (the action still fails later)
    replayed = await api.post("/v1/failures/replay", {"group": "colon:a:b:UnknownAction"})
    assert replayed.status == 200 and replayed.body["replayed"] == 1, replayed.body


async def test_a_batch_past_the_limit_is_refused_whole_even_when_json_parsers_disagree(
    api: ApiCaller, client: CampaignClient, svc: FakeService
) -> None:
    """Found in review: 1e400 makes orjson (the row count) refuse the body while pydantic
    reads it, so the count was skipped and 5,999 rows were enrolled before a 422."""
    await api.post("/v1/campaigns", reply_timeout(svc))
    rows = [f'{{"contact_id": "b{n}"}}' for n in range(5999)]
    rows.append('{"contact_id": "last", "attributes": {"x": 1e400}}')
    body = ('{"contacts": [' + ",".join(rows) + "]}").encode()
    reply = await api.post("/v1/campaigns/rt/enrollments/batch", data=body,
                           headers={"Content-Type": "application/json"})  # fmt: skip
    assert_problem(reply, 413, "TooLarge", "6000 rows")
    assert (await client.service.store.count_by_state("rt"))["scheduled"] == 0


async def test_each_write_is_logged_with_the_tokens_id_never_the_token(
    api: ApiCaller, svc: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="worker.api")
    await api.post("/v1/campaigns", reply_timeout(svc))
    await api.post("/v1/campaigns/rt/enrollments", {"contact_id": "audited"})
    await api.post("/v1/enrollments/rt:audited/cancel", {"reason": "test"})
    await api.get("/v1/enrollments/rt:audited")  # a read: not logged
    writes = [r for r in caplog.records if r.getMessage() == "api write"]
    assert [(r.operation, r.__dict__.get("campaign_id"), r.__dict__.get("enrollment_id"))  # type: ignore[attr-defined]
            for r in writes] == [("registerCampaign", None, None), ("enroll", "rt", None),
                                 ("cancel", None, "rt:audited")]  # fmt: skip
    assert len({r.token_id for r in writes}) == 1  # type: ignore[attr-defined]
    assert all(RW not in r.getMessage() and RW not in str(r.__dict__) for r in caplog.records)
