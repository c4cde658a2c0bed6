"""The ``/v1`` operations: one table that both the router and the OpenAPI document read.

Each :class:`Operation` names its body, query and response models; :func:`bind` wraps
its handler so that the token is checked (a write needs a read-write token), the body
and query are validated with those models, and the reply is serialized with the response
model. The client underneath checks the limits, as it does for a Python caller.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from app import overview
from app.client import CampaignClient
from app.failures import failure_groups, replay_group
from app.models import EnrollmentStatus, ms_to_datetime
from app.settings import Settings
from worker.api.auth import Principal, Tokens
from worker.api.problems import Problem
from worker.api.schemas import (
    BATCH_LIMIT,
    BatchConflict,
    BatchRequest,
    BatchResult,
    CampaignCreated,
    CampaignDetail,
    CampaignList,
    CampaignSummary,
    CancelRequest,
    CancelResult,
    DeadLetter,
    DeadLetterList,
    DeadLetterQuery,
    EnrollmentPage,
    EnrollRequest,
    FailureGroupList,
    FailureGroupOut,
    GroupReplayRequest,
    GroupReplayResult,
    ListQuery,
    QueueOverview,
    ReplayRequest,
    ShardQueue,
    SignalRequest,
    SignalResult,
    SkippedMember,
)
from worker.dead_letters import list_dead_letters

__all__ = ["API_KEY", "OPERATIONS", "Api", "Operation", "bind", "describe_validation"]

log = logging.getLogger("worker.api")

#: Where the :class:`Api` lives in the aiohttp application.
API_KEY: web.AppKey[Api] = web.AppKey("campaign_api")


#: Seconds a campaign's counts by node are reused (they read every enrollment's node).
NODE_COUNT_TTL = 2.0


@dataclass
class Api:
    """What the handlers share: the client, the settings and the tokens."""

    client: CampaignClient
    settings: Settings
    tokens: Tokens
    #: campaign id -> (when its count finished, or None while it runs; the count)
    _node_counts: dict[str, tuple[float | None, asyncio.Task[Any]]] = field(
        default_factory=dict, init=False, repr=False
    )

    async def node_counts(self, campaign_id: str) -> tuple[dict[str, dict[str, int]], bool]:
        """:func:`app.overview.node_counts`, at most one count per campaign at a time (a
        view arriving meanwhile waits for it) and its result reused for
        :data:`NODE_COUNT_TTL` seconds after it ends: it reads every enrollment, so views
        of a large campaign (a dashboard, several operators) must not each start one."""
        now = time.monotonic()
        if len(self._node_counts) > 1000:  # forget old counts of campaigns nobody looks at
            self._node_counts = {k: v for k, v in self._node_counts.items()
                                 if v[0] is None or now - v[0] < NODE_COUNT_TTL}  # fmt: skip
        cached = self._node_counts.get(campaign_id)
        if cached is None or (cached[0] is not None and (
            now - cached[0] >= NODE_COUNT_TTL or cached[1].cancelled()
            or cached[1].exception() is not None
        )):  # fmt: skip
            client = self.client
            task = asyncio.ensure_future(
                overview.node_counts(client.redis, client.service.keys, campaign_id)
            )
            cached = self._node_counts[campaign_id] = (None, task)

            def finished(done: asyncio.Task[Any], campaign_id: str = campaign_id) -> None:
                if not done.cancelled():
                    done.exception()  # retrieved: a failure is the waiters' error, not a log line
                if self._node_counts.get(campaign_id, (0.0, None))[1] is done:
                    self._node_counts[campaign_id] = (time.monotonic(), done)

            task.add_done_callback(finished)
        # shielded: a caller that goes away must not cancel the count the others wait for
        result: tuple[dict[str, dict[str, int]], bool] = await asyncio.shield(cached[1])
        return result


@dataclass
class Call:
    """One validated call: path parameters, the body and query models, who called."""

    api: Api
    request: web.Request
    principal: Principal
    body: Any = None
    query: Any = None

    def path(self, name: str) -> str:
        return self.request.match_info[name]


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True)
class Operation:
    """One method and path of the API, with the models the document is built from."""

    method: str
    path: str
    operation_id: str
    summary: str
    handler: Handler
    response: type[BaseModel]
    status: int = 200
    body: type[BaseModel] | None = None
    body_required: bool = True
    #: a raw JSON object body (a campaign definition), validated by the client
    raw_body: bool = False
    query: type[BaseModel] | None = None
    writes: bool = False
    errors: tuple[int, ...] = field(default=())
    tag: str = "enrollments"


# -- validation ----------------------------------------------------------------------------


_OMIT = object()


def _shown(value: Any) -> Any:
    """A refused value as it can be shown in JSON: scalars as they were (long strings cut),
    containers not at all."""
    if isinstance(value, str):
        return value if len(value) <= 120 else value[:120] + "..."
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return str(value)[:120]  # past what JSON encoders take as a number
    if value is None or isinstance(value, bool | int | float):
        return value
    return _OMIT


def describe_validation(exc: ValidationError) -> Problem:
    """A 422 naming each bad field by its path (``contacts.3.timezone``) and value."""
    errors = []
    for err in exc.errors(include_url=False):
        entry: dict[str, Any] = {"field": ".".join(str(p) for p in err["loc"]) or "body",
                                 "message": err["msg"]}  # fmt: skip
        shown = _shown(err.get("input")) if err["type"] != "missing" else _OMIT
        if shown is not _OMIT:
            entry["value"] = shown
        errors.append(entry)
    detail = "; ".join(
        f"{e['field']}: {e['message']}" + (f" (got {e['value']!r})" if "value" in e else "")
        for e in errors[:10]
    )
    return Problem(422, "InvalidRequest", detail, errors=errors[:100])


#: Bytes a batch body may take (5,000 contacts of up to about 6 KiB each).
BATCH_BODY_BYTES = 32 * 1024 * 1024


def body_limit(op: Operation, settings: Settings) -> int:
    """The most bytes ``op`` reads of a body (more is a 413 before anything is parsed):
    each operation's own inputs and limits, so that no caller can make the API hold
    more than it needs."""
    if op.raw_body:  # the client measures compact JSON: leave room for indentation
        return 4 * settings.max_definition_bytes + 65_536
    if op.body is BatchRequest:
        return BATCH_BODY_BYTES
    return 2 * max(settings.max_attributes_bytes, settings.max_payload_bytes) + 65_536


async def _raw_body(request: web.Request, required: bool, limit: int) -> bytes | None:
    """The body's bytes; None when there is none and none is required. Past ``limit``
    aiohttp stops reading and raises HTTPRequestEntityTooLarge (a 413 problem)."""
    raw = await request.clone(client_max_size=limit).read()
    if not raw.strip():
        if required:
            raise Problem(400, "BadRequest", "the request needs a JSON body")
        return None
    return raw


#: JSON's names for what a body decoded to.
_JSON_TYPES = {"dict": "object", "list": "array", "str": "string", "int": "number",
               "float": "number", "bool": "boolean", "NoneType": "null"}  # fmt: skip


def _not_an_object(op: Operation, got: str) -> Problem:
    got = _JSON_TYPES.get(got, got)
    title = "InvalidCampaign" if op.raw_body else "InvalidRequest"
    return Problem(422, title, f"body: must be a JSON object (got {got})",
                   errors=[{"field": "body", "message": "must be a JSON object"}])  # fmt: skip


def _validated_body(op: Operation, raw: bytes | None) -> Any:
    """The body checked against ``op``'s model in JSON mode (strict: a string is not a
    number, a number is not a date), or for a definition only that it is an object (the
    client validates the rest)."""
    if op.raw_body:
        try:
            doc = orjson.loads(raw or b"")
        except orjson.JSONDecodeError as exc:
            raise Problem(400, "BadRequest", f"the body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise _not_an_object(op, type(doc).__name__)
        return doc
    assert op.body is not None
    if raw is None:
        return op.body()
    try:
        body = op.body.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise Problem(
                400, "BadRequest", f"the body is not valid JSON: {first['msg']}"
            ) from None
        if first["type"] == "model_type" and not first["loc"]:
            raise _not_an_object(op, type(first.get("input")).__name__) from None
        too_long = next((e for e in exc.errors(include_url=False)
                         if e["type"] == "too_long" and e["loc"] == ("contacts",)), None)  # fmt: skip
        if too_long is not None:
            rows = too_long.get("ctx", {}).get("actual_length", "more")
            raise Problem(413, "TooLarge", f"contacts: {rows} rows; one call takes at most "
                          f"{BATCH_LIMIT} (split the batch)") from None  # fmt: skip
        raise describe_validation(exc) from None
    return body


def bind(op: Operation, api: Api) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of ``op``: auth, validation, the call, the response."""

    async def handle(request: web.Request) -> web.StreamResponse:
        principal = api.tokens.bearer(request.headers.get("Authorization"))
        if principal is None:
            raise Problem(
                401, "Unauthorized",
                "send Authorization: Bearer <token> with one of CAMPAIGN_API_TOKENS",
                headers={"WWW-Authenticate": 'Bearer realm="campaign-api"'},
            )  # fmt: skip
        if op.writes and not principal.may_write:
            raise Problem(403, "Forbidden", "this token is read-only (ro:); writing needs another")
        call = Call(api, request, principal)
        if op.query is not None:
            repeated = sorted({k for k in request.query if len(request.query.getall(k)) > 1})
            if repeated:
                raise Problem(422, "InvalidRequest", f"{repeated[0]}: given more than once",
                              errors=[{"field": k, "message": "given more than once"}
                                      for k in repeated])  # fmt: skip
            try:
                call.query = op.query.model_validate(dict(request.query))
            except ValidationError as exc:
                raise describe_validation(exc) from None
        if op.body is not None or op.raw_body:
            raw = await _raw_body(request, op.body_required, body_limit(op, api.settings))
            call.body = _validated_body(op, raw)
        result = await op.handler(call)
        if op.writes:  # who changed what: the token's id (a hash prefix), never the token
            log.info("api write", extra={"operation": op.operation_id,
                                         "token_id": principal.token_id, **request.match_info})  # fmt: skip
        body = op.response.model_validate(result) if not isinstance(result, BaseModel) else result
        return web.Response(
            status=op.status,
            body=body.model_dump_json().encode(),
            content_type="application/json",
        )

    return handle


