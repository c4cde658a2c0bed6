"""The scheduling service: every enrollment state change, as commands.

Planning is pure (:mod:`app.planner`); applying a plan is one atomic Lua call through
:class:`app.store.EnrollmentStore`, which also swaps the enrollment's job. The public
client and the worker's processors both go through this service, so the rules live in
one place.
"""

from __future__ import annotations

import dataclasses
import functools
import traceback as tb
from collections.abc import Callable, Coroutine, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from arq.connections import ArqRedis
from opentelemetry import trace

from app.campaigns import ActionNode, Campaign, WaitNode
from app.durations import format_duration
from app.errors import (
    AlreadyEnrolled,
    CampaignNotFound,
    EnrollmentNotFound,
    InvalidRequest,
)
from app.jobs import JobTarget, enrollment_id_for
from app.keys import Keys
from app.models import ACTIVE_STATES, EnrollmentStatus, State
from app.planner import Plan, Planner, ms
from app.registry import CampaignRegistry
from app.settings import Settings
from app.store import Applied, EnrollmentStore, Transition
from app.tracing import producer_span

__all__ = ["SchedulingService", "error_info"]

_CONTACT_MAX = 256
_RACE_RETRIES = 5
_ACTIVE = {s.value for s in ACTIVE_STATES}
_NO_REENTRY = "; the campaign does not allow re-entry"
_ms = ms

P = ParamSpec("P")
R = TypeVar("R")


def _traced(
    operation: str,
) -> Callable[
    [Callable[Concatenate[SchedulingService, P], Coroutine[Any, Any, R]]],
    Callable[Concatenate[SchedulingService, P], Coroutine[Any, Any, R]],
]:
    """Run a service operation inside a PRODUCER span, so the jobs it enqueues carry it."""

    def decorate(
        fn: Callable[Concatenate[SchedulingService, P], Coroutine[Any, Any, R]],
    ) -> Callable[Concatenate[SchedulingService, P], Coroutine[Any, Any, R]]:
        @functools.wraps(fn)
        async def wrapper(self: SchedulingService, /, *args: P.args, **kwargs: P.kwargs) -> R:
            first = args[0] if args else None
            attrs: dict[str, Any] = {}
            if isinstance(first, JobTarget):
                attrs = {
                    "campaign.id": first.campaign_id,
                    "campaign.enrollment_id": first.enrollment_id,
                }
            elif isinstance(first, str):
                key = "campaign.id" if operation.startswith("enroll") else "campaign.enrollment_id"
                attrs = {key: first}
            with producer_span(operation, self.destination, attrs):
                return await fn(self, *args, **kwargs)

        return wrapper

    return decorate


