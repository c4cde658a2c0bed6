"""The planner: pure functions from "enrollment E reaches node N at time T" to a plan, and
from a plan to the atomic :class:`~app.store.Transition` that applies it. No I/O here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from app.campaigns import ActionNode, Campaign, DelayNode, ExitNode, WaitNode
from app.durations import format_duration
from app.jobs import STEP_FUNCTION, TIMEOUT_FUNCTION, Job, JobTarget, step_job_id, timeout_job_id
from app.models import State
from app.store import Transition

__all__ = ["Plan", "Planner", "ms"]


def ms(t: datetime) -> int:
    """Epoch milliseconds of an aware datetime."""
    return int(t.timestamp() * 1000)


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


class Planner:
    """Resolves nodes to plans and plans to transitions, under a per-enrollment step limit."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps

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
            if s - target.base_step > self.max_steps:
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
                job = self.step_job(target, node_id, s, 1, run_at, now)
                reason = _join(notes, f"action {node_id}")
                return Plan(State.SCHEDULED, node_id, s, reason, run_at=run_at, job=job)
            if isinstance(node, WaitNode):
                if node.business_time and cal is not None:
                    deadline = cal.add(t, node.timeout)
                else:
                    deadline = t + node.timeout
                job = self.timeout_job(target, node_id, s, deadline, now)
                reason = _join(notes, f"wait for {', '.join(sorted(node.events))}")
                return Plan(State.WAITING, node_id, s, reason, deadline=deadline, job=job)
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
            if s - target.base_step > self.max_steps:
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
            job = self.step_job(target, nxt, s, 1, run_at, now)
            reason = _join(notes, f"then {nxt or 'end'}")
            return Plan(State.SCHEDULED, nxt, s, reason, run_at=run_at, job=job)

    def place(
        self,
        campaign: Campaign,
        target: JobTarget,
        node_id: str,
        step: int,
        run_at: datetime | None,
        now: datetime,
        *,
        reason: str,
    ) -> Plan:
        """Put an enrollment at ``node_id`` directly (an import from another system):
        an action node is due at ``run_at``, a wait node waits with ``run_at`` as its
        deadline, and a delay node ends at ``run_at`` (the node after it is due then).
        Without ``run_at`` the node is entered at ``now`` as :meth:`plan` would."""
        node = campaign.nodes[node_id]
        if run_at is None or isinstance(node, ExitNode):
            return self.plan(campaign, target, node_id, step, now, reason=reason)
        s = step + 1
        if s - target.base_step > self.max_steps:
            return self._step_limit(node_id, s, [reason])
        if isinstance(node, ActionNode):
            job = self.step_job(target, node_id, s, 1, run_at, now)
            return Plan(State.SCHEDULED, node_id, s, _join([reason], f"action {node_id}"),
                        run_at=run_at, job=job)  # fmt: skip
        if isinstance(node, WaitNode):
            job = self.timeout_job(target, node_id, s, run_at, now)
            why = _join([reason], f"wait for {', '.join(sorted(node.events))}")
            return Plan(State.WAITING, node_id, s, why, deadline=run_at, job=job)
        assert isinstance(node, DelayNode)
        if run_at <= now:  # the delay is over: go on to what follows it, now
            return self.plan(campaign, target, node.next, s, now,
                             reason=_join([reason], f"delay {node_id} over"))  # fmt: skip
        s += 1
        if s - target.base_step > self.max_steps:
            return self._step_limit(node.next, s, [reason])
        job = self.step_job(target, node.next, s, 1, run_at, now)
        why = _join([reason], f"delay {node_id} until then; then {node.next or 'end'}")
        return Plan(State.SCHEDULED, node.next, s, why, run_at=run_at, job=job)

    @staticmethod
    def step_job(
        target: JobTarget,
        node: str | None,
        step: int,
        attempt: int,
        run_at: datetime,
        now: datetime,
        deferred: bool = False,
    ) -> Job:
        """The job that runs ``node`` as ``step``/``attempt`` at ``run_at`` (past means now)."""
        score = max(ms(run_at), ms(now))
        return Job(
            step_job_id(target.enrollment_id, step, attempt, score if deferred else None),
            STEP_FUNCTION,
            [target.enrollment_id, step, attempt],
            target.kwargs(node),
            score,
        )

    @staticmethod
    def timeout_job(
        target: JobTarget, node: str, step: int, deadline: datetime, now: datetime
    ) -> Job:
        """The job that fires a wait's timeout at ``deadline``."""
        return Job(
            timeout_job_id(target.enrollment_id, step),
            TIMEOUT_FUNCTION,
            [target.enrollment_id, step],
            target.kwargs(node),
            max(ms(deadline), ms(now)),
        )

    def _step_limit(self, node: str | None, step: int, notes: list[str]) -> Plan:
        limit = self.max_steps
        message = f"enrollment exceeded the step limit of {limit} (CAMPAIGN_MAX_STEPS)"
        return Plan(
            State.FAILED,
            node,
            step,
            _join(notes, "step limit reached"),
            error={"type": "StepLimitExceeded", "message": message, "node": node, "step": step},
        )

    @staticmethod
    def transition(
        plan: Plan,
        target: JobTarget,
        *,
        from_state: str | None,
        expect_states: Iterable[str],
        expect_step: int | None,
        expect_attempt: int | None = None,
        expect_job: str | None = None,
        attempt: int = 1,
        now: datetime,
        extra: Mapping[str, str] | None = None,
    ) -> Transition:
        """The atomic write that puts an enrollment where ``plan`` says."""
        at = ms(now)
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
                fields[name] = str(max(ms(value), at))
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
            campaign_id=target.campaign_id,
            expect_states=tuple(expect_states),
            expect_step=expect_step,
            expect_attempt=expect_attempt,
            expect_job=expect_job,
            set=fields,
            unset=unset,
            history=[entry],
            add_job=plan.job,
        )


def _join(notes: list[str], last: str) -> str:
    return "; ".join([*notes, last])