# -- handlers ------------------------------------------------------------------------------


async def _versions(client: CampaignClient, ids: list[str]) -> dict[str, int]:
    """The latest version of each campaign, one pipelined HGET each."""
    keys = client.service.keys
    async with client.redis.pipeline(transaction=False) as pipe:
        for cid in ids:
            pipe.hget(keys.campaign(cid), "latest")
        raw = await pipe.execute()
    out = {}
    for cid, value in zip(ids, raw, strict=True):
        try:
            out[cid] = int(value) if value is not None else 0
        except ValueError:
            out[cid] = 0
    return out


async def campaign_overview(api: Api) -> tuple[overview.Overview, list[CampaignSummary]]:
    """The queue overview, and each campaign's counts with its latest version."""
    client = api.client
    await client.connect()
    view = await overview.queue_overview(client.redis, client.service.keys, api.settings)
    versions = await _versions(client, [c.campaign_id for c in view.campaigns])
    summaries = [
        CampaignSummary(id=c.campaign_id, version=versions.get(c.campaign_id, 0),
                        counts=c.counts, total=c.total)
        for c in view.campaigns
    ]  # fmt: skip
    return view, summaries


async def register_campaign(call: Call) -> CampaignCreated:
    version = await call.api.client.register_campaign(call.body)
    return CampaignCreated(id=str(call.body.get("id")), version=version)


