"""The scheduling service: every enrollment state change, as commands.

Planning is pure (:mod:`app.planner`); applying a plan is one atomic Lua call through
:class:`app.store.EnrollmentStore`, which also swaps the enrollment's job. The public
client and the worker's processors both go through this service, so the rules live in
one place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import traceback as tb
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson
from arq.connections import ArqRedis
from opentelemetry import trace
from redis.exceptions import RedisError

from app.campaigns import ActionNode, Campaign, Limits, WaitNode, check_json, zone_problem
from app.durations import format_duration
from app.errors import (
    AlreadyEnrolled,
    CampaignError,
    CampaignNotFound,
    CorruptRecord,
    EnrollManyError,
    EnrollmentNotFound,
    InvalidRequest,
    InvalidRow,
    InvalidState,
)
from app.jobs import (
    JobTarget,
    enrollment_id_for,
)
from app.keys import Keys
from app.models import ACTIVE_STATES, EnrollManyResult, EnrollmentStatus, State
from app.planner import Plan, Planner, ms
from app.registry import CampaignRegistry
from app.settings import Settings
from app.store import (
    PURGED,
    Applied,
    EnrollmentStore,
    NewEnrollment,
    Transition,
    creation_entry,
    now_ms,
    to_status,
    with_derived,
)
from app.tracing import enabled as tracing_enabled
from app.tracing import producer_span

__all__ = ["SchedulingService", "error_info"]

_CONTACT_MAX = 256
# What writing a batch can raise besides our own errors: redis-py's, sockets, timeouts.
_WRITE_ERRORS = (CampaignError, RedisError, OSError, TimeoutError)
_RACE_RETRIES = 5
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f]")
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
            if not tracing_enabled():
                return await fn(self, *args, **kwargs)
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
        self.registry = CampaignRegistry(redis, self.keys, Limits.from_settings(settings))
        self.store = EnrollmentStore(redis, self.keys, history_limit=settings.history_limit)
        self.planner = Planner(settings.max_steps)
        self.plan = self.planner.plan  # the pure planning the commands and tests share
        self.transition = self.planner.transition
        #: The queue name spans and logs use for campaign jobs.
        self.destination = f"{settings.key_prefix}:queue"
        #: Called with (enrollment_id, history entry) after each applied transition.
        self.on_transition: Callable[[str, dict[str, Any]], None] | None = None

    @staticmethod
    def _annotate(enrollment_id: str, state: str | None, job_id: str | None, node: Any) -> None:
        """What the current (producer) span says about the change it makes."""
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("campaign.enrollment_id", enrollment_id)
            if state:
                span.set_attribute("campaign.to_state", state)
            if job_id:
                span.set_attribute("messaging.message.id", job_id)
                span.set_attribute("campaign.node", str(node))

    async def _apply(self, enrollment_id: str, tr: Transition) -> Applied:
        job = tr.add_job
        self._annotate(enrollment_id, tr.new_state, job.id if job else None,
                       job.kwargs.get("node") if job else None)  # fmt: skip
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
        if _SPACE_OR_CONTROL.search(contact_id):
            raise InvalidRequest(
                f"contact_id {contact_id!r} contains whitespace or control characters"
            )
        if not _is_unicode(contact_id):
            raise InvalidRequest("contact_id is not valid Unicode (lone surrogate)")
        if timezone is not None:
            problem = zone_problem(timezone)
            if problem:
                raise InvalidRequest(f"timezone: {problem}")
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
        place: Placement | None = None,
    ) -> Transition:
        target = dataclasses.replace(target, base_step=base_step)
        plan = self._entry_plan(campaign, target, base_step, now, place)
        at = str(_ms(now))
        # Only what the contract needs and the id does not say: no campaign or contact
        # field, no time zone or base step when there is none (issue: bytes per enrollment).
        extra = {
            "version": str(campaign.version),
            "attributes": orjson.dumps(dict(attributes or {})).decode(),
            "created_at": at,
        }
        if target.timezone:
            extra["timezone"] = target.timezone
        if base_step:
            extra["base_step"] = str(base_step)
        tr = self.transition(plan, target, from_state=None, expect_states=(), expect_step=base_step,
                             now=now, extra=extra)  # fmt: skip
        tr.create = True
        tr.reentry = campaign.reentry
        tr.unset.extend(["error", "event"])
        tr.unset.extend(f for f in ("timezone", "base_step") if f not in extra)
        return tr

    def _entry_plan(
        self, campaign: Campaign, target: JobTarget, base_step: int, now: datetime,
        place: Placement | None,
    ) -> Plan:  # fmt: skip
        """Where a new enrollment starts: the entry node now, or (an import) the node and
        due time it is placed at."""
        if place is None or (place.node is None and place.run_at is None):
            return self._plan(campaign, target, campaign.entry, base_step, now, reason="enrolled")
        node = place.node or campaign.entry
        if node not in campaign.nodes:
            raise InvalidRequest(
                f"node {node!r} is not in campaign {campaign.id!r} version {campaign.version}"
            )
        try:
            return self.planner.place(campaign, target, node, base_step, place.run_at, now,
                                      reason="enrolled")  # fmt: skip
        except (ValueError, OverflowError, RuntimeError) as exc:
            raise InvalidRequest(
                f"cannot schedule {target.enrollment_id!r} at node {node!r}: {exc}"
            ) from None

    def _new_rows(
        self, campaign: Campaign,
        batch: Sequence[tuple[JobTarget, Mapping[str, Any], Placement | None]], now: datetime,
    ) -> list[_NewGroup]:  # fmt: skip
        """Plan a batch of new enrollments for calls of ``lua/enroll.lua``, one per group of
        rows that start alike (state, node, step): the fields every record of the group
        shares, the name of its due-time field, and a row per contact. Where the entry's
        plan does not depend on the contact (no business hours in its zone), it is made
        once per time zone, not per contact. A plain batch is one group.

        A contact that is in the batch more than once: its second row goes in a group
        written after every first row, its third after those, and so on (the groups come
        in that order), so the first row wins and the others count as already enrolled,
        as they would in later batches."""
        at = _ms(now)
        enqueued = now_ms()  # "et": when it was queued, whatever time the plan was made for
        plans: dict[str | None, Plan] = {}
        groups: dict[tuple[int, str, str, int, bool, bool], _NewGroup] = {}
        seen: dict[str, int] = {}  # enrollment id -> rows of it so far
        for offset, (target, contact, place) in enumerate(batch):
            tz = target.timezone
            if place is None and tz in plans:
                plan = plans[tz]
            else:
                try:
                    plan = self._entry_plan(campaign, target, 0, now, place)
                except InvalidRequest as exc:
                    raise _RowError(offset, exc) from None
                if place is None and campaign.calendar_for(tz) is None:
                    plans[tz] = plan
            job, due = plan.job, plan.run_at or plan.deadline
            job_id, payload = "", ""
            eid = target.enrollment_id
            if job is not None:
                job = job.retarget(eid)  # a plan shared by a time zone: this contact's job
                job_id, payload = job.id, job.payload(enqueued).decode()
            attributes = contact.get("attributes")
            row = NewEnrollment(
                eid, job_id, payload, max(_ms(due), at) if due is not None else 0,
                orjson.dumps(dict(attributes or {})).decode(), tz or "",
            )  # fmt: skip
            generation = seen.get(eid, 0)
            seen[eid] = generation + 1
            shape = (generation, plan.state.value, plan.node or "", plan.step,
                     plan.run_at is not None, plan.error is not None)  # fmt: skip
            group = groups.get(shape)
            if group is None:
                common = {"state": plan.state.value, "node": plan.node or "",
                          "step": str(plan.step), "attempt": "1",
                          "version": str(campaign.version), "created_at": str(at),
                          "updated_at": str(at)}  # fmt: skip
                if plan.error is not None:
                    common["error"] = orjson.dumps({**plan.error, "at": at, "attempt": 1}).decode()
                time_field = (
                    "run_at" if plan.run_at is not None else "deadline" if plan.deadline else ""
                )
                group = groups[shape] = _NewGroup(plan, common, time_field, [], [], generation)
            group.rows.append(row)
            group.offsets.append(offset)
        return sorted(groups.values(), key=lambda g: g.generation)  # stable: first rows first

    async def _create_groups(
        self, campaign: Campaign, groups: Sequence[_NewGroup]
    ) -> list[int | str]:
        """Write planned groups (one Lua call per group and shard); results in row order."""
        size = sum(len(g.rows) for g in groups)
        out: list[int | str] = [0] * size
        for group in groups:
            codes = await self.store.create_many(
                campaign.id, group.plan.state.value, group.common, group.time_field, group.rows
            )
            for offset, code in zip(group.offsets, codes, strict=True):
                out[offset] = code
        return out

    async def _enroll_new(
        self, campaign: Campaign, target: JobTarget, attributes: Mapping[str, Any] | None,
        now: datetime, place: Placement | None,
    ) -> EnrollmentStatus:  # fmt: skip
        """One round trip: create the record and its job, and build the status from what
        was written (a campaign without re-entry never replaces a record)."""
        try:
            [group] = self._new_rows(campaign, [(target, {"attributes": attributes}, place)], now)
        except _RowError as err:
            raise err.error from None
        plan, common, time_field, rows = group.plan, group.common, group.time_field, group.rows
        [result] = await self.store.create_many(campaign.id, plan.state.value, common,
                                                time_field, rows)  # fmt: skip
        eid = target.enrollment_id
        if result == PURGED:
            raise _Purged
        self._annotate(eid, plan.state.value, rows[0].job_id or None, plan.node)
        if result == -2:
            raise InvalidRequest(
                f"cannot enroll {target.enrollment_id.partition(':')[2]!r}: job "
                f"{rows[0].job_id!r} is still queued from an earlier enrollment with the same id"
            )
        if result != 1:
            hint = "" if result in _ACTIVE else _NO_REENTRY
            raise AlreadyEnrolled(
                f"contact {eid.partition(':')[2]!r} is already enrolled in campaign "
                f"{campaign.id!r} (enrollment {eid} is {result}){hint}"
            )
        self._created(plan, eid, now)
        rec = with_derived(eid, {**common, "attributes": rows[0].attributes})
        if rows[0].job_id:
            rec["job"] = rows[0].job_id
        if time_field:
            rec[time_field] = str(rows[0].due_ms)
        if rows[0].timezone:
            rec["timezone"] = rows[0].timezone
        return to_status(eid, rec, [creation_entry(rec)])

    def _created(self, plan: Plan, eid: str, now: datetime) -> None:
        if self.on_transition is not None:
            self.on_transition(eid, {"at": _ms(now), "from": None, "to": plan.state.value,
                                     "node": plan.node, "step": plan.step, "attempt": 1,
                                     "reason": plan.reason})  # fmt: skip

    def _placement(self, node: Any, run_at: Any, now: datetime | None) -> Placement | None:
        """Check an import's ``node``/``run_at`` (None when neither is given)."""
        if node is None and run_at is None:
            return None
        limit = self.settings.max_name_length
        if node is not None and (not isinstance(node, str) or not node or len(node) > limit):
            raise InvalidRequest(f"node must be a non-empty string of at most {limit} characters")
        when = None if run_at is None else _check_run_at(run_at)
        if when is not None:
            horizon = (now or datetime.now(UTC)) + self.settings.max_duration
            if when > horizon:
                raise InvalidRequest(
                    f"run_at {when.isoformat()} is further ahead than CAMPAIGN_MAX_DURATION "
                    f"({format_duration(self.settings.max_duration)})"
                )
        return Placement(node, when)

    def check_enroll_row(
        self, campaign: Campaign, contact: Any, now: datetime | None = None
    ) -> tuple[str, JobTarget, Placement | None]:
        """Check one row of :meth:`enroll_many` for ``campaign`` (the version it would be
        enrolled in) without writing anything: a dict with a valid ``contact_id``,
        ``timezone`` and ``attributes``, and a ``node``/``run_at`` placement whose node
        exists in that version. Returns (contact id, job target, placement); raises
        :class:`~app.errors.InvalidRequest` naming the problem. Only planning (e.g. a
        business-hours span past the horizon) can still refuse a row that passes."""
        if not isinstance(contact, Mapping) or "contact_id" not in contact:
            raise InvalidRequest("must be a dict with a 'contact_id'")
        cid = contact["contact_id"]
        target = self._target(campaign, cid, contact.get("timezone"))
        _check_attributes(contact.get("attributes"), self.settings.max_attributes_bytes)
        place = self._placement(contact.get("node"), contact.get("run_at"), now)
        if place is not None and place.node is not None and place.node not in campaign.nodes:
            raise InvalidRequest(
                f"node {place.node!r} is not in campaign {campaign.id!r} version {campaign.version}"
            )
        return cid, target, place

    @_traced("enroll")
    async def enroll(
        self,
        campaign_id: str,
        contact_id: str,
        attributes: Mapping[str, Any] | None = None,
        timezone: str | None = None,
        *,
        node: str | None = None,
        run_at: datetime | str | None = None,
        now: datetime | None = None,
    ) -> EnrollmentStatus:
        """Enroll one contact in the latest version; raises :class:`AlreadyEnrolled`.

        ``node`` and ``run_at`` place it part-way through the campaign (an import): see
        :meth:`app.planner.Planner.place`."""
        campaign = await self.registry.get(campaign_id)
        target = self._target(campaign, contact_id, timezone)
        _check_attributes(attributes, self.settings.max_attributes_bytes)
        place = self._placement(node, run_at, now)
        if not campaign.reentry:
            try:
                return await self._enroll_new(campaign, target, attributes,
                                              now or datetime.now(UTC), place)  # fmt: skip
            except _Purged:
                pass  # enrolled before and purged: its steps go on (below)
        result = await self._enroll_by_transition(campaign, target, contact_id, attributes,
                                                  place, now)  # fmt: skip
        if result.job_conflict:
            raise InvalidRequest(
                f"cannot enroll {contact_id!r}: job {result.job_conflict!r} is still queued "
                "from an earlier enrollment with the same id"
            )
        if not result.ok:
            hint = "" if result.state in _ACTIVE else _NO_REENTRY
            raise AlreadyEnrolled(
                f"contact {contact_id!r} is already enrolled in campaign {campaign_id!r} "
                f"(enrollment {target.enrollment_id} is {result.state}){hint}"
            )
        return await self.status(target.enrollment_id)

    async def _enroll_by_transition(
        self, campaign: Campaign, target: JobTarget, contact_id: str,
        attributes: Mapping[str, Any] | None, place: Placement | None, now: datetime | None,
    ) -> Applied:  # fmt: skip
        """Create the record through ``lua/transition.lua`` (a re-entry replaces a finished
        one). Its steps go on from the base step the script reports: the step of the
        finished record it replaces, or of the tombstone a purged enrollment with this id
        left, so job ids and idempotency keys never repeat. Returns the last outcome: ok,
        a job conflict, or the state of the record in the way."""
        base = 0
        for _ in range(_RACE_RETRIES):
            moment = now or datetime.now(UTC)
            tr = self._enroll_transition(campaign, target, contact_id, attributes, base, moment,
                                         place)  # fmt: skip
            result = await self._apply(target.enrollment_id, tr)
            if result.ok or result.job_conflict:
                return result
            if result.state is not None and (result.state in _ACTIVE or not campaign.reentry):
                return result
            base = result.step or 0  # go on from the finished (or purged) enrollment's step
        raise AlreadyEnrolled(f"enrollment {target.enrollment_id} kept changing; try again")

    @_traced("enroll_many")
    async def enroll_many(
        self,
        campaign_id: str,
        contacts: Iterable[Mapping[str, Any]],
        *,
        batch_size: int = 1000,
        now: datetime | None = None,
    ) -> EnrollManyResult:
        """Enroll many contacts, one pipelined round trip per batch of ``batch_size``.

        Returns how many were enrolled, as an :class:`~app.models.EnrollManyResult` (an
        ``int``) that also counts the rows skipped: contacts already enrolled
        (``already_enrolled``), and contacts whose job id is still taken by a job queued
        from an earlier enrollment with the same id (``conflicts``, with row and reason).

        A batch is written only once all its rows are valid. When it stops part-way (a bad
        row: :class:`~app.errors.InvalidRow`, an ``InvalidRequest``; the iterable raising
        or a Redis error: :class:`~app.errors.EnrollManyError`, the original exception as
        ``__cause__``) the error carries ``.enrolled`` (contacts enrolled before),
        ``.row`` (the row that stopped it; for a Redis error the first row of the batch
        being written) and ``.processed`` (every row before it was handled; nothing from
        there on was written, except rows of a batch that a Redis error cut short). Running
        the same rows again is safe: contacts already enrolled are skipped.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidRequest(
                f"batch_size must be a whole number of at least 1 (got {batch_size!r})"
            )
        campaign = await self.registry.get(campaign_id)
        try:
            rows = iter(contacts)
        except TypeError:
            raise InvalidRequest("contacts must be an iterable of dicts") from None
        total = already = conflict_count = 0
        conflicts: list[tuple[int, str, str]] = []
        processed = 0  # rows before this one were written (enrolled or skipped)
        batch: list[tuple[str, JobTarget, Mapping[str, Any], Placement | None]] = []

        def how_far(row: int) -> str:
            if processed == 0:
                return f"enroll_many stopped at row {row}: nothing was enrolled"
            return (
                f"enroll_many stopped at row {row}: {total} enrolled from rows 0-{processed - 1}, "
                f"nothing written from row {processed} on"
            )

        pending: tuple[asyncio.Task[list[int | str]], list[_NewGroup],
                       list[tuple[str, JobTarget, Mapping[str, Any], Placement | None]],
                       datetime] | None = None  # fmt: skip

        def stopped(
            row: int, reason: str, kind: type[EnrollManyError] = InvalidRow
        ) -> EnrollManyError:
            """The error that stops enroll_many at ``row``, saying how far it got."""
            return kind(f"contacts[{row}]: {reason}; {how_far(row)}", enrolled=total, row=row,
                        processed=processed, reason=reason)  # fmt: skip

        def write_failed(exc: BaseException, size: int) -> EnrollManyError:
            last = processed + size - 1
            reason = f"writing rows {processed}-{last} failed: {type(exc).__name__}: {exc}"
            return EnrollManyError(
                f"contacts[{processed}]: {reason}; {how_far(processed)} (rows "
                f"{processed}-{last} may be partly enrolled; enrolling the same rows again "
                "is safe)",
                enrolled=total,
                row=processed,
                processed=processed,
                reason=reason,
            )

        def tally(offset: int, enrolled: bool, conflict: str | None, cids: list[str]) -> None:
            """Count one row's outcome: enrolled, its job id taken, or already enrolled."""
            nonlocal total, already, conflict_count
            if enrolled:
                total += 1
            elif conflict:
                conflict_count += 1
                if len(conflicts) < 100:
                    reason = (
                        f"job {conflict!r} is still queued from an earlier enrollment with "
                        "the same id"
                    )
                    conflicts.append((processed + offset, cids[offset], reason))
            else:
                already += 1

        async def settle() -> None:
            """Count the batch whose write is in flight (raising if it failed)."""
            nonlocal pending, processed
            if pending is None:
                return
            task, groups, written, moment = pending
            pending = None
            cids = [cid for cid, _, _, _ in written]
            try:
                codes = await task
                # Rows a purged enrollment left a tombstone for (rare): created one by one,
                # in row order, going on from its last step.
                purged: dict[int, Applied] = {}
                for offset, code in enumerate(codes):
                    if code == PURGED:
                        cid, t, c, p = written[offset]
                        purged[offset] = await self._enroll_by_transition(
                            campaign, t, cid, c.get("attributes"), p, moment
                        )
            except _WRITE_ERRORS as exc:
                raise write_failed(exc, len(cids)) from exc
            for group in groups:
                for row, offset in zip(group.rows, group.offsets, strict=True):
                    code = codes[offset]
                    if code == PURGED:
                        r = purged[offset]
                        tally(offset, r.ok, r.job_conflict, cids)
                        continue
                    if code == 1:
                        self._created(group.plan, row.enrollment_id, moment)
                    tally(offset, code == 1, row.job_id if code == -2 else None, cids)
            processed += len(cids)

        async def flush_fast() -> None:
            """Plan this batch while the previous one is written (one Lua call each), so
            the client's Python and Redis work at the same time."""
            nonlocal pending
            moment = now or datetime.now(UTC)
            try:
                groups = self._new_rows(campaign, [(t, c, p) for _, t, c, p in batch], moment)
            except _RowError as err:
                await settle()
                raise stopped(processed + err.offset, str(err.error)) from None
            await settle()
            task = asyncio.ensure_future(self._create_groups(campaign, groups))
            task.add_done_callback(_retrieved)
            pending = (task, groups, list(batch), moment)
            batch.clear()

        async def flush() -> None:
            nonlocal processed
            if not campaign.reentry:
                await flush_fast()
                return
            moment = now or datetime.now(UTC)
            items: list[tuple[str, Transition]] = []
            results: list[Applied] = []
            try:
                # re-entry: one transition per contact (its base step decides its job ids)
                steps = await self.store.records([t.enrollment_id for _, t, _, _ in batch], "step")
                bases = [
                    _base_step(r[0], t.enrollment_id)
                    for (_, t, _, _), r in zip(batch, steps, strict=True)
                ]
                for offset, ((cid, t, c, p), b) in enumerate(zip(batch, bases, strict=True)):
                    try:
                        tr = self._enroll_transition(
                            campaign, t, cid, c.get("attributes"), b, moment, p
                        )
                    except InvalidRequest as exc:
                        raise stopped(processed + offset, str(exc)) from None
                    items.append((t.enrollment_id, tr))
                results = await self.store.apply_many(items)
                for offset, r in enumerate(results):
                    if not r.ok and r.state is None and not r.job_conflict:
                        # no record, and a purged enrollment's tombstone says another base
                        # step (rare): one by one, going on from it
                        _, t, c, p = batch[offset]
                        results[offset] = await self._enroll_by_transition(
                            campaign, t, batch[offset][0], c.get("attributes"), p, moment
                        )
                        if results[offset].ok:
                            items[offset] = (
                                t.enrollment_id,
                                dataclasses.replace(items[offset][1], history=[]),
                            )  # _apply reported it
            except EnrollManyError:
                raise
            except _WRITE_ERRORS as exc:
                raise write_failed(exc, len(batch)) from exc
            cids = [cid for cid, _, _, _ in batch]
            for offset, ((eid, tr), r) in enumerate(zip(items, results, strict=True)):
                if r.ok and self.on_transition is not None and tr.history:
                    self.on_transition(eid, tr.history[0])
                tally(offset, r.ok, r.job_conflict, cids)
            processed += len(batch)
            batch.clear()

        index = -1
        while True:
            try:
                contact = next(rows)
            except StopIteration:
                break
            except Exception as exc:
                await settle()  # the batch in flight counts in what was enrolled
                reason = f"reading the contacts failed: {type(exc).__name__}: {exc}"
                kind = InvalidRow if isinstance(exc, InvalidRequest) else EnrollManyError
                raise stopped(index + 1, reason, kind) from exc
            index += 1
            try:
                cid, target, place = self.check_enroll_row(campaign, contact, now)
            except InvalidRequest as exc:
                await settle()
                raise stopped(index, str(exc)) from None
            batch.append((cid, target, contact, place))
            if len(batch) >= batch_size:
                await flush()
        if batch:
            await flush()
        await settle()
        return EnrollManyResult(total, already_enrolled=already, conflicts=tuple(conflicts),
                                conflict_count=conflict_count)  # fmt: skip

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

    async def release_timeout(
        self, target: JobTarget, *, job_id: str, step: int, delay_ms: int = 0
    ) -> Applied:
        """Hand a wait's timeout job back to the queue, due after ``delay_ms``."""
        tr = Transition(
            campaign_id=target.campaign_id, expect_states=(State.WAITING,), expect_step=step,
            expect_job=job_id, requeue_ms=_ms(datetime.now(UTC)) + delay_ms,
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

    async def fail_corrupt(
        self, enrollment_id: str, rec: Mapping[str, str], reason: str
    ) -> Applied:
        """Fail an active enrollment whose record cannot be planned from (a field missing or
        unreadable) with ``CorruptRecord``, retiring whatever job it had."""
        state = rec.get("state") or ""
        at = _ms(datetime.now(UTC))
        error = {"type": "CorruptRecord", "message": f"enrollment {enrollment_id!r}: {reason}",
                 "at": at}  # fmt: skip
        entry = {"at": at, "from": state, "to": State.FAILED.value, "node": rec.get("node") or None,
                 "step": 0, "attempt": None, "reason": f"CorruptRecord: {reason}"[:500]}  # fmt: skip
        tr = Transition(
            campaign_id=enrollment_id.partition(":")[0], expect_states=(state,),
            expect_job=rec.get("job") or None,
            set={"state": State.FAILED.value, "updated_at": str(at),
                 "error": orjson.dumps(error).decode()},
            unset=["job"], history=[entry],
        )  # fmt: skip
        return await self._apply(enrollment_id, tr)

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

    def _plan(
        self, campaign: Campaign, target: JobTarget, node_id: str | None, step: int,
        now: datetime, *, reason: str,
    ) -> Plan:  # fmt: skip
        """:meth:`plan` for the client's commands: a node that cannot be scheduled (a
        business-time span past the horizon, a date out of range) is an InvalidRequest."""
        try:
            return self.plan(campaign, target, node_id, step, now, reason=reason)
        except (ValueError, OverflowError, RuntimeError) as exc:
            raise InvalidRequest(
                f"cannot schedule {target.enrollment_id!r} from node {node_id!r}: {exc}"
            ) from None

    async def _load(self, enrollment_id: str) -> tuple[dict[str, str], Campaign, JobTarget]:
        """The record, its campaign version and job target; a field that cannot be read is
        a :class:`CorruptRecord` for this enrollment."""
        _check_enrollment_id(enrollment_id)
        rec = await self.store.record(enrollment_id)
        if rec is None:
            raise EnrollmentNotFound(f"no enrollment {enrollment_id!r}")
        _check_record(enrollment_id, rec)
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
        limit = self.settings.max_name_length
        if not isinstance(event, str) or not event or len(event) > limit:
            raise InvalidRequest(f"event must be a non-empty string of at most {limit} characters")
        if not _is_unicode(event):
            raise InvalidRequest("event is not valid Unicode (lone surrogate)")
        body = _check_payload(payload, self.settings.max_payload_bytes)
        _check_enrollment_id(enrollment_id)
        for _ in range(_RACE_RETRIES):
            rec, campaign, target = await self._load(enrollment_id)
            if rec["state"] != State.WAITING:
                return False
            node_id = rec.get("node") or ""
            wait = campaign.nodes.get(node_id)
            if not isinstance(wait, WaitNode) or event not in wait.events:
                return False
            step = int(rec["step"])
            now = datetime.now(UTC)
            plan = self._plan(campaign, target, wait.on_event, step, now, reason=f"event {event}")
            ev = b'{"name":%b,"payload":%b,"at":%d}' % (orjson.dumps(event), body, _ms(now))
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
        limit = self.settings.max_reason_length
        if not isinstance(reason, str) or len(reason) > limit:
            raise InvalidRequest(
                f"reason must be a string of at most {limit} characters "
                "(CAMPAIGN_MAX_REASON_LENGTH)"
            )
        if not _is_unicode(reason):
            raise InvalidRequest("reason is not valid Unicode (lone surrogate)")
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
        raise InvalidState(
            f"enrollment {enrollment_id!r} kept changing while cancelling; try again"
        )

    @_traced("replay")
    async def replay(
        self, enrollment_id: str, *, to_version: int | None = None
    ) -> EnrollmentStatus:
        """failed -> scheduled at the node that failed, as a new step with fresh attempts;
        with ``to_version``, on that version of the campaign (the node must exist there)."""
        rec, campaign, target = await self._load(enrollment_id)
        if rec["state"] != State.FAILED:
            raise InvalidState(
                f"enrollment {enrollment_id!r} is {rec['state']}; only failed enrollments can be replayed"
            )
        reason = "replayed"
        if to_version is not None and to_version != campaign.version:
            reason = f"replayed on version {to_version} (was {campaign.version})"
            campaign = await self.registry.get(campaign.id, to_version)
            target = dataclasses.replace(target, version=to_version)
        step = int(rec["step"])
        node = rec.get("node") or None
        if node is not None and node not in campaign.nodes:
            raise InvalidRequest(
                f"enrollment {enrollment_id!r} failed at node {node!r}, which is not in "
                f"version {campaign.version} of campaign {campaign.id!r}"
            )
        now = datetime.now(UTC)
        plan = self._plan(campaign, target, node, step, now, reason=reason)
        tr = self.transition(plan, target, from_state=State.FAILED, expect_states=(State.FAILED,),
                             expect_step=step, now=now,
                             extra={"version": str(campaign.version)})  # fmt: skip
        tr.unset.append("error")  # the history keeps what failed
        result = await self._apply(enrollment_id, tr)
        if not result.ok:
            raise InvalidState(f"enrollment {enrollment_id!r} changed while replaying; try again")
        return await self.status(enrollment_id)

    async def status(self, enrollment_id: str) -> EnrollmentStatus:
        """The enrollment and its history; raises :class:`EnrollmentNotFound`, or
        :class:`CorruptRecord` when a stored field cannot be read."""
        _check_enrollment_id(enrollment_id)
        try:
            status = await self.store.status(enrollment_id)
        except ValueError as exc:  # a history entry that is not JSON
            raise CorruptRecord(
                f"enrollment {enrollment_id!r}: stored field 'history' cannot be read "
                f"({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
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


def _check_attributes(attributes: Any, limit: int = 65_536) -> None:
    if attributes is None:
        return
    if not isinstance(attributes, Mapping):
        raise InvalidRequest("attributes must be a dict")
    doc = dict(attributes)
    try:
        check_json(doc, "attributes")
    except ValueError as exc:
        raise InvalidRequest(f"attributes must be JSON-serializable: {exc}") from None
    size = len(orjson.dumps(doc))
    if size > limit:
        raise InvalidRequest(
            f"attributes: {size} bytes of JSON, more than the limit of {limit} "
            "(CAMPAIGN_MAX_ATTRIBUTES_BYTES)"
        )


def _check_payload(payload: Any, limit: int) -> bytes:
    """The payload of a signal as JSON bytes; InvalidRequest unless a JSON object."""
    if payload is None:
        return b"{}"
    if not isinstance(payload, Mapping):
        raise InvalidRequest(
            f"payload must be a dict (a JSON object), not {type(payload).__name__}"
        )
    doc = dict(payload)
    try:
        check_json(doc, "payload")
    except ValueError as exc:
        raise InvalidRequest(f"payload must be JSON-serializable: {exc}") from None
    body = orjson.dumps(doc)
    if len(body) > limit:
        raise InvalidRequest(
            f"payload: {len(body)} bytes of JSON, more than the limit of {limit} "
            "(CAMPAIGN_MAX_PAYLOAD_BYTES)"
        )
    return body


#: An enrollment id is "{campaign_id}:{contact_id}": never longer than this.
_ENROLLMENT_ID_MAX = 1024 + 1 + _CONTACT_MAX


def _check_enrollment_id(enrollment_id: Any) -> None:
    if not isinstance(enrollment_id, str) or not enrollment_id:
        raise InvalidRequest("enrollment_id must be a non-empty string")
    if len(enrollment_id) > _ENROLLMENT_ID_MAX:
        raise InvalidRequest(
            f"enrollment_id: {len(enrollment_id)} characters, longer than any enrollment id"
        )
    if not _is_unicode(enrollment_id):
        raise InvalidRequest("enrollment_id is not valid Unicode (lone surrogate)")


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


_STATE_VALUES = frozenset(s.value for s in State)


def _check_record(enrollment_id: str, rec: Mapping[str, str]) -> None:
    """Raise :class:`CorruptRecord` naming the first field the commands need that cannot
    be read."""

    def bad(field: str, why: str) -> CorruptRecord:
        shown = str(rec.get(field))[:80]
        return CorruptRecord(
            f"enrollment {enrollment_id!r}: stored field {field!r} {why} (got {shown!r})"
        )

    if rec.get("state") not in _STATE_VALUES:
        raise bad("state", "is not a known state")
    if not rec.get("campaign"):
        raise bad("campaign", "is empty")
    for field, required in (("version", True), ("step", True), ("attempt", False),
                            ("base_step", False)):  # fmt: skip
        value = rec.get(field)
        if value is None or value == "":
            if required:
                raise bad(field, "is missing")
            continue
        if not (value.isascii() and value.isdigit() and len(value) < 16):
            raise bad(field, "is not a whole number")
    if int(rec["version"]) < 1:
        raise bad("version", "is not a version number")
    tz = rec.get("timezone")
    if tz and zone_problem(tz):
        raise bad("timezone", "is not a known time zone")


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A write left in flight by an enroll_many that stopped early: its error is not lost
    as "never retrieved" noise (the caller was told how far it got)."""
    if not task.cancelled():
        task.exception()


class _Purged(Exception):
    """The fast path found a tombstone: this enrollment must be created by a transition."""


class _RowError(Exception):
    """A row of a batch that cannot be planned: which one, and why."""

    def __init__(self, offset: int, error: InvalidRequest) -> None:
        super().__init__(str(error))
        self.offset = offset
        self.error = error


def _base_step(raw: str | None, enrollment_id: str) -> int:
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit() and len(raw) < 16):
        raise CorruptRecord(
            f"enrollment {enrollment_id!r}: stored field 'step' is not a whole number "
            f"(got {raw[:80]!r})"
        )
    return int(raw)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an imported enrollment starts: its node (None: the entry) and due time."""

    node: str | None
    run_at: datetime | None


@dataclasses.dataclass
class _NewGroup:
    """New enrollments of a batch that start alike: one ``lua/enroll.lua`` call."""

    plan: Plan
    common: dict[str, str]
    time_field: str
    rows: list[NewEnrollment]
    offsets: list[int]
    #: 0 for a contact's first row in the batch, 1 for its second, ...: written in order.
    generation: int = 0


def _check_run_at(value: Any) -> datetime:
    """``run_at`` as an aware datetime: a datetime or an ISO 8601 string with an offset."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidRequest(
                f"run_at {value[:60]!r} is not an ISO 8601 date and time "
                "(e.g. 2026-12-01T09:30:00+01:00)"
            ) from None
    if not isinstance(value, datetime):
        raise InvalidRequest(
            f"run_at must be an ISO 8601 string or a datetime, not {type(value).__name__}"
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRequest(
            f"run_at {value.isoformat()} has no UTC offset (write e.g. {value.isoformat()}Z)"
        )
    return value
