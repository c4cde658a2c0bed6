"""The scheduling service: turns "enrollment E is now at node N" into state and jobs.

Planning is pure Python (definitions, business hours, delays); applying a plan is one atomic
Lua call through :class:`app.store.EnrollmentStore`. The worker's processors and the public
client both go through this service, so the rules live in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import traceback as tb
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from arq.connections import ArqRedis
from opentelemetry import trace

from app.campaigns import ActionNode, Campaign, DelayNode, ExitNode, WaitNode
from app.durations import format_duration
from app.errors import (
    AlreadyEnrolled,
    CampaignNotFound,
    EnrollmentNotFound,
    InvalidRequest,
)
from app.keys import Keys
from app.models import ACTIVE_STATES, EnrollmentStatus, State
from app.registry import CampaignRegistry
from app.settings import Settings
from app.store import Applied, EnrollmentStore, Job, Transition
from app.tracing import current_carrier, producer_span

__all__ = [
    "STEP_FUNCTION",
    "TIMEOUT_FUNCTION",
    "JobTarget",
    "Plan",
    "SchedulingService",
    "enrollment_id_for",
    "parse_job_id",
    "step_job_id",
    "timeout_job_id",
]

STEP_FUNCTION = "run_step"
TIMEOUT_FUNCTION = "fire_timeout"
_CONTACT_MAX = 256
_RACE_RETRIES = 5
_ACTIVE = {s.value for s in ACTIVE_STATES}
_NO_REENTRY = "; the campaign does not allow re-entry"


def enrollment_id_for(campaign_id: str, contact_id: str) -> str:
    """``"{campaign_id}:{contact_id}"``."""
    return f"{campaign_id}:{contact_id}"


def step_job_id(enrollment_id: str, step: int, attempt: int, run_at_ms: int | None = None) -> str:
    """Deterministic: the same step and attempt can never be queued twice. A business-hours
    deferral of the same attempt adds its new due time."""
    base = f"step:{enrollment_id}:{step}:{attempt}"
    return base if run_at_ms is None else f"{base}@{run_at_ms}"


def timeout_job_id(enrollment_id: str, step: int) -> str:
    """Deterministic id of a wait's timeout job."""
    return f"timeout:{enrollment_id}:{step}"


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
                attrs = {
                    "campaign.id"
                    if operation.startswith("enroll")
                    else "campaign.enrollment_id": first
                }
            with producer_span(operation, self.settings.queue_name, attrs):
                return await fn(self, *args, **kwargs)

        return wrapper

    return decorate


def parse_job_id(job_id: str) -> tuple[str, int] | None:
    """(enrollment id, step) of a step or timeout job id, else None."""
    try:
        if job_id.startswith("step:"):
            rest = job_id[5:]
            base, sep, tail = rest.rpartition("@")
            if sep and tail.isdigit():  # a deferral suffix; contact ids may contain '@'
                rest = base
            eid, step, _attempt = rest.rsplit(":", 2)
            return eid, int(step)
        if job_id.startswith("timeout:"):
            eid, step = job_id[8:].rsplit(":", 1)
            return eid, int(step)
    except ValueError:
        return None
    return None


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


@dataclass(frozen=True)
class JobTarget:
    """What a job carries besides its step: enough to plan without reading the record."""

    enrollment_id: str
    campaign_id: str
    version: int
    timezone: str | None
    #: The step this enrollment started after: steps keep growing across re-entries (so
    #: job ids stay unique), and the step limit counts from here.
    base_step: int = 0

    def kwargs(self, node: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "campaign": self.campaign_id,
            "version": self.version,
            "node": node,
            "tz": self.timezone,
        }
        if self.base_step:
            out["base"] = self.base_step
        carrier = current_carrier()
        if carrier:
            out["otel"] = carrier
        return out