async def list_campaigns(call: Call) -> CampaignList:
    _, summaries = await campaign_overview(call.api)
    return CampaignList(items=summaries)


async def get_campaign(call: Call) -> CampaignDetail:
    client = call.api.client
    campaign = await client.get_campaign(call.path("campaign_id"))
    version = campaign.version or 1
    counts, (by_node, complete) = await asyncio.gather(
        client.service.store.count_by_state(campaign.id), call.api.node_counts(campaign.id)
    )
    return CampaignDetail(
        id=campaign.id, version=version, versions=list(range(1, version + 1)),
        definition=campaign.definition(), counts=counts,
        by_node=by_node, by_node_complete=complete,
    )  # fmt: skip


def _enroll_kwargs(row: EnrollRequest) -> dict[str, Any]:
    return {"attributes": row.attributes, "timezone": row.timezone, "node": row.node,
            "run_at": row.run_at}  # fmt: skip


async def enroll(call: Call) -> EnrollmentStatus:
    row: EnrollRequest = call.body
    return await call.api.client.enroll(
        call.path("campaign_id"), row.contact_id, **_enroll_kwargs(row)
    )


async def enroll_batch(call: Call) -> BatchResult:
    rows = [{"contact_id": r.contact_id, **{k: v for k, v in _enroll_kwargs(r).items()
                                           if v is not None}}
            for r in call.body.contacts]  # fmt: skip
    result = await call.api.client.enroll_many(call.path("campaign_id"), rows)
    return BatchResult(
        enrolled=result.enrolled,
        skipped=result.skipped,
        already_enrolled=result.already_enrolled,
        conflicts=[
            BatchConflict(row=r, contact_id=c, reason=why) for r, c, why in result.conflicts
        ],
    )