class SchedulingService:
    """Every enrollment state change, planned in Python and applied atomically in Redis."""

    def __init__(self, redis: ArqRedis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix, settings.shards)
        self.registry = CampaignRegistry(redis, self.keys)
        self.store = EnrollmentStore(redis, self.keys, history_limit=settings.history_limit)
        self.planner = Planner(settings.max_steps)
        #: The queue name spans and logs use for campaign jobs.
        self.destination = f"{settings.key_prefix}:queue"
        #: Called with (enrollment_id, history entry) after each applied transition.
        self.on_transition: Callable[[str, dict[str, Any]], None] | None = None

    def plan(
        self,
        campaign: Campaign,
        target: JobTarget,
        node_id: str | None,
        step: int,
        now: datetime,
        *,
        count_first: bool = True,
        reason: str = "",
    ) -> Plan:
        """See :meth:`app.planner.Planner.plan`."""
        return self.planner.plan(
            campaign, target, node_id, step, now, count_first=count_first, reason=reason
        )

    def transition(self, plan: Plan, target: JobTarget, **kwargs: Any) -> Transition:
        """See :meth:`app.planner.Planner.transition`."""
        return self.planner.transition(plan, target, **kwargs)

    async def _apply(self, enrollment_id: str, tr: Transition) -> Applied:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("campaign.enrollment_id", enrollment_id)
            if tr.new_state:
                span.set_attribute("campaign.to_state", tr.new_state)
            if tr.add_job is not None:
                span.set_attribute("messaging.message.id", tr.add_job.id)
                span.set_attribute("campaign.node", str(tr.add_job.kwargs.get("node")))
        result = await self.store.apply(enrollment_id, tr)
        if result.ok and self.on_transition is not None:
            for entry in tr.history:
                self.on_transition(enrollment_id, entry)
        return result

    # -- enrollment ---------------------------------------------------------------------

    def _target(self, campaign: Campaign, contact_id: str, timezone: str | None) -> JobTarget:
        if not isinstance(contact_id, str) or not contact_id or len(contact_id) > _CONTACT_MAX:
            raise InvalidRequest(
                f"contact_id must be a non-empty string of at most {_CONTACT_MAX} characters"
            )
        if any(c.isspace() or ord(c) < 32 for c in contact_id):
            raise InvalidRequest(
                f"contact_id {contact_id!r} contains whitespace or control characters"
            )
        if timezone is not None:
            try:
                ZoneInfo(timezone)
            except (ZoneInfoNotFoundError, ValueError, TypeError):
                raise InvalidRequest(f"timezone: unknown time zone {timezone!r}") from None
        assert campaign.version is not None
        return JobTarget(
            enrollment_id_for(campaign.id, contact_id), campaign.id, campaign.version, timezone
        )

    def _enroll_transition(
        self,
        campaign: Campaign,
        target: JobTarget,
        contact_id: str,
        attributes: Mapping[str, Any] | None,
        base_step: int,
        now: datetime,
    ) -> Transition:
        target = dataclasses.replace(target, base_step=base_step)
        plan = self.plan(campaign, target, campaign.entry, base_step, now, reason="enrolled")
        at = str(_ms(now))
        extra = {
            "base_step": str(base_step),
            "campaign": campaign.id,
            "contact": contact_id,
            "version": str(campaign.version),
            "timezone": target.timezone or "",
            "attributes": orjson.dumps(dict(attributes or {})).decode(),
            "created_at": at,
        }
        tr = self.transition(plan, target, from_state=None, expect_states=(), expect_step=base_step,
                             now=now, extra=extra)  # fmt: skip
        tr.create = True
        tr.reentry = campaign.reentry
        tr.unset.append("error")
        tr.unset.append("event")
        return tr

    @_traced("enroll")
    async def enroll(
        self,
        campaign_id: str,
        contact_id: str,
        attributes: Mapping[str, Any] | None = None,
        timezone: str | None = None,
        *,
        now: datetime | None = None,
    ) -> EnrollmentStatus:
        """Enroll one contact in the latest version; raises :class:`AlreadyEnrolled`."""
        campaign = await self.registry.get(campaign_id)
        target = self._target(campaign, contact_id, timezone)
        _check_attributes(attributes)
        base = 0
        for _ in range(_RACE_RETRIES):
            moment = now or datetime.now(UTC)
            tr = self._enroll_transition(campaign, target, contact_id, attributes, base, moment)
            result = await self._apply(target.enrollment_id, tr)
            if result.ok:
                break
            if result.job_conflict:
                raise InvalidRequest(
                    f"cannot enroll {contact_id!r}: job {result.job_conflict!r} is still queued "
                    "from an earlier enrollment with the same id"
                )
            if result.state in _ACTIVE or not campaign.reentry:
                hint = "" if result.state in _ACTIVE else _NO_REENTRY
                raise AlreadyEnrolled(
                    f"contact {contact_id!r} is already enrolled in campaign {campaign_id!r} "
                    f"(enrollment {target.enrollment_id} is {result.state}){hint}"
                )
            base = result.step or 0  # re-entry: steps keep growing so job ids stay unique
        else:
            raise AlreadyEnrolled(f"enrollment {target.enrollment_id} kept changing; try again")
        status = await self.store.status(target.enrollment_id)
        assert status is not None
        return status

    @_traced("enroll_many")
    async def enroll_many(
        self,
        campaign_id: str,
        contacts: Iterable[Mapping[str, Any]],
        *,
        batch_size: int = 1000,
        now: datetime | None = None,
    ) -> int:
        """Enroll many contacts, one pipelined round trip per batch; returns how many were
        enrolled (contacts already enrolled are skipped)."""
        campaign = await self.registry.get(campaign_id)
        total = 0
        batch: list[tuple[str, JobTarget, Mapping[str, Any]]] = []

        async def flush() -> int:
            moment = now or datetime.now(UTC)
            bases = [0] * len(batch)
            if campaign.reentry:
                rows = await self.store.records([t.enrollment_id for _, t, _ in batch], "step")
                bases = [int(r[0]) if r[0] else 0 for r in rows]
            items = [
                (t.enrollment_id,
                 self._enroll_transition(campaign, t, cid, c.get("attributes"), b, moment))
                for (cid, t, c), b in zip(batch, bases, strict=True)
            ]  # fmt: skip
            results = await self.store.apply_many(items)
            if self.on_transition is not None:
                for (eid, tr), r in zip(items, results, strict=True):
                    if r.ok:
                        self.on_transition(eid, tr.history[0])
            return sum(r.ok for r in results)

        for index, contact in enumerate(contacts):
            if not isinstance(contact, Mapping) or "contact_id" not in contact:
                raise InvalidRequest(f"contacts[{index}]: must be a dict with a 'contact_id'")
            cid = contact["contact_id"]
            try:
                target = self._target(campaign, cid, contact.get("timezone"))
                _check_attributes(contact.get("attributes"))
            except InvalidRequest as exc:
                raise InvalidRequest(f"contacts[{index}]: {exc}") from None
            batch.append((cid, target, contact))
            if len(batch) >= batch_size:
                total += await flush()
                batch = []
        if batch:
            total += await flush()
        return total

    # -- moving on (the worker's side) ---------------------------------------------------

    async def campaign_for(self, campaign_id: str, version: int) -> Campaign:
        """A stored campaign version (cached)."""
        return await self.registry.get(campaign_id, version)

    def _from_running(
        self, plan: Plan, target: JobTarget, *, step: int, attempt: int, job_id: str,
        now: datetime, new_attempt: int | None = None,
    ) -> Transition:  # fmt: skip
        """A transition that only the job running this step (``job_id``) may make."""
        return self.transition(
            plan, target, from_state=State.RUNNING, expect_states=(State.RUNNING,),
            expect_step=step, expect_attempt=attempt, expect_job=job_id,
            attempt=attempt if new_attempt is None else new_attempt, now=now,
        )  # fmt: skip

    @_traced("advance")
    async def advance(
        self, target: JobTarget, *, job_id: str, from_node: str, to_node: str | None,
        step: int, attempt: int, reason: str, now: datetime | None = None,
    ) -> Applied:  # fmt: skip
        """After a successful action: running -> wherever ``to_node`` leads."""
        now = now or datetime.now(UTC)
        campaign = await self.campaign_for(target.campaign_id, target.version)
        plan = self.plan(campaign, target, to_node, step, now, reason=reason)
        tr = self._from_running(plan, target, step=step, attempt=attempt, job_id=job_id, now=now)
        tr.unset.append("error")
        return await self._apply(target.enrollment_id, tr)

    @_traced("enter")
    async def enter(
        self, target: JobTarget, *, job_id: str, node: str | None, step: int, attempt: int,
        now: datetime | None = None,
    ) -> Applied:  # fmt: skip
        """A step job that lands on a wait or exit (after a delay): enter that node."""
        now = now or datetime.now(UTC)
        campaign = await self.campaign_for(target.campaign_id, target.version)
        plan = self.plan(campaign, target, node, step, now, count_first=False, reason="delay over")
        tr = self._from_running(plan, target, step=step, attempt=attempt, job_id=job_id, now=now)
        return await self._apply(target.enrollment_id, tr)

    @_traced("retry")
    async def retry(
        self, target: JobTarget, *, job_id: str, node: str, step: int, attempt: int,
        delay: timedelta, error: Mapping[str, Any], now: datetime | None = None,
    ) -> Applied:  # fmt: skip
        """A transient failure: running -> scheduled, attempt + 1, after ``delay`` (and in
        business hours when the node uses them)."""
        now = now or datetime.now(UTC)
        campaign = await self.campaign_for(target.campaign_id, target.version)
        run_at = now + delay
        cal = campaign.calendar_for(target.timezone)
        action = campaign.nodes[node]
        if (
            cal is not None
            and isinstance(action, ActionNode)
            and campaign.uses_business_hours(action)
        ):
            run_at = cal.next_open_spread(run_at, target.enrollment_id)
        job = self.planner.step_job(target, node, step, attempt + 1, run_at, now)
        reason = f"retry in {format_duration(run_at - now)} after {error.get('type')}: {error.get('message')}"
        plan = Plan(State.SCHEDULED, node, step, reason[:500], run_at=run_at, job=job)
        tr = self._from_running(plan, target, step=step, attempt=attempt, job_id=job_id, now=now,
                                new_attempt=attempt + 1)  # fmt: skip
        tr.set["error"] = orjson.dumps({**error, "node": node, "step": step, "attempt": attempt,
                                        "at": _ms(now)}).decode()  # fmt: skip
        return await self._apply(target.enrollment_id, tr)

    async def fail(
        self, target: JobTarget, *, job_id: str | None, node: str | None, step: int,
        attempt: int | None, error: Mapping[str, Any], expect_state: State = State.RUNNING,
        now: datetime | None = None,
    ) -> Applied:  # fmt: skip
        """A permanent failure, or attempts exhausted: -> failed, keeping the error."""
        now = now or datetime.now(UTC)
        reason = f"{error.get('type')}: {error.get('message')}"[:500]
        plan = Plan(State.FAILED, node, step, reason, error={**error, "node": node, "step": step})
        tr = self.transition(
            plan, target, from_state=expect_state, expect_states=(expect_state,),
            expect_step=step, expect_attempt=attempt, expect_job=job_id, attempt=attempt or 1,
            now=now,
        )  # fmt: skip
        return await self._apply(target.enrollment_id, tr)

    @_traced("defer")
    async def defer(
        self, target: JobTarget, *, job_id: str, node: str, step: int, attempt: int,
        run_at: datetime, now: datetime | None = None,
    ) -> Applied:  # fmt: skip
        """A step found its business-hours window closed: run it at ``run_at`` instead, as
        the same attempt."""
        now = now or datetime.now(UTC)
        job = self.planner.step_job(target, node, step, attempt, run_at, now, deferred=True)
        plan = Plan(State.SCHEDULED, node, step, "outside business hours: deferred to the next opening",
                    run_at=run_at, job=job)  # fmt: skip
        tr = self._from_running(plan, target, step=step, attempt=attempt, job_id=job_id, now=now)
        return await self._apply(target.enrollment_id, tr)

    async def release(
        self, target: JobTarget, *, job_id: str, node: str | None, step: int, attempt: int,
        reason: str, delay_ms: int = 0,
    ) -> Applied:  # fmt: skip
        """running -> scheduled for the same job and attempt: the worker hands the step back
        (shutting down, or its bookkeeping failed), so the step has not been used up."""
        now = datetime.now(UTC)
        at = _ms(now)
        entry = {"at": at, "from": State.RUNNING.value, "to": State.SCHEDULED.value,
                 "node": node, "step": step, "attempt": attempt, "reason": reason}  # fmt: skip
        tr = Transition(
            campaign_id=target.campaign_id, expect_states=(State.RUNNING,), expect_step=step,
            expect_attempt=attempt, expect_job=job_id,
            set={"state": State.SCHEDULED.value, "updated_at": str(at),
                 "run_at": str(at + delay_ms)},
            history=[entry], requeue_ms=at + delay_ms,
        )  # fmt: skip
        return await self._apply(target.enrollment_id, tr)

    async def release_timeout(self, target: JobTarget, *, job_id: str, step: int) -> Applied:
        """Hand a wait's timeout job back to the queue (the worker is shutting down)."""
        tr = Transition(
            campaign_id=target.campaign_id, expect_states=(State.WAITING,), expect_step=step,
            expect_job=job_id, requeue_ms=_ms(datetime.now(UTC)),
        )  # fmt: skip
        return await self.store.apply(target.enrollment_id, tr)

    @_traced("timeout")
    async def fire_timeout(
        self, target: JobTarget, *, job_id: str, node: str, step: int,
        now: datetime | None = None,
    ) -> Applied:  # fmt: skip
        """A wait's deadline passed: waiting -> ``on_timeout``, only if still waiting there."""
        now = now or datetime.now(UTC)
        campaign = await self.campaign_for(target.campaign_id, target.version)
        wait = campaign.nodes.get(node)
        if not isinstance(wait, WaitNode):
            raise CampaignNotFound(
                f"campaign {target.campaign_id!r} version {target.version} has no wait node {node!r}"
            )
        plan = self.plan(campaign, target, wait.on_timeout, step, now, reason=f"timeout of {node}")
        tr = self.transition(plan, target, from_state=State.WAITING, expect_states=(State.WAITING,),
                             expect_step=step, expect_job=job_id, now=now)  # fmt: skip
        return await self._apply(target.enrollment_id, tr)

    async def repair(self, enrollment_id: str, rec: Mapping[str, str]) -> Applied | None:
        """Re-create the job of an active enrollment that has none (the reconciler).

        ``scheduled`` gets its step job back (due at ``run_at``), ``waiting`` its timeout job
        (due at ``deadline``), and an orphaned ``running`` one goes back to ``scheduled``.
        Applied only if, atomically, the current job is neither queued nor leased. None when
        the record cannot be repaired (not active, or fields missing).
        """
        state = rec.get("state")
        if state not in _ACTIVE or not rec.get("campaign") or not rec.get("step"):
            return None
        now = datetime.now(UTC)
        step, attempt = int(rec["step"]), int(rec.get("attempt") or 1)
        node = rec.get("node") or None
        target = JobTarget(
            enrollment_id, rec["campaign"], int(rec.get("version") or 1),
            rec.get("timezone") or None, int(rec.get("base_step") or 0),
        )  # fmt: skip
        if state == State.WAITING:
            if node is None:
                return None
            deadline = datetime.fromtimestamp(int(rec.get("deadline") or _ms(now)) / 1000, UTC)
            job = self.planner.timeout_job(target, node, step, deadline, now)
            to_state = State.WAITING
        else:
            run_at = datetime.fromtimestamp(int(rec.get("run_at") or _ms(now)) / 1000, UTC)
            job = self.planner.step_job(
                target, node, step, attempt, run_at if state == State.SCHEDULED else now, now
            )
            to_state = State.SCHEDULED
        at = _ms(now)
        entry = {"at": at, "from": state, "to": to_state.value, "node": node, "step": step,
                 "attempt": attempt, "reason": f"reconciler: {state} with no job; job re-created"}  # fmt: skip
        fields = {"state": to_state.value, "job": job.id, "updated_at": str(at)}
        if to_state == State.SCHEDULED:
            fields["run_at"] = str(job.score_ms)
        tr = Transition(
            campaign_id=target.campaign_id, expect_states=(state,), expect_step=step,
            expect_attempt=attempt, expect_job=rec.get("job") or None, set=fields,
            history=[entry], add_job=job, orphan=True,
        )  # fmt: skip
        return await self._apply(enrollment_id, tr)

    # -- API-side operations ----------------------------------------------------------

    async def _load(self, enrollment_id: str) -> tuple[dict[str, str], Campaign, JobTarget]:
        if not isinstance(enrollment_id, str) or not enrollment_id:
            raise InvalidRequest("enrollment_id must be a non-empty string")
        rec = await self.store.record(enrollment_id)
        if rec is None:
            raise EnrollmentNotFound(f"no enrollment {enrollment_id!r}")
        try:
            campaign = await self.campaign_for(rec["campaign"], int(rec["version"]))
        except CampaignNotFound as exc:
            raise EnrollmentNotFound(f"enrollment {enrollment_id!r}: {exc}") from None
        target = JobTarget(
            enrollment_id, campaign.id, int(rec["version"]), rec.get("timezone") or None,
            int(rec.get("base_step") or 0),
        )  # fmt: skip
        return rec, campaign, target

    @_traced("signal")
    async def signal(
        self, enrollment_id: str, event: str, payload: Mapping[str, Any] | None = None
    ) -> bool:
        """Deliver an event; False when the enrollment is not waiting for it."""
        if not isinstance(event, str) or not event:
            raise InvalidRequest("event must be a non-empty string")
        for _ in range(_RACE_RETRIES):
            rec, campaign, target = await self._load(enrollment_id)
            if rec["state"] != State.WAITING:
                return False
            node_id = rec["node"]
            wait = campaign.nodes.get(node_id)
            if not isinstance(wait, WaitNode) or event not in wait.events:
                return False
            step = int(rec["step"])
            now = datetime.now(UTC)
            plan = self.plan(campaign, target, wait.on_event, step, now, reason=f"event {event}")
            ev = orjson.dumps({"name": event, "payload": dict(payload or {}), "at": _ms(now)})
            tr = self.transition(
                plan, target, from_state=State.WAITING, expect_states=(State.WAITING,),
                expect_step=step, now=now, extra={"event": ev.decode()},
            )  # fmt: skip
            result = await self._apply(enrollment_id, tr)
            if result.ok:
                return True
            if result.state != State.WAITING:
                return False  # the timeout (or a cancel) won the race
        return False

    async def cancel(self, enrollment_id: str, reason: str = "") -> bool:
        """Cancel an active enrollment and remove its pending job; False if already ended."""
        for _ in range(_RACE_RETRIES):
            rec, _campaign, target = await self._load(enrollment_id)
            if rec["state"] not in {s.value for s in ACTIVE_STATES}:
                return False
            now = datetime.now(UTC)
            step = int(rec["step"])
            plan = Plan(State.CANCELLED, rec.get("node") or None, step,
                        f"cancelled: {reason}" if reason else "cancelled")  # fmt: skip
            # Expect the job we remove to still be the current one: a worker may have
            # retried or deferred the step (same state and step, new job) since we read it.
            tr = self.transition(
                plan, target, from_state=rec["state"], expect_states=(rec["state"],),
                expect_step=step, expect_job=rec.get("job") or None,
                attempt=int(rec.get("attempt") or 1), now=now,
            )  # fmt: skip
            if (await self._apply(enrollment_id, tr)).ok:
                return True
        raise InvalidRequest(
            f"enrollment {enrollment_id!r} kept changing while cancelling; try again"
        )

    @_traced("replay")
    async def replay(self, enrollment_id: str) -> EnrollmentStatus:
        """failed -> scheduled at the node that failed, as a new step with fresh attempts."""
        rec, campaign, target = await self._load(enrollment_id)
        if rec["state"] != State.FAILED:
            raise InvalidRequest(
                f"enrollment {enrollment_id!r} is {rec['state']}; only failed enrollments can be replayed"
            )
        step = int(rec["step"])
        node = rec.get("node") or None
        if node is not None and node not in campaign.nodes:
            raise InvalidRequest(f"enrollment {enrollment_id!r} failed at unknown node {node!r}")
        now = datetime.now(UTC)
        plan = self.plan(campaign, target, node, step, now, reason="replayed")
        tr = self.transition(plan, target, from_state=State.FAILED, expect_states=(State.FAILED,),
                             expect_step=step, now=now)  # fmt: skip
        tr.unset.append("error")  # the history keeps what failed
        result = await self._apply(enrollment_id, tr)
        if not result.ok:
            raise InvalidRequest(f"enrollment {enrollment_id!r} changed while replaying; try again")
        status = await self.store.status(enrollment_id)
        assert status is not None
        return status

    async def status(self, enrollment_id: str) -> EnrollmentStatus:
        """The enrollment and its history; raises :class:`EnrollmentNotFound`."""
        if not isinstance(enrollment_id, str) or not enrollment_id:
            raise InvalidRequest("enrollment_id must be a non-empty string")
        status = await self.store.status(enrollment_id)
        if status is None:
            raise EnrollmentNotFound(f"no enrollment {enrollment_id!r}")
        return status


def error_info(exc: BaseException, *, trace_id: str | None = None) -> dict[str, Any]:
    """What a failed enrollment keeps of an exception."""
    return {
        "type": type(exc).__name__,
        "message": str(exc)[:2000],
        "traceback": "".join(tb.format_exception(exc))[-8000:],
        "trace_id": trace_id,
    }


def _check_attributes(attributes: Any) -> None:
    if attributes is None:
        return
    if not isinstance(attributes, Mapping):
        raise InvalidRequest("attributes must be a dict")
    try:
        orjson.dumps(attributes)
    except TypeError as exc:
        raise InvalidRequest(f"attributes must be JSON-serializable: {exc}") from None


def _join(notes: list[str], last: str) -> str:
    return "; ".join([*notes, last])