@dataclass(frozen=True)
class Plan:
    """Where an enrollment lands after moving to a node (delays resolved on the spot)."""

    state: State
    node: str | None
    step: int
    reason: str
    run_at: datetime | None = None
    deadline: datetime | None = None
    job: Job | None = None
    error: dict[str, Any] | None = None


class SchedulingService:
    """Every enrollment state change, planned in Python and applied atomically in Redis."""

    def __init__(self, redis: ArqRedis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.registry = CampaignRegistry(redis, self.keys)
        self.store = EnrollmentStore(
            redis,
            self.keys,
            settings.queue_name,
            history_limit=settings.history_limit,
            job_expiry_extra_ms=int(settings.job_expiry_extra * 1000),
        )
        #: Called with (enrollment_id, history entry) after each applied transition.
        self.on_transition: Callable[[str, dict[str, Any]], None] | None = None

    # -- planning (pure) ---------------------------------------------------------------

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
        """Resolve ``node_id`` reached at ``now``; ``count_first`` bumps the step for it."""
        cal = campaign.calendar_for(target.timezone)
        t = now
        s = step
        notes = [reason] if reason else []
        first = True
        while True:
            if count_first or not first:
                s += 1
            first = False
            if s - target.base_step > self.settings.max_steps:
                return self._step_limit(node_id, s, notes)
            if node_id is None:
                return Plan(State.COMPLETED, None, s, _join(notes, "next: null"))
            node = campaign.nodes[node_id]
            if isinstance(node, ExitNode):
                return Plan(State.COMPLETED, node_id, s, _join(notes, f"exit {node_id}"))
            if isinstance(node, ActionNode):
                run_at = t
                if cal is not None and campaign.uses_business_hours(node):
                    run_at = cal.next_open_spread(t, target.enrollment_id)
                job = self._step_job(target, node_id, s, 1, run_at, now)
                return Plan(State.SCHEDULED, node_id, s, _join(notes, f"action {node_id}"),
                            run_at=run_at, job=job)  # fmt: skip
            if isinstance(node, WaitNode):
                if node.business_time and cal is not None:
                    deadline = cal.add(t, node.timeout)
                else:
                    deadline = t + node.timeout
                job = Job(
                    timeout_job_id(target.enrollment_id, s),
                    TIMEOUT_FUNCTION,
                    [target.enrollment_id, s],
                    target.kwargs(node_id),
                    max(_ms(deadline), _ms(now)),
                )
                events = ", ".join(sorted(node.events))
                return Plan(State.WAITING, node_id, s, _join(notes, f"wait for {events}"),
                            deadline=deadline, job=job)  # fmt: skip
            assert isinstance(node, DelayNode)
            if node.business_time and cal is not None:
                until = cal.add(t, node.duration)
            else:
                until = t + node.duration
            kind = " of business time" if node.business_time and cal is not None else ""
            notes.append(f"delay {node_id} {format_duration(node.duration)}{kind}")
            if until <= now:
                node_id, t = node.next, until
                continue
            # The delay has no job of its own: the node after it is scheduled at `until`.
            s += 1
            if s - target.base_step > self.settings.max_steps:
                return self._step_limit(node.next, s, notes)
            nxt = node.next
            run_at = until
            nxt_node = campaign.nodes.get(nxt) if nxt is not None else None
            if (
                isinstance(nxt_node, ActionNode)
                and cal is not None
                and campaign.uses_business_hours(nxt_node)
            ):
                run_at = cal.next_open_spread(until, target.enrollment_id)
            job = self._step_job(target, nxt, s, 1, run_at, now)
            return Plan(State.SCHEDULED, nxt, s, _join(notes, f"then {nxt or 'end'}"),
                        run_at=run_at, job=job)  # fmt: skip

    def _step_job(
        self,
        target: JobTarget,
        node: str | None,
        step: int,
        attempt: int,
        run_at: datetime,
        now: datetime,
        deferred: bool = False,
    ) -> Job:
        # arq fails on a _defer_until far in the past, and a past score only means "now".
        score = max(_ms(run_at), _ms(now))
        return Job(
            step_job_id(target.enrollment_id, step, attempt, score if deferred else None),
            STEP_FUNCTION,
            [target.enrollment_id, step, attempt],
            target.kwargs(node),
            score,
        )

    def _step_limit(self, node: str | None, step: int, notes: list[str]) -> Plan:
        limit = self.settings.max_steps
        message = f"enrollment exceeded the step limit of {limit} (CAMPAIGN_MAX_STEPS)"
        return Plan(
            State.FAILED,
            node,
            step,
            _join(notes, "step limit reached"),
            error={"type": "StepLimitExceeded", "message": message, "node": node, "step": step},
        )

    def transition(
        self,
        plan: Plan,
        *,
        from_state: str | None,
        expect_states: Iterable[str],
        expect_step: int | None,
        expect_attempt: int | None = None,
        expect_job: str | None = None,
        attempt: int = 1,
        now: datetime,
        extra: Mapping[str, str] | None = None,
        remove_jobs: Iterable[str] = (),
    ) -> Transition:
        """The atomic write that puts an enrollment where ``plan`` says."""
        at = _ms(now)
        fields: dict[str, str] = {
            "state": plan.state.value,
            "node": plan.node or "",
            "step": str(plan.step),
            "attempt": str(attempt),
            "updated_at": str(at),
        }
        unset = []
        for name, value in (("run_at", plan.run_at), ("deadline", plan.deadline)):
            if value is not None:
                fields[name] = str(max(_ms(value), at))
            else:
                unset.append(name)
        if plan.job is not None:
            fields["job"] = plan.job.id
        else:
            unset.append("job")
        if plan.error is not None:
            fields["error"] = orjson.dumps({**plan.error, "at": at, "attempt": attempt}).decode()
        if extra:
            fields.update(extra)
        entry = {
            "at": at,
            "from": from_state,
            "to": plan.state.value,
            "node": plan.node,
            "step": plan.step,
            "attempt": attempt,
            "reason": plan.reason,
        }
        return Transition(
            expect_states=tuple(expect_states),
            expect_step=expect_step,
            expect_attempt=expect_attempt,
            expect_job=expect_job,
            set=fields,
            unset=unset,
            history=[entry],
            add_job=plan.job,
            remove_jobs=list(remove_jobs),
        )

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
        tr = self.transition(plan, from_state=None, expect_states=(), expect_step=base_step,
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

    # -- moving on ------------------------------------------------------------------------

    async def campaign_for(self, campaign_id: str, version: int) -> Campaign:
        """A stored campaign version (cached)."""
        return await self.registry.get(campaign_id, version)

    @_traced("advance")
    async def advance(
        self,
        target: JobTarget,
        *,
        from_node: str,
        to_node: str | None,
        step: int,
        attempt: int,
        reason: str,
        now: datetime | None = None,
    ) -> Applied:
        """After a successful action: running -> wherever ``to_node`` leads."""
        now = now or datetime.now(UTC)
        campaign = await self.campaign_for(target.campaign_id, target.version)
        plan = self.plan(campaign, target, to_node, step, now, reason=reason)
        tr = self.transition(plan, from_state=State.RUNNING, expect_states=(State.RUNNING,),
                             expect_step=step, expect_attempt=attempt, now=now)  # fmt: skip
        tr.unset.append("error")
        return await self._apply(target.enrollment_id, tr)

    @_traced("enter")
    async def enter(
        self, target: JobTarget, *, node: str | None, step: int, attempt: int,
        now: datetime | None = None,
    ) -> Applied:  # fmt: skip
        """A step job that lands on a wait or exit (after a delay): enter that node."""
        now = now or datetime.now(UTC)
        campaign = await self.campaign_for(target.campaign_id, target.version)
        plan = self.plan(campaign, target, node, step, now, count_first=False, reason="delay over")
        tr = self.transition(plan, from_state=State.SCHEDULED, expect_states=(State.SCHEDULED,),
                             expect_step=step, expect_attempt=attempt, now=now)  # fmt: skip
        return await self._apply(target.enrollment_id, tr)

    @_traced("retry")
    async def retry(
        self,
        target: JobTarget,
        *,
        node: str,
        step: int,
        attempt: int,
        delay: timedelta,
        error: Mapping[str, Any],
        now: datetime | None = None,
    ) -> Applied:
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
        job = self._step_job(target, node, step, attempt + 1, run_at, now)
        reason = f"retry in {format_duration(run_at - now)} after {error.get('type')}: {error.get('message')}"
        plan = Plan(State.SCHEDULED, node, step, reason[:500], run_at=run_at, job=job)
        tr = self.transition(plan, from_state=State.RUNNING, expect_states=(State.RUNNING,),
                             expect_step=step, expect_attempt=attempt, attempt=attempt + 1,
                             now=now)  # fmt: skip
        tr.set["error"] = orjson.dumps({**error, "node": node, "step": step, "attempt": attempt,
                                        "at": _ms(now)}).decode()  # fmt: skip
        return await self._apply(target.enrollment_id, tr)

    async def fail(
        self,
        target: JobTarget,
        *,
        node: str | None,
        step: int,
        attempt: int | None,
        error: Mapping[str, Any],
        expect_state: State = State.RUNNING,
        now: datetime | None = None,
    ) -> Applied:
        """A permanent failure, or attempts exhausted: -> failed, keeping the error."""
        now = now or datetime.now(UTC)
        reason = f"{error.get('type')}: {error.get('message')}"[:500]
        plan = Plan(State.FAILED, node, step, reason, error={**error, "node": node, "step": step})
        tr = self.transition(plan, from_state=expect_state, expect_states=(expect_state,),
                             expect_step=step, expect_attempt=attempt, attempt=attempt or 1,
                             now=now)  # fmt: skip
        return await self._apply(target.enrollment_id, tr)

    async def is_pending_on(self, job_id: str) -> bool:
        """Whether an active enrollment still has ``job_id`` as its current job."""
        parsed = parse_job_id(job_id)
        if parsed is None:
            return False
        state, job = (await self.store.records([parsed[0]], "state", "job"))[0]
        return state in _ACTIVE and job == job_id

    async def is_superseded(self, job_id: str) -> bool:
        """Whether a step or timeout job is no longer its enrollment's current job."""
        parsed = parse_job_id(job_id)
        if parsed is None:
            return False
        rows = await self.store.records([parsed[0]], "job")
        return rows[0][0] != job_id

    async def fail_lost_job(self, job_id: str, reason: str) -> Applied | None:
        """arq dropped a step or timeout job without running it (undecodable, expired, too
        many tries): fail its enrollment if it still waits on that job, rather than leave it
        active forever. Returns None for job ids that are not ours."""
        parsed = parse_job_id(job_id)
        if parsed is None:
            return None
        enrollment_id, step = parsed
        rec = await self.store.record(enrollment_id)
        if rec is None or rec.get("state") not in _ACTIVE or rec.get("job") != job_id:
            # Not its current job (a stale duplicate, or the enrollment moved on): nothing lost.
            return Applied(False, rec.get("state") if rec else None, missing=rec is None)
        now = datetime.now(UTC)
        error = {
            "type": "JobDropped",
            "message": f"job {job_id} was dropped by the queue: {reason}",
        }
        plan = Plan(State.FAILED, rec.get("node") or None, step, f"JobDropped: {reason}"[:500],
                    error={**error, "node": rec.get("node") or None, "step": step})  # fmt: skip
        tr = self.transition(plan, from_state=rec["state"], expect_states=(rec["state"],),
                             expect_step=step, expect_job=job_id,
                             attempt=int(rec.get("attempt") or 1), now=now)  # fmt: skip
        return await self._apply(enrollment_id, tr)

    @_traced("defer")
    async def defer(
        self, target: JobTarget, *, node: str, step: int, attempt: int, run_at: datetime,
        job_id: str | None = None, expect_attempt: int | None = None,
        now: datetime | None = None,
    ) -> Applied:  # fmt: skip
        """A step job found its business-hours window closed: run it at ``run_at`` instead,
        as ``attempt``. Only the record's current job (``job_id``) may defer it; finding it
        'running' means a worker died mid-step and arq re-ran that job."""
        now = now or datetime.now(UTC)
        job = self._step_job(target, node, step, attempt, run_at, now, deferred=True)
        plan = Plan(State.SCHEDULED, node, step, "outside business hours: deferred to the next opening",
                    run_at=run_at, job=job)  # fmt: skip
        tr = self.transition(plan, from_state=State.SCHEDULED,
                             expect_states=(State.SCHEDULED, State.RUNNING), expect_step=step,
                             expect_attempt=expect_attempt if job_id else attempt,
                             expect_job=job_id, attempt=attempt, now=now)  # fmt: skip
        return await self._apply(target.enrollment_id, tr)

    async def release(
        self, target: JobTarget, *, node: str | None, step: int, attempt: int, job_id: str | None
    ) -> Applied:
        """running -> scheduled for the same job and attempt: the worker is shutting down and
        arq puts the job back in the queue, so the step has not been used up."""
        now = datetime.now(UTC)
        entry = {"at": _ms(now), "from": State.RUNNING.value, "to": State.SCHEDULED.value,
                 "node": node, "step": step, "attempt": attempt,
                 "reason": "worker shutting down: step handed back"}  # fmt: skip
        tr = Transition(
            expect_states=(State.RUNNING,), expect_step=step, expect_attempt=attempt,
            expect_job=job_id, set={"state": State.SCHEDULED.value, "updated_at": str(_ms(now))},
            history=[entry],
        )  # fmt: skip
        return await self._apply(target.enrollment_id, tr)

    @_traced("timeout")
    async def fire_timeout(
        self, target: JobTarget, *, node: str, step: int, now: datetime | None = None
    ) -> Applied:
        """A wait's deadline passed: waiting -> ``on_timeout``, only if still waiting there."""
        now = now or datetime.now(UTC)
        campaign = await self.campaign_for(target.campaign_id, target.version)
        wait = campaign.nodes[node]
        assert isinstance(wait, WaitNode)
        plan = self.plan(campaign, target, wait.on_timeout, step, now, reason=f"timeout of {node}")
        tr = self.transition(plan, from_state=State.WAITING, expect_states=(State.WAITING,),
                             expect_step=step, expect_job=timeout_job_id(target.enrollment_id, step),
                             now=now)  # fmt: skip
        return await self._apply(target.enrollment_id, tr)

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
                plan, from_state=State.WAITING, expect_states=(State.WAITING,), expect_step=step,
                now=now, extra={"event": ev.decode()},
                remove_jobs=[timeout_job_id(enrollment_id, step)],
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
            rec, _campaign, _target = await self._load(enrollment_id)
            if rec["state"] not in {s.value for s in ACTIVE_STATES}:
                return False
            now = datetime.now(UTC)
            step = int(rec["step"])
            plan = Plan(State.CANCELLED, rec.get("node") or None, step,
                        f"cancelled: {reason}" if reason else "cancelled")  # fmt: skip
            # Expect the job we remove to still be the current one: a worker may have
            # retried or deferred the step (same state and step, new job) since we read it.
            tr = self.transition(
                plan, from_state=rec["state"], expect_states=(rec["state"],), expect_step=step,
                expect_job=rec.get("job") or None, attempt=int(rec.get("attempt") or 1), now=now,
                remove_jobs=[j for j in (rec.get("job"),) if j],
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
        tr = self.transition(plan, from_state=State.FAILED, expect_states=(State.FAILED,),
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