async def list_enrollments(call: Call) -> EnrollmentPage:
    q: ListQuery = call.query
    client = call.api.client
    page = await client.list_enrollments(
        call.path("campaign_id"), state=q.state.value if q.state else None, node=q.node,
        limit=q.limit, cursor=q.cursor,
    )  # fmt: skip
    summaries = await client.service.store.summaries([eid for eid, _, _ in page.items])
    items = [s for s in summaries if s is not None]
    return EnrollmentPage(items=items, next_cursor=page.next_cursor)


async def get_enrollment(call: Call) -> EnrollmentStatus:
    return await call.api.client.status(call.path("enrollment_id"))


async def signal(call: Call) -> SignalResult:
    body: SignalRequest = call.body
    accepted = await call.api.client.signal(call.path("enrollment_id"), body.event, body.payload)
    return SignalResult(accepted=accepted)


async def cancel(call: Call) -> CancelResult:
    body: CancelRequest = call.body
    return CancelResult(
        cancelled=await call.api.client.cancel(call.path("enrollment_id"), body.reason)
    )


async def replay(call: Call) -> EnrollmentStatus:
    body: ReplayRequest = call.body
    return await call.api.client.replay(call.path("enrollment_id"), to_version=body.to_version)


def failure_group_out(group: Any) -> FailureGroupOut:
    latest = group.latest
    return FailureGroupOut(
        group=group.name, campaign_id=group.campaign_id, node=group.node,
        error_type=group.error_type, count=group.count,
        latest_enrollment_id=group.members[0][0],
        latest_message=str(latest.get("message", ""))[:2000],
        latest_trace_id=latest.get("trace_id") if isinstance(latest.get("trace_id"), str) else None,
        latest_at=_ms(latest.get("at")),
    )  # fmt: skip


def _ms(value: Any) -> datetime | None:
    try:
        return ms_to_datetime(value) if isinstance(value, int | float | str) else None
    except (ValueError, OverflowError, OSError):
        return None


async def list_failures(call: Call) -> FailureGroupList:
    groups = await failure_groups(call.api.client)
    return FailureGroupList(items=[failure_group_out(g) for g in groups])


async def replay_failure_group(call: Call) -> GroupReplayResult:
    body: GroupReplayRequest = call.body
    report = await replay_group(call.api.client, body.group, to_version=body.to_version)
    return GroupReplayResult(
        group=report.group, total=report.total, replayed=report.replayed,
        gone=[SkippedMember(enrollment_id=e, reason=r) for e, r in report.gone],
        skipped=[SkippedMember(enrollment_id=e, reason=r) for e, r in report.skipped],
    )  # fmt: skip


async def list_dead(call: Call) -> DeadLetterList:
    q: DeadLetterQuery = call.query
    client = call.api.client
    await client.connect()
    letters, total = await list_dead_letters(client, q.limit)
    items = [
        DeadLetter(shard=d.shard, job_id=d.job_id, reason=d.reason, payload=d.payload,
                   at=datetime.fromtimestamp(d.at, UTC) if d.at else None)
        for d in letters
    ]  # fmt: skip
    return DeadLetterList(items=items, total=total)


async def queue(call: Call) -> QueueOverview:
    view, summaries = await campaign_overview(call.api)
    return QueueOverview(
        at=datetime.fromtimestamp(view.at or time.time(), UTC), due=view.due,
        deferred=view.deferred, running=view.running, dead=view.dead,
        workers_alive=view.workers_alive, maintenance_queued=view.maintenance_queued,
        shards=[ShardQueue(shard=s.shard, due=s.due, deferred=s.deferred, running=s.running,
                           dead=s.dead) for s in view.shards],
        campaigns=summaries,
    )  # fmt: skip


_C = "/v1/campaigns/{campaign_id}"
_E = "/v1/enrollments/{enrollment_id}"

#: Every ``/v1`` operation. Errors every operation can answer (400, 401, 503...) are added
#: by the document builder; ``errors`` lists the ones particular to an operation.
OPERATIONS: tuple[Operation, ...] = (
    Operation("POST", "/v1/campaigns", "registerCampaign", "Register a campaign definition (a new version)",
              register_campaign, CampaignCreated, 201, raw_body=True, writes=True,
              errors=(413, 422), tag="campaigns"),
    Operation("GET", "/v1/campaigns", "listCampaigns", "Campaigns with their enrollments per state",
              list_campaigns, CampaignList, tag="campaigns"),
    Operation("GET", _C, "getCampaign", "A campaign: latest definition, versions, counts by state and node",
              get_campaign, CampaignDetail, errors=(404,), tag="campaigns"),
    Operation("POST", f"{_C}/enrollments", "enroll", "Enroll one contact",
              enroll, EnrollmentStatus, 201, body=EnrollRequest, writes=True, errors=(404, 409, 422)),
    Operation("POST", f"{_C}/enrollments/batch", "enrollBatch",
              f"Enroll up to {BATCH_LIMIT} contacts; those already enrolled are skipped",
              enroll_batch, BatchResult, body=BatchRequest, writes=True, errors=(404, 413, 422)),
    Operation("GET", f"{_C}/enrollments", "listEnrollments",
              "A page of a campaign's enrollments (filter by state and node; follow next_cursor)",
              list_enrollments, EnrollmentPage, query=ListQuery, errors=(404, 422)),
    Operation("GET", _E, "getEnrollment", "An enrollment's status and history",
              get_enrollment, EnrollmentStatus, errors=(404, 422)),
    Operation("POST", f"{_E}/signal", "signal", "Deliver an event to a waiting enrollment",
              signal, SignalResult, body=SignalRequest, writes=True, errors=(404, 422)),
    Operation("POST", f"{_E}/cancel", "cancel", "Cancel an active enrollment",
              cancel, CancelResult, body=CancelRequest, body_required=False, writes=True,
              errors=(404, 409, 422)),
    Operation("POST", f"{_E}/replay", "replay", "Replay a failed enrollment",
              replay, EnrollmentStatus, body=ReplayRequest, body_required=False, writes=True,
              errors=(404, 409, 422)),
    Operation("GET", "/v1/failures", "listFailures",
              "Failed enrollments grouped by campaign, node and error type",
              list_failures, FailureGroupList, tag="operations"),
    Operation("POST", "/v1/failures/replay", "replayFailureGroup", "Replay every enrollment of a failure group",
              replay_failure_group, GroupReplayResult, body=GroupReplayRequest, writes=True,
              errors=(404, 422), tag="operations"),
    Operation("GET", "/v1/dead-letters", "listDeadLetters", "Queue entries dropped unread, newest first",
              list_dead, DeadLetterList, query=DeadLetterQuery, errors=(422,), tag="operations"),
    Operation("GET", "/v1/queue", "queueOverview", "Jobs per shard, workers alive, campaigns per state",
              queue, QueueOverview, tag="operations"),
)  # fmt: skip
